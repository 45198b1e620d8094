"""All-reduce's PowerSGD round: the paper's two all-reduces, of P and of Q (Vogels et al. 2019).

Each gradient matrix M_j (a parameter viewed as (n, m) = (shape[0], numel / shape[0])) is
approximated at rank r by factors that every peer agrees on, and only the factors travel. With
Q_j the warm-started (m, r) factor, the same on every peer (PROTOCOL.md §6):

1. every peer adds its residual to its gradient (error feedback), M_j = g_j + e_j, and computes
   P_j = M_j Q_j (n, r);
2. an fp32 reduce-scatter + all-gather (``prs<n>``/``pag<n>``) averages the vector of every P_j
   together with the parameters that are not compressed (vectors, small or thin matrices), so
   those are averaged exactly on the way;
3. every peer orthonormalises each mean P̄_j into P̂_j by Gram-Schmidt (the same bytes, the same
   code) and computes its Q_j = M_j^T P̂_j (m, r);
4. a second reduce-scatter + all-gather (``qrs<n>``/``qag<n>``) averages the Q_j into Q̄_j;
5. every peer applies P̂_j Q̄_j^T = P̂_j P̂_j^T mean(M_j), the projection of the mean gradient
   onto the span of P̂_j, keeps e_j = M_j - P̂_j Q̄_j^T, and keeps Q̄_j as the next warm start.

Each peer sends 2 (n - 1)/n times the factors (and the uncompressed parameters) over the two
phases, where the all-gather of whole compressed gradients this replaces sent n - 1 times them:
at 8 peers, 4x fewer bytes. The averaged factors are the same bytes everywhere, so the peers apply
the same gradient wherever the orthonormalisation and the product P̂ Q̄^T compute the same floats
(the same device kind and library: the same caveat as DDP's ``powerSGD_hook``).

Trade-offs. As the paper does, the approximation is of the mean, rank r overall, not the sum of n
rank-r approximations of each peer's gradient: its error stays in the residuals and is sent
later. A round changes nothing until both phases arrived, so a failed round leaves the residuals
and the warm start as they were; it is still strict (``AllReduceIncompleteError``), as every
compressed round is, because it runs outside the group agreement of the exact path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from p2pdl.compression.compressors import PowerSGDCompressor, key_seed
from p2pdl.config.strategy import CompressionConfig
from p2pdl.errors import AllReduceIncompleteError
from p2pdl.strategies.allreduce_compressed import Parts, Send, scatter_gather
from p2pdl.strategies.base import RoundOutcome, StrategyContext
from p2pdl.wire import TensorSpec

__all__ = ["POWERSGD_KINDS", "PowerSGDRounds", "orthonormalize"]

# (reduce-scatter, all-gather) kind prefixes of the P phase and of the Q phase; "<prefix><n>".
POWERSGD_KINDS = (("prs", "pag"), ("qrs", "qag"))
_MAX_GROUP = 4096
_RELATIVE = 1e-5  # a column of P̄ left with less than this fraction of its norm becomes zero
_TINY = float(torch.finfo(torch.float32).tiny)  # ... as does one whose norm is not a normal float32


@dataclass(frozen=True, slots=True)
class _Matrix:
    index: int  # the parameter's position in ctx.parameters
    rows: int  # n
    columns: int  # m
    rank: int  # r
    p_offset: int  # where P_j (n r elements, C order) starts in the P vector
    q_offset: int  # where Q_j (m r elements) starts in the Q vector


@torch.no_grad()
def orthonormalize(matrix: torch.Tensor) -> None:
    """Gram-Schmidt on the columns of ``matrix`` (n, r), in place, in column order.

    Modified Gram-Schmidt: each earlier column q is removed as ``c <- c - (q . c) q`` with the
    updated c, then c is divided by its norm. A column left with less than 1e-5 of its norm before
    the removals (float32 rounding of a column in the span of the earlier ones), or with norm 0 or
    below the smallest normal float32, becomes zero: a rank-deficient mean, e.g. a zero gradient.
    The threshold is relative, so small gradients keep their columns. Plain loops over r columns:
    the same float operations on every peer, where a LAPACK QR may choose its own blocking.
    """
    for column in range(matrix.shape[1]):
        current = matrix[:, column]
        before = float(torch.linalg.vector_norm(current))
        for earlier in range(column):
            basis = matrix[:, earlier]
            current.sub_(torch.dot(basis, current) * basis)
        norm = torch.linalg.vector_norm(current)
        if float(norm) <= max(_TINY, _RELATIVE * before):
            current.zero_()
        else:
            current.div_(norm)


class PowerSGDRounds:
    """PowerSGD's state (residuals, warm-started Q) and its two-phase round over the participants.

    ``send`` is the strategy's encode-once sender and ``participants`` the live members in
    topology order, as for :class:`~p2pdl.strategies.allreduce_compressed.CompressedReduceScatter`.
    """

    def __init__(
        self,
        ctx: StrategyContext,
        config: CompressionConfig,
        *,
        participants: Callable[[], tuple[str, ...]],
        send: Send,
        round_timeout: float,
    ) -> None:
        self._ctx = ctx
        self._participants = participants
        self._send = send
        self._round_timeout = round_timeout
        self._error_feedback = config.error_feedback
        layout = PowerSGDCompressor(config.rank)
        self._matrices: list[_Matrix] = []
        self._plain: list[int] = []  # parameters averaged uncompressed, at the head of the P vector
        p_offset = q_offset = 0
        for index, (_, parameter) in enumerate(ctx.parameters):
            dims = layout.matrix_shape(tuple(parameter.shape)) if parameter.numel() >= config.min_numel else None
            if dims is None:
                self._plain.append(index)
                continue
            rows, columns, rank = dims
            self._matrices.append(_Matrix(index, rows, columns, rank, p_offset, q_offset))
            p_offset += rows * rank
            q_offset += columns * rank
        self._plain_total = sum(ctx.parameters[i][1].numel() for i in self._plain)
        self._p_total = self._plain_total + p_offset
        self._q_total = q_offset
        self._total = sum(p.numel() for _, p in ctx.parameters)
        device = ctx.device
        self._warm: list[torch.Tensor] = []
        for matrix in self._matrices:
            self._warm.append(self._initial_q(matrix))
        self._residual = [torch.zeros(p.shape, dtype=torch.float32, device=device) for _, p in ctx.parameters]
        self._kinds: set[str] = set()
        self.raw_bytes = 0  # what the fp32 reduce-scatter + all-gather of the gradient would have sent
        self.payload_bytes = 0  # what these rounds sent, before lz4

    def _initial_q(self, matrix: _Matrix) -> torch.Tensor:
        """A normal draw seeded by the parameter's name: the same Q on every peer."""
        generator = torch.Generator().manual_seed(key_seed(0, self._ctx.parameters[matrix.index][0]))
        return torch.randn((matrix.columns, matrix.rank), generator=generator).to(self._ctx.device)

    # ------------------------------------------------------------------ wire shapes

    def expected_tensors(self, kind: str) -> Mapping[str, TensorSpec] | None:
        """The exact specs of a ``prs``/``pag``/``qrs``/``qag`` frame, None when ``kind`` is not one."""
        prefix, size_text = kind[:3], kind[3:]
        phase = next((i for i, kinds in enumerate(POWERSGD_KINDS) if prefix in kinds), None)
        if phase is None or not size_text.isdigit() or size_text != str(int(size_text)):
            return None
        size = int(size_text)
        if not 2 <= size <= _MAX_GROUP:
            return None
        total = (self._p_total, self._q_total)[phase]
        return {"values": TensorSpec(dtype="float32", shape=(math.ceil(total / size),))}

    # ------------------------------------------------------------------ one round

    def _p_vector(self, gradients: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Step 1 on the compute thread: M_j = g_j + e_j (every parameter), and [plain..., P_j...]."""
        accumulated = []
        for grad, residual in zip(gradients, self._residual, strict=True):
            m = grad.detach().to(torch.float32)
            accumulated.append(m + residual if self._error_feedback else m.clone())
        vector = torch.empty(self._p_total, dtype=torch.float32, device=self._ctx.device)
        offset = 0
        for index in self._plain:
            count = accumulated[index].numel()
            vector[offset : offset + count] = accumulated[index].reshape(-1)
            offset += count
        for matrix, warm in zip(self._matrices, self._warm, strict=True):
            start = self._plain_total + matrix.p_offset
            out = vector[start : start + matrix.rows * matrix.rank].view(matrix.rows, matrix.rank)
            torch.matmul(accumulated[matrix.index].reshape(matrix.rows, matrix.columns), warm, out=out)
        return accumulated, vector

    def _q_vector(self, accumulated: Sequence[torch.Tensor], p_mean: torch.Tensor) -> torch.Tensor:
        """Step 3: orthonormalise each P̄_j in ``p_mean`` (in place) and compute [M_j^T P̄_j...]."""
        vector = torch.empty(self._q_total, dtype=torch.float32, device=self._ctx.device)
        for matrix in self._matrices:
            p = self._p_matrix(p_mean, matrix)
            orthonormalize(p)
            out = vector[matrix.q_offset : matrix.q_offset + matrix.columns * matrix.rank]
            m = accumulated[matrix.index].reshape(matrix.rows, matrix.columns)
            torch.matmul(m.T, p, out=out.view(matrix.columns, matrix.rank))
        return vector

    def _p_matrix(self, p_vector: torch.Tensor, matrix: _Matrix) -> torch.Tensor:
        start = self._plain_total + matrix.p_offset
        return p_vector[start : start + matrix.rows * matrix.rank].view(matrix.rows, matrix.rank)

    @torch.no_grad()
    def _apply(
        self,
        step: int,
        accumulated: Sequence[torch.Tensor],
        p_mean: torch.Tensor,
        q_mean: torch.Tensor,
        gradients: Sequence[torch.Tensor],
    ) -> None:
        """Step 5: the gradients, the residuals and the warm starts; nothing changed before this.

        Every new gradient is first built in its parameter's dtype, and the round is refused whole
        (before anything is written) when one is not finite: a finite float32 mean can still
        exceed a float16 parameter's range.
        """
        applied: dict[int, torch.Tensor] = {}
        owed: dict[int, torch.Tensor] = {}  # what each new gradient stands for, in float32
        offset = 0
        for index in self._plain:
            grad = gradients[index]
            count = grad.numel()
            owed[index] = p_mean[offset : offset + count].view_as(grad)  # the exact mean
            applied[index] = owed[index].to(grad.dtype)
            offset += count
        warm = []
        for matrix in self._matrices:
            grad = gradients[matrix.index]
            q = q_mean[matrix.q_offset : matrix.q_offset + matrix.columns * matrix.rank]
            q = q.view(matrix.columns, matrix.rank).clone()
            applied[matrix.index] = (self._p_matrix(p_mean, matrix) @ q.T).view_as(grad).to(grad.dtype)
            owed[matrix.index] = accumulated[matrix.index]  # M_j: the rest of it is carried over
            # A zero column of Q̄ (a mean of lower rank than r, an unused parameter) would make the
            # same column of every later P zero for good: it starts again from the seeded draw.
            # Every peer holds the same Q̄, so all do.
            dead = ~q.any(dim=0)
            if bool(dead.any()):
                q[:, dead] = self._initial_q(matrix)[:, dead]
            warm.append(q)
        if not all(bool(torch.isfinite(g).all()) for g in applied.values()):
            raise AllReduceIncompleteError(step, [])  # refused whole, before any gradient is written
        for index, new in applied.items():
            if self._error_feedback:
                # What was not applied: a matrix's M_j minus its approximation, a plain parameter's
                # rounding into its dtype (zero in float32), as applied.
                torch.sub(owed[index], new.to(torch.float32), out=self._residual[index])
            gradients[index].copy_(new)
        self._warm = warm

    async def _mean(
        self, step: int, members: tuple[str, ...], phase: int, vector: torch.Tensor, started: float
    ) -> torch.Tensor:
        """The rank-order mean of every member's ``vector`` by an fp32 reduce-scatter + all-gather."""
        size = len(members)
        chunk = math.ceil(vector.numel() / size)
        padded = torch.zeros(size * chunk, dtype=torch.float32, device=vector.device)
        padded[: vector.numel()] = vector
        # One tensor per rank (a clone: the frames outlive this call).
        scattered = [{"values": padded[k * chunk : (k + 1) * chunk].clone()} for k in range(size)]

        def reduce(contributions: list[Parts]) -> Parts:
            mean = torch.zeros(chunk, dtype=torch.float32, device=vector.device)
            for parts in contributions:  # rank order: the same float32 sum on every owner
                mean.add_(parts["values"].to(device=vector.device))
            if not bool(torch.isfinite(mean).all()):
                # Finite contributions (the decoder checked each) whose sum overflows: the members
                # whose values could, named; nothing has changed yet.
                limit = torch.finfo(torch.float32).max / size
                culprits = [
                    member
                    for member, parts in zip(members, contributions, strict=True)
                    if float(parts["values"].abs().max()) >= limit
                ]
                raise AllReduceIncompleteError(step, culprits)
            return {"values": mean.div_(size)}

        kinds = (f"{POWERSGD_KINDS[phase][0]}{size}", f"{POWERSGD_KINDS[phase][1]}{size}")
        self._kinds.update(kinds)
        reduced, payload = await scatter_gather(
            self._ctx, self._send, step, members, kinds, scattered, reduce, self._round_timeout, started
        )
        self.payload_bytes += payload
        return torch.cat([parts["values"].to(device=vector.device) for parts in reduced])[: vector.numel()]

    async def run(self, step: int, gradients: Callable[[], list[torch.Tensor]]) -> RoundOutcome:
        """One PowerSGD round over the current participants; strict (see the module doc)."""
        ctx = self._ctx
        started = time.perf_counter()
        members = self._participants()
        size = len(members)
        if size < 2:  # alone: nothing to send; the gradient is applied as it is
            return ctx.ledger.record(step, [], started)
        try:
            accumulated, p_vector = await ctx.run_compute(lambda: self._p_vector(gradients()))
            p_mean = await self._mean(step, members, 0, p_vector, started)
            q_vector = await ctx.run_compute(lambda: self._q_vector(accumulated, p_mean))
            q_mean = await self._mean(step, members, 1, q_vector, started)
            await ctx.run_compute(lambda: self._apply(step, accumulated, p_mean, q_mean, gradients()))
            self.raw_bytes += 2 * (size - 1) * math.ceil(self._total / size) * 4
            return ctx.ledger.record(step, [], started)
        finally:
            for kind in self._kinds:
                ctx.exchange.advance(kind, step + 1)
