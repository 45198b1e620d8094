"""One-step-delayed gossip mixing: pure torch, no I/O.

Synchronous D-PSGD stops training at every round until the neighbours' parameters have arrived.
The delayed variant lets the next round's local steps run while the copies travel. At round r a
peer keeps a snapshot ``s_i`` of its parameters and sends it; H local steps later it has moved
to ``x_i = s_i + u_i`` (``u_i`` its local update over those steps), and only then does it mix
the snapshots that arrived meanwhile. Mixing the snapshots themselves,
``x_i <- sum_j W_ij s_j``, would throw ``u_i`` away; mixing the whole current model with stale
neighbour copies, ``x_i <- W_ii x_i + sum_j W_ij s_j``, would scale ``u_i`` by ``W_ii`` and
change the network average. Mixing the *difference* of the snapshots keeps both:

    x_i <- x_i + sum_{j != i} W_ij (s_j - s_i)                                     (1)
         = sum_j W_ij s_j + u_i

which, with H = 1, is the update of D-PSGD as Lian et al. (2017) state it: the gradient is
taken at x_t while x_t is being averaged, and ``x_{t+1} = sum_j W_ij x_{j,t} - lr g_i(x_t)``.

Why (1) preserves the average. Summing the correction over every peer i,

    sum_i sum_{j != i} W_ij (s_j - s_i) = sum_j s_j (sum_{i != j} W_ij) - sum_i s_i (sum_{j != i} W_ij)
                                        = sum_j s_j (1 - W_jj) - sum_i s_i (1 - W_ii) = 0

when the columns of W sum to one like its rows (W doubly stochastic; symmetric Metropolis-
Hastings weights are). So the mixing step moves no mass between peers' averages: the network
average after the round is the average before it, ``mean_i x_i``, exactly up to float rounding;
only the local updates ``u_i`` move it, as in synchronous gossip. With zero updates, (1) is
``x <- W x`` applied to the snapshots, so the peers reach consensus at the rate of W's spectral
gap, one round later than synchronous gossip.

A neighbour whose snapshot does not arrive in time contributes nothing, which is the synchronous
rule "its weight stays home" (the self term of (1) is zero whatever its weight). The sum above
stays zero only if the omission is mutual; a one-sided miss moves the average by
``W_ij (s_j - s_i) / n``, as a partial round of synchronous gossip does.

Trade-off: one extra copy of the parameters (the snapshot, which is also the frame being sent)
and mixing with copies one round old, against a round that no longer waits for the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from p2pdl.core.mixing import accumulation_dtype


@torch.no_grad()
def snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` on their own device and dtype (what round r sends and keeps)."""
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def mix_delayed_into(
    local: Sequence[torch.Tensor],
    own_snapshot: Sequence[torch.Tensor],
    contributions: Sequence[tuple[float, Sequence[torch.Tensor]]],
) -> None:
    """x_i <- x_i + sum_j w_ij (s_j - s_i), in place on ``local`` (equation (1) of the module).

    ``own_snapshot`` holds s_i in ``local``'s order and shapes; ``contributions`` holds
    (w_ij, s_j) per neighbour whose snapshot arrived, its tensors possibly on the CPU or of
    another dtype. Each difference is formed before it is weighted, so peers that already agree
    add exactly zero. A 16-bit tensor is mixed in float32 and rounded once.
    """
    if not contributions:
        return
    for position, tensor in enumerate(local):
        wide = accumulation_dtype(tensor.dtype)
        accumulator = tensor if wide == tensor.dtype else tensor.to(wide)
        own = own_snapshot[position]
        own = own if own.dtype == wide and own.device == tensor.device else own.to(device=tensor.device, dtype=wide)
        difference = torch.empty_like(accumulator)  # (same shape as the parameter)
        for weight, tensors in contributions:
            incoming = tensors[position]
            if incoming.device != tensor.device or incoming.dtype != wide:
                incoming = incoming.to(device=tensor.device, dtype=wide)
            torch.sub(incoming, own, out=difference)
            accumulator.add_(difference, alpha=weight)
        if accumulator is not tensor:
            tensor.copy_(accumulator)


def delayed_round(
    models: Sequence[Sequence[torch.Tensor]],
    snapshots: Sequence[Sequence[torch.Tensor]],
    weights: torch.Tensor,
    arrived: torch.Tensor | None = None,
) -> None:
    """One delayed mixing round over a whole simulated network, in place on ``models``.

    ``weights`` is the (n, n) mixing matrix; ``arrived[i, j]`` (bool, default all true) says
    whether j's snapshot reached i in time. Peer i mixes per (1) with every j != i that has
    ``weights[i, j] > 0`` and arrived. Used by tests and benchmarks to reason about the
    network-wide effect of the rule the strategy applies per peer.
    """
    count = len(models)
    for i in range(count):
        contributions = [
            (float(weights[i, j]), snapshots[j])
            for j in range(count)
            if j != i and float(weights[i, j]) > 0 and (arrived is None or bool(arrived[i, j]))
        ]
        mix_delayed_into(models[i], snapshots[i], contributions)
