"""Mutation fuzzing of p2pdl.wire.decode.decode_frame: only FrameError, and only sane frames accepted.

tests/test_wire.py fuzzes the decoder with hypothesis for a few hundred examples per run; this is
the longer run. It starts from a corpus of valid frames (every allowed dtype, empty and 0-d
tensors, every meta value type, lz4 and raw bodies, control frames) and, case by case, applies one
mutator:

* ``bitflip``: 1-8 random bits flipped anywhere;
* ``bytes``: random positions set to random or "interesting" bytes (msgpack lead bytes, 0x00, 0xff);
* ``truncate`` / ``insert`` / ``delete`` / ``splice``: cut, grow, shrink, or join two frames;
* ``header``: magic, version, flags or the declared length changed (0, ±1, the cap, 2**32-1, random);
* ``lengths``: a msgpack length field inside the body (bin, str, array, map, ext) set to a huge or
  off-by-one value, the body re-compressed when it was lz4;
* ``body``: the *decompressed* body mutated (bit flips, byte sets) and re-wrapped with a correct
  header, so mutations reach msgpack and the schema even for lz4 frames;
* ``field``: one field of a valid body replaced by a random msgpack object;
* ``tensor``: a tensor entry's dtype, shape or data replaced (wrong sizes, NaN/Inf bit patterns);
* ``object``: a random msgpack object (nested, with ext types, NaN, huge ints) in a valid header;
* ``random``: random bytes, with or without a valid header in front.

Every case is decoded with ``decode_frame`` (sometimes with ``known_senders`` and ``expected``,
sometimes from a ``bytearray`` that is overwritten afterwards, and sometimes on the frame stream's
path too: from a writable receive buffer decoded in place, ``owned=True``, whose outcome must equal
the bytes path's, the same refusal reason or the same accepted tensors). It passes when it raises a
:class:`~p2pdl.errors.FrameError` subclass, or returns a frame that satisfies the invariants: every
tensor of an allowed dtype, finite when floating point, with at most 8 dims and its bytes within the
decompressed cap; at most ``max_tensors`` tensors; sender, kind, round, step and meta within the
schema; the sender known and the tensors as expected when those were asked for; and no tensor that
changes when the caller's mutable input buffer is reused. Anything else (another exception type, a
violated invariant) is a failure: its input is printed as hex and the exit status is 1.

Reproduce::

    .venv/bin/python benchmarks/fuzz_decoder.py [--cases 50000] [--seed 0] \\
        [--out benchmarks/results/fuzz_decoder.json]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import re
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import numpy as np
import torch
from _provenance import Provenance, write_result

from p2pdl.errors import FrameError
from p2pdl.wire import ALLOWED_DTYPES, HEADER_SIZE, Frame, Limits, TensorSpec, decode_frame, encode_frame

REPO = Path(__file__).resolve().parent.parent
HEADER = struct.Struct("<2sBBI")
LIMITS = Limits(max_frame_bytes=256 * 1024, max_decompressed_bytes=256 * 1024, max_tensors=16)
KNOWN_SENDERS = frozenset({"peer-0", "peer-1", "b"})
KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC4, 0xC6, 0xC7, 0xC9, 0xD4, 0xD9, 0xDB, 0xDC, 0xDD, 0xDF)
# msgpack lead byte -> width of its big-endian length field.
LENGTH_FIELDS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4}
LENGTH_FIELDS |= {0xDE: 2, 0xDF: 4}
NAN_INF_BITS = (
    struct.pack("<f", math.nan),
    struct.pack("<f", math.inf),
    struct.pack("<f", -math.inf),
    b"\x01\x00\x80\x7f",  # a signalling NaN
    b"\x00\x7c",  # fp16 +inf (first two bytes)
    b"\x80\x7f",  # bf16 +inf
    b"\x01\x7e",  # fp16 NaN
    struct.pack("<d", math.nan),
)


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Seed:
    data: bytes
    body: bytes  # uncompressed
    compressed: bool
    specs: dict[str, TensorSpec]


def corpus() -> list[Seed]:
    generator = torch.Generator().manual_seed(0)
    frames = [
        Frame(kind="hello", sender="peer-0", round=0, step=0, meta={"frames_token": "ab" * 16}),
        Frame(
            kind="params",
            sender="peer-1",
            round=3,
            step=7,
            meta={"degree": 2, "weight": 0.5, "note": "x", "flag": True, "none": None, "neg": -(2**63)},
            tensors={
                "w": torch.randn(4, 3, generator=generator),
                "b": torch.randn(3, generator=generator).half(),
                "s": torch.tensor(1.5, dtype=torch.bfloat16),
                "e": torch.empty(0, 5),
            },
        ),
        Frame(
            kind="chunk",
            sender="b",
            round=2**62,
            step=1,
            tensors={
                "q": torch.randint(-128, 127, (64,), generator=generator, dtype=torch.int8),
                "u": torch.randint(0, 255, (2, 2, 2), generator=generator, dtype=torch.uint8),
                "i": torch.arange(5, dtype=torch.int32),
                "l": torch.arange(3, dtype=torch.int64),
                "d": torch.randn(2, generator=generator, dtype=torch.float64),
            },
        ),
        # Compressible: lz4 is used, so the compressed path is in the corpus too.
        Frame(kind="params", sender="peer-0", round=1, step=1, tensors={"z": torch.zeros(2048), "o": torch.ones(64)}),
        Frame(kind="grads", sender="peer-1", round=5, step=5, tensors={"g": torch.randn(1024, generator=generator)}),
    ]
    seeds = []
    for frame in frames:
        for compression in ("never", "always"):
            data = encode_frame(frame, compression=compression)  # type: ignore[arg-type]
            compressed = bool(data[3] & 1)
            raw = encode_frame(frame, compression="never")
            specs = {name: TensorSpec.of_tensor(t) for name, t in frame.tensors.items()}
            seeds.append(Seed(data=data, body=raw[HEADER_SIZE:], compressed=compressed, specs=specs))
    return seeds


# --------------------------------------------------------------------------- mutators


def wrap(body: bytes, rng: random.Random, *, compress: bool | None = None) -> bytes:
    """A correct header around ``body``, lz4-compressed or not."""
    if compress is None:
        compress = rng.random() < 0.3
    if compress:
        return HEADER.pack(b"P2", 1, 1, len(body)) + lz4.block.compress(body, store_size=False)
    return HEADER.pack(b"P2", 1, 0, len(body)) + body


def flip_bits(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(len(buffer))
        buffer[position] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def set_bytes(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        value = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.randrange(256)
        buffer[rng.randrange(len(buffer))] = value
    return bytes(buffer)


def random_object(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(14 if depth < 4 else 10)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.choice((0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**31, rng.randrange(-(2**40), 2**40)))
    if choice == 3:
        return rng.choice((0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, rng.random()))
    if choice == 4:
        return "".join(rng.choice("abcp_09é\x00\U0001f600") for _ in range(rng.choice((0, 1, 5, 65, 300))))
    if choice == 5:
        return bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 4, 12, 48))))
    if choice == 6:
        return msgpack.ExtType(rng.randrange(128), bytes(rng.randrange(256) for _ in range(rng.randrange(9))))
    if choice == 7:
        return rng.choice([*ALLOWED_DTYPES, "complex64", "bool", "object", ""])
    if choice == 8:
        return [rng.choice((0, 1, 3, -1, 2**31, 2**31 - 1)) for _ in range(rng.randrange(10))]
    if choice == 9:
        return msgpack.Timestamp(rng.randrange(2**32), rng.randrange(10**9))
    if choice in (10, 11):
        return [random_object(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["v", "kind", "sender", "round", "step", "meta", "tensors", "x", "degree"]
    return {rng.choice(keys): random_object(rng, depth + 1) for _ in range(rng.randrange(5))}


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def valid_body_map(seed: Seed) -> dict[str, Any]:
    return dict(msgpack.unpackb(seed.body, raw=False, strict_map_key=False))


def mutate_header(seed: Seed, rng: random.Random) -> bytes:
    magic, version, flags, declared = HEADER.unpack_from(seed.data)
    field = rng.randrange(4)
    if field == 0:
        magic = rng.choice((b"P3", b"p2", b"\x00\x00", b"2P"))
    elif field == 1:
        version = rng.choice((0, 2, 255))
    elif field == 2:
        flags = rng.choice((0, 1, 2, 3, 0x80, 0xFF))
    else:
        cap = LIMITS.max_decompressed_bytes
        declared = rng.choice((0, 1, declared - 1, declared + 1, cap, cap + 1, 2**32 - 1, rng.randrange(2**32)))
        declared = max(0, min(declared, 2**32 - 1))
    return HEADER.pack(magic, version, flags, declared) + seed.data[HEADER_SIZE:]


def tamper_lengths(seed: Seed, rng: random.Random) -> bytes:
    body = bytearray(seed.body)
    positions = [i for i, b in enumerate(body) if b in LENGTH_FIELDS]
    for position in rng.sample(positions, min(len(positions), rng.randint(1, 2))):
        width = LENGTH_FIELDS.get(body[position], 0)  # 0: an earlier change overwrote this lead byte
        if not width or position + 1 + width > len(body):
            continue
        current = int.from_bytes(body[position + 1 : position + 1 + width], "big")
        top = 2 ** (8 * width) - 1
        value = rng.choice((top, top - 1, current + 1, max(current - 1, 0), 0, rng.randrange(top + 1)))
        body[position + 1 : position + 1 + width] = value.to_bytes(width, "big")
    return wrap(bytes(body), rng, compress=seed.compressed)


def mutate_body(seed: Seed, rng: random.Random) -> bytes:
    mutated = flip_bits(seed.body, rng) if rng.random() < 0.5 else set_bytes(seed.body, rng)
    return wrap(mutated, rng, compress=seed.compressed)


def replace_field(seed: Seed, rng: random.Random) -> bytes:
    fields = valid_body_map(seed)
    key = rng.choice([*fields, "extra"])
    if rng.random() < 0.15:
        fields.pop(key, None)
    else:
        fields[key] = random_object(rng)
    return wrap(pack(fields), rng)


def mutate_tensor(seed: Seed, rng: random.Random) -> bytes:
    fields = valid_body_map(seed)
    entries = fields["tensors"]
    if not entries:
        fields["tensors"] = [["t", "float32", [1], b"\x00" * 4]]
        return wrap(pack(fields), rng)
    entry = list(rng.choice(entries))
    index = entries.index(next(e for e in entries if e[0] == entry[0]))
    part = rng.randrange(5)
    if part == 0:
        entry[1] = rng.choice([*ALLOWED_DTYPES, "complex64", "bool", "float8_e5m2", "int16", ""])
    elif part == 1:
        shapes = [[], [0], [2**31 - 1, 2**31 - 1], [-1], [1] * 9, [2**31], entry[2][::-1], [len(entry[3])]]
        # Zero elements, so no data is needed, but dims whose strides overflow int64.
        shapes += [[0, 2**31 - 1, 2**31 - 1, 2**31 - 1], [2**31 - 1] * 3 + [0], [0] + [2**31 - 1] * 7]
        entry[2] = rng.choice(shapes)
    elif part == 2:
        data = entry[3]
        entry[3] = data[: rng.randrange(len(data) + 1)] if data else b"\x00"
    elif part == 3 and entry[3]:
        data = bytearray(entry[3])
        bits = rng.choice(NAN_INF_BITS)
        position = rng.randrange(len(data))
        data[position : position + len(bits)] = bits
        entry[3] = bytes(data[: len(entry[3])])  # the same length: only the values are poisoned
    else:
        entry[rng.randrange(4)] = random_object(rng)
    entries[index] = entry
    if rng.random() < 0.1:
        entries.append(entry)  # a repeated name
    return wrap(pack(fields), rng)


def random_bytes(seed: Seed, rng: random.Random) -> bytes:
    noise = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
    if rng.random() < 0.5:
        return HEADER.pack(b"P2", 1, rng.choice((0, 1)), len(noise)) + noise
    return noise


def splice(seed: Seed, rng: random.Random, other: Seed) -> bytes:
    cut = rng.randrange(len(seed.data) + 1)
    return seed.data[:cut] + other.data[rng.randrange(len(other.data) + 1) :]


def truncate(seed: Seed, rng: random.Random) -> bytes:
    return seed.data[: rng.randrange(len(seed.data))]


def insert(seed: Seed, rng: random.Random) -> bytes:
    position = rng.randrange(len(seed.data) + 1)
    extra = bytes(rng.choice(INTERESTING) for _ in range(rng.randint(1, 16)))
    return seed.data[:position] + extra + seed.data[position:]


def delete(seed: Seed, rng: random.Random) -> bytes:
    start = rng.randrange(len(seed.data))
    return seed.data[:start] + seed.data[start + rng.randint(1, 32) :]


MUTATORS: dict[str, Callable[[Seed, random.Random], bytes]] = {
    "bitflip": lambda seed, rng: flip_bits(seed.data, rng),
    "bytes": lambda seed, rng: set_bytes(seed.data, rng),
    "truncate": truncate,
    "insert": insert,
    "delete": delete,
    "header": mutate_header,
    "lengths": tamper_lengths,
    "body": mutate_body,
    "field": replace_field,
    "tensor": mutate_tensor,
    "object": lambda seed, rng: wrap(pack(random_object(rng)), rng),
    "random": random_bytes,
}


# --------------------------------------------------------------------------- invariants


def violations(frame: Frame, known: frozenset[str] | None, expected: Mapping[str, TensorSpec] | None) -> list[str]:
    """What is wrong with a frame the decoder accepted (empty when nothing is)."""
    found = []
    if not (isinstance(frame.kind, str) and KIND_RE.fullmatch(frame.kind)):
        found.append(f"kind {frame.kind!r}")
    if not (isinstance(frame.sender, str) and 1 <= len(frame.sender) <= 64):
        found.append(f"sender {frame.sender!r}")
    if known is not None and frame.sender not in known:
        found.append(f"unknown sender {frame.sender!r} accepted")
    for name, value in (("round", frame.round), ("step", frame.step)):
        if type(value) is not int or not 0 <= value < 2**63:
            found.append(f"{name} {value!r}")
    if not isinstance(frame.meta, dict) or len(frame.meta) > 64:
        found.append("meta")
    elif not all(type(v) in (int, float, str, bool, type(None)) for v in frame.meta.values()):
        found.append("meta value type")
    if len(frame.tensors) > LIMITS.max_tensors:
        found.append(f"{len(frame.tensors)} tensors")
    allowed = set(ALLOWED_DTYPES.values())
    total = 0
    for name, tensor in frame.tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in allowed:
            found.append(f"tensor {name!r} dtype")
            continue
        if tensor.dim() > 8:
            found.append(f"tensor {name!r} has {tensor.dim()} dims")
        total += tensor.numel() * tensor.element_size()
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            found.append(f"tensor {name!r} not finite")
    if total > LIMITS.max_decompressed_bytes:
        found.append(f"{total} tensor bytes over the cap")
    if expected is not None:
        got = {name: TensorSpec.of_tensor(t) for name, t in frame.tensors.items() if t.dtype in allowed}
        if got != dict(expected):
            found.append("tensors differ from expected")
    return found


# --------------------------------------------------------------------------- the run


@dataclass
class Failure:
    mutator: str
    problem: str
    data: bytes


def owned_path_disagrees(
    data: bytes,
    outcome: str,
    frame: Frame | None,
    known: Any,
    expected: Mapping[str, TensorSpec] | None,
) -> str:
    """Decode ``data`` as a frame stream does (in place, from a writable buffer); "" when it agrees."""
    buffer = np.frombuffer(bytearray(data), dtype=np.uint8)
    try:
        in_place = decode_frame(
            memoryview(buffer.data), limits=LIMITS, known_senders=known, expected=expected, owned=True
        )
    except FrameError as exc:
        return "" if exc.reason == outcome else f"owned path refused it as {exc.reason}, bytes path: {outcome}"
    except Exception as exc:
        return f"owned path raised {type(exc).__name__}: {exc}"[:300]
    if frame is None:
        return f"owned path accepted it, bytes path refused it as {outcome}"
    if in_place.tensors.keys() != frame.tensors.keys() or any(
        not torch.equal(in_place.tensors[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        for n, t in frame.tensors.items()
    ):
        return "the two paths accepted different tensors"
    return ""


def run(cases: int, seed: int, max_failures_shown: int = 5) -> dict[str, Any]:
    rng = random.Random(seed)
    seeds = corpus()
    names = [*MUTATORS, "splice"]
    outcomes: Counter[str] = Counter()
    by_mutator: dict[str, Counter[str]] = {name: Counter() for name in names}
    failures: list[Failure] = []
    durations: list[float] = []
    owned_cases = 0  # also decoded on the frame stream's path and compared
    slowest = (0.0, "", b"")
    started = time.perf_counter()
    for _ in range(cases):
        chosen = rng.choice(seeds)
        mutator = rng.choice(names)
        data = splice(chosen, rng, rng.choice(seeds)) if mutator == "splice" else MUTATORS[mutator](chosen, rng)
        known = KNOWN_SENDERS if rng.random() < 0.5 else None
        expected = chosen.specs if rng.random() < 0.3 else None
        mutable = rng.random() < 0.2
        owned = not mutable and rng.random() < 0.3
        given: bytes | bytearray = bytearray(data) if mutable else data
        case_started = time.perf_counter()
        try:
            frame: Frame | None = decode_frame(given, limits=LIMITS, known_senders=known, expected=expected)
            outcome = "accepted"
        except FrameError as exc:
            outcome = exc.reason
            str(exc)  # the message itself must render
            frame = None
        except Exception as exc:  # the point of the run: anything but FrameError is a bug
            outcome = "UNEXPECTED"
            failures.append(Failure(mutator, f"{type(exc).__name__}: {exc}"[:300], data))
            frame = None
        owned_cases += owned
        if owned and outcome != "UNEXPECTED":
            disagreement = owned_path_disagrees(data, outcome, frame, known, expected)
            if disagreement:
                outcome = "PATHS_DISAGREE"
                failures.append(Failure(mutator, disagreement, data))
        if frame is not None and outcome != "PATHS_DISAGREE":
            outcome = "accepted"
            snapshot = {name: t.clone() for name, t in frame.tensors.items()} if mutable else {}
            if mutable:  # the caller reuses its buffer: the frame must not change with it
                given[:] = bytes(len(given))
            problems = violations(frame, known, expected)
            if mutable and any(not torch.equal(frame.tensors[n], t) for n, t in snapshot.items()):
                problems.append("tensors alias the caller's mutable buffer")
            if problems:
                outcome = "INVALID_ACCEPTED"
                failures.append(Failure(mutator, "; ".join(problems), data))
        elapsed = time.perf_counter() - case_started
        durations.append(elapsed)
        if elapsed > slowest[0]:
            slowest = (elapsed, mutator, data)
        outcomes[outcome] += 1
        by_mutator[mutator][outcome] += 1
    seconds = time.perf_counter() - started

    durations.sort()
    # A slow outlier may be the machine (GC, another process): decode the slowest input again.
    retimed = []
    for _ in range(3):
        retime_started = time.perf_counter()
        with contextlib.suppress(Exception):  # only the time matters here; failures were recorded above
            decode_frame(slowest[2], limits=LIMITS)
        retimed.append(time.perf_counter() - retime_started)
    for failure in failures[:max_failures_shown]:
        print(f"FAILURE ({failure.mutator}): {failure.problem}\n  reproducer: {failure.data.hex()}", file=sys.stderr)
    if len(failures) > max_failures_shown:
        print(f"... and {len(failures) - max_failures_shown} more failures", file=sys.stderr)
    return {
        "cases": cases,
        "cases_also_decoded_in_place": owned_cases,
        "seed": seed,
        "seconds": round(seconds, 3),
        "cases_per_second": round(cases / seconds, 1),
        "case_us_median": round(durations[len(durations) // 2] * 1e6, 1),
        "case_us_p99": round(durations[int(len(durations) * 0.99)] * 1e6, 1),
        "slowest_case_ms": round(slowest[0] * 1e3, 3),
        "slowest_case_retimed_ms": round(min(retimed) * 1e3, 3),
        "slowest_case_mutator": slowest[1],
        "slowest_case_bytes": len(slowest[2]),
        "limits": {
            "max_frame_bytes": LIMITS.max_frame_bytes,
            "max_decompressed_bytes": LIMITS.max_decompressed_bytes,
            "max_tensors": LIMITS.max_tensors,
        },
        "corpus_frames": len(seeds),
        "outcomes": dict(outcomes.most_common()),
        "by_mutator": {name: dict(counter.most_common()) for name, counter in by_mutator.items()},
        "failures": len(failures),
        "failure_examples": [
            {"mutator": f.mutator, "problem": f.problem, "hex": f.data.hex()[:4096]} for f in failures[:20]
        ],
    }


def markdown(result: dict[str, Any]) -> str:
    outcomes: dict[str, int] = result["outcomes"]
    lines = [
        f"decode_frame fuzz: {result['cases']} cases, seed {result['seed']}, {result['seconds']} s, "
        f"{result['cases_per_second']:.0f} cases/s (decode: median {result['case_us_median']} us, "
        f"p99 {result['case_us_p99']} us), slowest case {result['slowest_case_ms']} ms "
        f"({result['slowest_case_mutator']}, {result['slowest_case_bytes']} bytes; "
        f"{result['slowest_case_retimed_ms']} ms when decoded again), failures: {result['failures']}",
        "",
        "| outcome | cases | share |",
        "|---|---:|---:|",
    ]
    for outcome, count in outcomes.items():
        lines.append(f"| {outcome} | {count} | {100 * count / result['cases']:.1f}% |")
    reasons = list(outcomes)
    lines += ["", "| mutator | " + " | ".join(reasons) + " |", "|---|" + "---:|" * len(reasons)]
    for mutator, counts in result["by_mutator"].items():
        lines.append(f"| {mutator} | " + " | ".join(str(counts.get(r, 0)) for r in reasons) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if args.cases < 1:
        parser.error("--cases must be >= 1")
    provenance = Provenance()
    torch.set_num_threads(args.threads)
    # Decoded tensors are read-only views of the input bytes; torch says so once (as in pyproject's pytest config).
    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
    result = run(args.cases, args.seed)
    print(markdown(result))
    if args.out is not None:
        msgpack_version = ".".join(map(str, msgpack.version))
        settings = {"torch_threads": args.threads, "msgpack": msgpack_version, "lz4": lz4.__version__}
        write_result(args.out, "fuzz_decoder", {"settings": settings, **result}, provenance)
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
