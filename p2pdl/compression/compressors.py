"""Gradient and parameter compressors that keep accuracy, and error feedback around them.

Pure torch, no I/O. Every compressor turns ONE tensor into a small dict of wire tensors
(suffix -> tensor) whose dtypes are in :data:`p2pdl.wire.frame.ALLOWED_DTYPES` and whose shapes are a
deterministic function of the input shape and the compressor's settings, so a receiver knows the
exact :class:`~p2pdl.wire.frame.TensorSpec` of every part before it reads a byte (``wire_specs``) and
refuses anything else. Work runs on the input tensor's device; decode accepts the read-only CPU
views that :func:`p2pdl.wire.decode.decode_frame` returns and moves them once. How a whole model
goes through them is :mod:`p2pdl.compression.codec`; CHOCO-gossip's public copies are
:mod:`p2pdl.compression.choco`.

Compressors, with the wire bytes per fp32 element before frame-level lz4 (the ratios against
fp32 after lz4 are what benchmarks/compressors.py reports for an 11.17M-element gradient)::

    none      pass-through: fp32, or a 16-bit parameter's dtype    4 (2)        exact
    fp16      IEEE half, clamped to +-65504 so it never sends inf  2      (2x)  rel. err <= 2**-11
    bf16      bfloat16, fp32's range                              2      (2x)  rel. err <= 2**-8
    int8      per-chunk symmetric absmax scale, round-to-nearest  1+4/chunk (4x)  |err| <= scale/2
    topk      the k = ceil(ratio * numel) largest |x|             6 ratio (~100x at 1%)  biased
    powersgd  rank-r factors P (n, r), Q (m, r) of M (n, m)       4r(n+m)/(nm) (418x)    biased

Parameters stored in bfloat16 or float16 go through the same compressors: every encoder reads
its input as float32 (exact for 16-bit values), every decoder returns float32, and error-feedback
residuals are float32 whatever the parameter's dtype, so what a 16-bit rounding drops is resent
like anything else a compressor drops. Only the pass-through keeps the parameter's dtype on the
wire (the codec builds it so); the other wire formats do not depend on the parameter's dtype.

Trade-offs:

* lz4 gains nothing on fp32, so the bytes saved here are the bytes saved on the wire.
  Top-k indices are sorted and delta-coded (first index absolute, then gaps) as int32: the gaps
  are small numbers with mostly-zero high bytes, which the frame codec's lz4 shrinks well.
  Top-k values travel as float16 divided by one float32 scale (their absmax): half the bytes of
  fp32, fp16's 11-bit precision, and fp32's range (plain fp16 would overflow above 65504 and go
  subnormal, losing precision, for gradients around 1e-5). The leftover rounding, <= 2**-11
  relative, lands in the error-feedback residual like everything else top-k drops.
* Exact ``torch.topk`` of a large tensor is several times slower than the sampled selection used
  above :data:`EXACT_TOPK_MAX_NUMEL` elements (benchmarks/compressors.py times both): there the
  threshold is estimated from a random sample of |x| (about 1%), every element above it becomes
  a candidate, and the k largest candidates are kept. Every element above a threshold at or
  below the true k-th magnitude is a candidate, so the result is still the exact top-k (ties
  aside), at the cost of one compare and one nonzero pass; a sampled threshold that lands too
  high (rarely) is redrawn lower, and exact topk runs if that fails twice.
* Top-k and PowerSGD are biased: on their own they lose whatever they drop, and SGD with them
  stalls or diverges. :class:`ErrorFeedback` (Karimireddy et al. 2019) adds back, next step,
  exactly what the last compression dropped, which restores SGD's convergence; int8, fp16 and
  bf16 are nearly unbiased and work without it, but it costs one fp32 buffer per tensor and is
  cheap insurance.
* PowerSGD (Vogels et al. 2019) views a tensor as a matrix (shape[0], prod(rest)) and sends
  rank-r factors from one warm-started power iteration per step. Here each peer's factors are
  sent whole and every receiver reconstructs P Q^T and averages (all-gather style), not the
  paper's all-reduce of P then Q, because peers talk pairwise with different neighbours. 1-D
  tensors, and matrices where r (n + m) >= n m so that the factors would not be smaller, go
  uncompressed as fp32 (their ``wire_specs`` says so).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from fractions import Fraction
from typing import Final, Literal, Protocol, runtime_checkable

import torch

from p2pdl.errors import ConfigError, FrameSchemaError, NonFiniteError, ShapeMismatchError
from p2pdl.wire import ALLOWED_DTYPES, TensorSpec

__all__ = [
    "COMPRESSOR_KINDS",
    "EXACT_TOPK_MAX_NUMEL",
    "PASS_THROUGH_DTYPES",
    "Compressor",
    "CompressorKind",
    "ErrorFeedback",
    "Float16Compressor",
    "Int8Compressor",
    "NoneCompressor",
    "PassThroughDtype",
    "PowerSGDCompressor",
    "TopKCompressor",
    "build_compressor",
    "key_seed",
    "wire_bytes",
]

CompressorKind = Literal["none", "fp16", "bf16", "int8", "topk", "powersgd"]
PassThroughDtype = Literal["float32", "float16", "bfloat16"]
PASS_THROUGH_DTYPES: Final[tuple[PassThroughDtype, ...]] = ("float32", "float16", "bfloat16")
COMPRESSOR_KINDS: Final[tuple[CompressorKind, ...]] = ("none", "fp16", "bf16", "int8", "topk", "powersgd")

# Exact torch.topk below this many elements; sampled threshold above. Around 2**18 elements exact
# topk costs about as much as the sampled path's fixed costs (benchmarks/compressors.py).
EXACT_TOPK_MAX_NUMEL: Final[int] = 2**18
_SAMPLE_FRACTION: Final[float] = 0.01
# The sample must contain enough elements above the threshold for its quantile to be tight:
# with h hits the candidate count has relative spread ~1/sqrt(h).
_MIN_SAMPLE_HITS: Final[int] = 1024
# Aim for this many candidates per wanted entry: 3 standard deviations above k at h = 1024.
_CANDIDATE_MARGIN: Final[float] = 1.1
_SAMPLE_RETRIES: Final[int] = 2

_FP16_MAX: Final[float] = 65504.0
_INT8_MAX: Final[int] = 127
_FLOAT32_MAX: Final[float] = float(torch.finfo(torch.float32).max)


def wire_bytes(parts: Mapping[str, torch.Tensor]) -> int:
    """The raw payload bytes of ``parts`` (sum of numel * itemsize), before any lz4."""
    return sum(tensor.numel() * tensor.element_size() for tensor in parts.values())


@runtime_checkable
class Compressor(Protocol):
    """Turns one tensor into named wire tensors and back.

    ``encode`` may keep per-``key`` state (PowerSGD's warm start), so use one key per tensor and
    one compressor per stream. Its parts may alias the input (``none``). ``decode`` is stateless,
    validates ``parts`` against ``wire_specs(shape)`` (ShapeMismatchError), refuses values that
    decode to something invalid (FrameSchemaError, NonFiniteError), and returns a new float32
    tensor of ``shape`` on ``device`` that the caller owns, whatever dtype the encoded tensor had:
    float32 is the accumulation dtype, so a caller that averages several decoded streams into a
    16-bit parameter sums them in float32 and rounds once.
    """

    name: str

    def wire_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]: ...

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decode(
        self, key: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------- helpers


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _flat_float32(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D float32 view of ``tensor`` when it already is one, else a converted copy."""
    return tensor.detach().reshape(-1).to(torch.float32)


def _check_parts(parts: Mapping[str, torch.Tensor], specs: Mapping[str, TensorSpec]) -> None:
    if parts.keys() != specs.keys():
        raise ShapeMismatchError(
            f"compressed parts differ: got {sorted(parts.keys())}, expected {sorted(specs.keys())}"
        )
    for suffix, spec in specs.items():
        tensor = parts[suffix]
        got = TensorSpec.of_tensor(tensor)
        if got != spec:
            raise ShapeMismatchError(
                f"part {suffix!r}: got {got.dtype}{list(got.shape)}, expected {spec.dtype}{list(spec.shape)}"
            )


def _require_finite(what: str, tensor: torch.Tensor) -> None:
    # One reduction and one host sync, no bool temporary (see p2pdl.wire.decode._all_finite).
    if tensor.numel() == 0:
        return
    extremes = torch.stack(torch.aminmax(tensor)).tolist()
    if not all(math.isfinite(value) for value in extremes):
        raise NonFiniteError(f"{what} decodes to NaN or Inf")


def key_seed(seed: int, key: str) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every peer must agree.
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**63


# --------------------------------------------------------------------------- none / fp16 / bf16


class NoneCompressor:
    """Pass-through: one part ``values`` of the input's shape, in ``dtype`` (float32 by default).

    Exact for inputs of ``dtype`` or narrower. The codec gives a 16-bit parameter a pass-through
    in the parameter's own dtype, so its uncompressed tensors cost 2 bytes per element, not 4.
    """

    name = "none"

    def __init__(self, dtype: PassThroughDtype = "float32") -> None:
        if dtype not in PASS_THROUGH_DTYPES:
            raise ValueError(f"pass-through dtype must be one of {', '.join(PASS_THROUGH_DTYPES)}, got {dtype!r}")
        self.dtype_name: PassThroughDtype = dtype
        self._dtype = ALLOWED_DTYPES[dtype]

    def wire_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        return {"values": TensorSpec(dtype=self.dtype_name, shape=shape)}

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": tensor.detach().to(self._dtype)}

    def decode(
        self, key: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        _check_parts(parts, self.wire_specs(shape))
        return parts["values"].to(device=device, dtype=torch.float32, copy=True)


class Float16Compressor:
    """A cast to float16 or bfloat16: one part ``values`` of the input's shape.

    float16 is clamped to +-65504 first, so a finite input never becomes inf on the wire (the
    receiver would refuse the whole frame); with error feedback the clipped excess is resent.
    """

    def __init__(self, dtype: Literal["float16", "bfloat16"]) -> None:
        self.name = "fp16" if dtype == "float16" else "bf16"
        self._dtype_name = dtype
        self._dtype = ALLOWED_DTYPES[dtype]

    def wire_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        return {"values": TensorSpec(dtype=self._dtype_name, shape=shape)}

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        values = tensor.detach()
        if self._dtype == torch.float16:
            values = values.clamp(-_FP16_MAX, _FP16_MAX)
        return {"values": values.to(self._dtype)}

    def decode(
        self, key: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        _check_parts(parts, self.wire_specs(shape))
        return parts["values"].to(device=device).to(torch.float32)


# --------------------------------------------------------------------------- int8


class Int8Compressor:
    """Symmetric int8 with one float32 scale per chunk of ``chunk`` elements.

    Parts: ``values`` int8 (numel,) and ``scales`` float32 (ceil(numel / chunk),), scale =
    absmax / 127 of the chunk (flattened order), values = round(x / scale) in [-127, 127].
    Decoding gives q * scale, within scale / 2 of x.
    """

    name = "int8"

    def __init__(self, chunk: int = 1024) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = chunk

    def wire_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        numel = _numel(shape)
        return {
            "values": TensorSpec(dtype="int8", shape=(numel,)),
            "scales": TensorSpec(dtype="float32", shape=(-(-numel // self.chunk),)),
        }

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = _flat_float32(tensor)
        numel = flat.numel()
        full = numel - numel % self.chunk
        # The full chunks as a (chunks, chunk) view and the ragged tail separately, so the
        # input is never padded (a copy of the whole tensor).
        pieces = [flat[:full].view(-1, self.chunk)]
        if full < numel:
            pieces.append(flat[full:].view(1, -1))
        values = torch.empty(numel, dtype=torch.int8, device=flat.device)
        scale_list = []
        offset = 0
        for piece in pieces:
            scales = piece.abs().amax(dim=1, keepdim=True).div_(_INT8_MAX)  # (chunks, 1)
            # An all-zero chunk has scale 0; divide it by 1 instead (its values are all 0).
            divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
            quantised = (piece / divisor).round_().clamp_(-_INT8_MAX, _INT8_MAX)
            values[offset : offset + piece.numel()].copy_(quantised.view(-1))
            offset += piece.numel()
            scale_list.append(scales.view(-1))
        scales = torch.cat(scale_list) if scale_list else flat.new_empty(0)
        return {"values": values, "scales": scales}

    def decode(
        self, key: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        _check_parts(parts, self.wire_specs(shape))
        scales = parts["scales"].to(device=device, dtype=torch.float32)
        # |q| <= 127 after the clamp in encode; a hostile 127 * scale could still overflow.
        _require_finite("int8 scales", scales * _INT8_MAX)
        values = parts["values"].to(device=device)
        numel = values.numel()
        full = numel - numel % self.chunk
        out = torch.empty(numel, dtype=torch.float32, device=device)
        head = out[:full].view(-1, self.chunk)
        torch.mul(values[:full].view(-1, self.chunk), scales[: head.shape[0], None], out=head)
        if full < numel:
            torch.mul(values[full:], scales[-1], out=out[full:])
        return out.view(shape)


# --------------------------------------------------------------------------- top-k


class TopKCompressor:
    """The k = ceil(ratio * numel) entries of largest magnitude; the rest decode to zero.

    Parts: ``indices`` int32 (k,), sorted ascending then delta-coded (first absolute, then gaps
    >= 1); ``values`` float16 (k,), the kept entries divided by ``scale``; ``scale`` float32 (1,),
    the kept entries' absmax (1 when they are all zero). ``ratio`` is read as the decimal it
    prints as, so ratio=0.07 keeps exactly 7 of 100.
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01, *, seed: int = 0) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        exact = Fraction(str(ratio))
        self._ratio_numerator, self._ratio_denominator = exact.numerator, exact.denominator
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def k_for(self, numel: int) -> int:
        """How many entries a tensor of ``numel`` elements keeps."""
        return min(numel, max(1, -(-self._ratio_numerator * numel // self._ratio_denominator)))

    def wire_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        k = self.k_for(_numel(shape))
        return {
            "indices": TensorSpec(dtype="int32", shape=(k,)),
            "values": TensorSpec(dtype="float16", shape=(k,)),
            "scale": TensorSpec(dtype="float32", shape=(1,)),
        }

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = _flat_float32(tensor)
        if flat.numel() >= 2**31:
            raise ValueError(f"top-k indices are int32; {key!r} has {flat.numel()} elements")
        k = self.k_for(flat.numel())
        indices = self.select(flat, k)  # (k,) int64, ascending
        kept = flat[indices]
        scale = kept.abs().amax() if k else flat.new_zeros(())
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).reshape(1)
        gaps = torch.diff(indices, prepend=indices.new_zeros(1)) if k else indices
        return {
            "indices": gaps.to(torch.int32),
            "values": (kept / scale).to(torch.float16),
            "scale": scale,
        }

    def select(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        """Ascending int64 indices of exactly ``k`` largest-magnitude entries of ``flat``."""
        magnitudes = flat.abs()
        sample_size = self._sample_size(flat.numel(), k)
        if flat.numel() <= EXACT_TOPK_MAX_NUMEL or 4 * sample_size > flat.numel():
            return self._exact(magnitudes, k)
        return self._sampled(magnitudes, k, sample_size)

    @staticmethod
    def _sample_size(numel: int, k: int) -> int:
        # About 1% of the tensor, but enough for ~_MIN_SAMPLE_HITS samples above the threshold.
        return max(int(numel * _SAMPLE_FRACTION), -(-_MIN_SAMPLE_HITS * numel // max(k, 1)))

    @staticmethod
    def _exact(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
        indices = torch.topk(magnitudes, k, sorted=False).indices
        return torch.sort(indices).values

    def _sampled(self, magnitudes: torch.Tensor, k: int, sample_size: int) -> torch.Tensor:
        # Every element at or above a threshold that is <= the true k-th magnitude is a
        # candidate, so the k largest candidates ARE the exact top-k: sampling only makes it
        # cheap. ~1.1 k candidates from a sample quantile; a threshold that came out too high
        # (too few candidates, ~0.1% of calls) is retried lower.
        numel = magnitudes.numel()
        generator = self._generator(magnitudes.device)
        margin = _CANDIDATE_MARGIN
        for _ in range(_SAMPLE_RETRIES):
            positions = torch.randint(numel, (sample_size,), generator=generator, device=magnitudes.device)
            sample = magnitudes[positions]
            hits = min(sample_size, math.ceil(margin * k * sample_size / numel))
            threshold = torch.topk(sample, hits, sorted=False).values.min()
            candidates = torch.nonzero(magnitudes >= threshold).squeeze(1)  # ascending
            if candidates.numel() >= k:
                if candidates.numel() > k:
                    # Few candidates (~1.1 k), so an exact topk among them is cheap.
                    keep = torch.topk(magnitudes[candidates], k, sorted=False).indices
                    candidates = candidates[torch.sort(keep).values]
                return candidates
            margin *= 2  # the threshold was above the true k-th magnitude: go lower
        return self._exact(magnitudes, k)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    @staticmethod
    def sent_indices(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The int64 flat indices that ``parts`` (this peer's own encode output) carry."""
        return torch.cumsum(parts["indices"].to(torch.int64), dim=0)

    def decode(
        self, key: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        _check_parts(parts, self.wire_specs(shape))
        numel = _numel(shape)
        gaps = parts["indices"].to(device=device, dtype=torch.int64)
        out = torch.zeros(numel, dtype=torch.float32, device=device)
        if gaps.numel() == 0:
            return out.view(shape)
        # Hostile indices must never reach an index write (on CUDA an out-of-range index is a
        # device-side assert that kills the process). Gaps >= 1 also rule out duplicates.
        indices = torch.cumsum(gaps, dim=0)
        checks = [gaps[0] >= 0, indices[-1] < numel]
        if gaps.numel() > 1:
            checks.append(gaps[1:].amin() >= 1)
        if not bool(torch.stack(checks).all()):  # one host sync
            raise FrameSchemaError(f"top-k indices are not strictly increasing within [0, {numel})")
        values = parts["values"].to(device=device, dtype=torch.float32) * parts["scale"].to(device=device)
        _require_finite("top-k values", values)
        out[indices] = values
        return out.view(shape)


# --------------------------------------------------------------------------- PowerSGD


class PowerSGDCompressor:
    """Rank-``rank`` PowerSGD with a warm-started Q per key (Vogels et al. 2019).

    For M = tensor viewed as (n, m) = (shape[0], prod(shape[1:])) and r = min(rank, n, m): P = M Q,
    P <- orthonormal basis of P (QR), Q <- M^T P; parts ``p`` float32 (n, r) and ``q`` float32 (m, r);
    decode = P Q^T. Q starts from a normal draw seeded by (seed, key), so peers agree on it, and
    is carried to the next encode of the same key. Tensors with fewer than 2 dims, or where the
    factors would not be smaller than the tensor, go as fp32 ``values`` instead.
    """

    name = "powersgd"

    def __init__(self, rank: int = 4, *, seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self._seed = seed
        self._warm_q: dict[str, torch.Tensor] = {}
        self._fallback = NoneCompressor()

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(n, m, r) for a tensor that is compressed, None for one sent as fp32."""
        if len(shape) < 2:
            return None
        n, m = shape[0], _numel(shape[1:])
        r = min(self.rank, n, m)
        if r == 0 or r * (n + m) >= n * m:
            return None
        return n, m, r

    def wire_specs(self, shape: tuple[int, ...]) -> dict[str, TensorSpec]:
        dims = self.matrix_shape(shape)
        if dims is None:
            return self._fallback.wire_specs(shape)
        n, m, r = dims
        return {
            "p": TensorSpec(dtype="float32", shape=(n, r)),
            "q": TensorSpec(dtype="float32", shape=(m, r)),
        }

    def encode(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        shape = tuple(tensor.shape)
        dims = self.matrix_shape(shape)
        if dims is None:
            return self._fallback.encode(key, tensor)
        n, m, r = dims
        matrix = tensor.detach().to(torch.float32).reshape(n, m)
        q = self._warm_q.get(key)
        if q is None or q.shape != (m, r) or q.device != matrix.device:
            generator = torch.Generator().manual_seed(key_seed(self._seed, key))
            q = torch.randn((m, r), generator=generator).to(matrix.device)
        p = torch.linalg.qr(matrix @ q).Q  # (n, r), orthonormal columns
        q = matrix.T @ p  # (m, r)
        self._warm_q[key] = q
        return {"p": p, "q": q}

    def decode(
        self, key: str, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        if self.matrix_shape(shape) is None:
            return self._fallback.decode(key, parts, shape, device)
        _check_parts(parts, self.wire_specs(shape))
        p = parts["p"].to(device=device)
        q = parts["q"].to(device=device)
        out = (p @ q.T).view(shape)
        _require_finite("PowerSGD factors", out)
        return out

    def forget(self, key: str) -> None:
        """Drop the warm start of ``key`` (e.g. after a restart); the next encode reseeds it."""
        self._warm_q.pop(key, None)


# --------------------------------------------------------------------------- factory


def build_compressor(
    kind: CompressorKind, *, ratio: float = 0.01, rank: int = 4, chunk: int = 1024, seed: int = 0
) -> Compressor:
    """A compressor by name. ``ratio``: top-k fraction kept; ``rank``: PowerSGD rank; ``chunk``:
    int8 elements per scale; ``seed``: top-k sampling and PowerSGD initialisation.

    Raises ConfigError listing every bad argument.
    """
    problems = []
    if kind not in COMPRESSOR_KINDS:
        problems.append(f"compressor kind {kind!r} is not one of {', '.join(COMPRESSOR_KINDS)}")
    if not 0.0 < ratio <= 1.0:
        problems.append(f"compression ratio must be in (0, 1], got {ratio}")
    if type(rank) is not int or rank < 1:
        problems.append(f"compression rank must be an int >= 1, got {rank!r}")
    if type(chunk) is not int or chunk < 1:
        problems.append(f"compression chunk must be an int >= 1, got {chunk!r}")
    if problems:
        raise ConfigError(problems)
    if kind == "none":
        return NoneCompressor()
    if kind == "fp16":
        return Float16Compressor("float16")
    if kind == "bf16":
        return Float16Compressor("bfloat16")
    if kind == "int8":
        return Int8Compressor(chunk)
    if kind == "topk":
        return TopKCompressor(ratio, seed=seed)
    return PowerSGDCompressor(rank, seed=seed)


# --------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Error feedback around a compressor (Karimireddy et al. 2019), one float32 residual per key.

    ``compress(key, g)`` sends c = C(g + e) and keeps e <- (g + e) - decode(c), on g's device.
    For none/fp16/bf16/int8/topk the subtraction is exact in fp32 (Sterbenz: each decoded entry
    is zero or within a factor 2 of the corrected one; fp16-clamped entries aside), so
    decode(c) + e_new == g + e_old bit for bit, and the sum of everything sent equals the sum of
    the inputs minus the residual up to the fp32 rounding of the g + e adds. For PowerSGD the
    subtraction rounds once more. The residual lives on g's device, in place (no allocation
    per step after the first).
    """

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self._residuals: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def compress(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts of C(tensor + residual); the residual keeps what they do not carry."""
        source = tensor.detach()
        residual = self._residuals.get(key)
        if residual is None or residual.shape != source.shape or residual.device != source.device:
            # A new key (or a changed tensor) starts from a zero residual.
            residual = source.to(torch.float32, copy=True)
            self._residuals[key] = residual
        else:
            residual.add_(source)  # now holds the corrected tensor g + e, in place
        parts = self.compressor.encode(key, residual)
        decoded = self.compressor.decode(key, parts, tuple(residual.shape), residual.device)
        # "none" (and PowerSGD's fallback) returns the corrected tensor itself; copy it out
        # before the buffer becomes the new residual.
        if any(part.data_ptr() == residual.data_ptr() for part in parts.values()):
            parts = {suffix: part.clone() for suffix, part in parts.items()}
        residual.sub_(decoded)
        return parts

    def residual(self, key: str) -> torch.Tensor | None:
        """The live residual buffer of ``key`` (float32, the input's shape; updated in place by
        :meth:`compress`, so clone it to keep a value), None before the first call."""
        return self._residuals.get(key)

    def reset(self) -> None:
        """Forget every residual, e.g. when the model is replaced by a checkpoint."""
        self._residuals.clear()
