"""The one exception tree of p2pdl.

Every error that p2pdl raises on purpose derives from :class:`P2PDLError`. Errors from
aiohttp, msgpack and lz4 are translated at the boundary (``raise ... from exc``) so callers
never need to know which library sits underneath::

    P2PDLError
    ├── ConfigError                 bad config file or CLI value; lists every problem
    │   └── AuthConfigError         the secret or a TLS file is missing or unusable
    ├── WorkloadError               a workload file is missing or lacks a required function
    ├── FrameError                  a frame from the network was refused (never fatal to a peer)
    │   ├── FrameTooLargeError      frame bytes or declared decompressed size over the cap
    │   ├── FrameFormatError        not a p2pdl frame: bad magic, truncated, bad msgpack/lz4
    │   ├── FrameVersionError       protocol version this peer does not speak
    │   ├── FrameSchemaError        well-formed msgpack that breaks the frame schema
    │   ├── DtypeNotAllowedError    tensor dtype outside the allow-list
    │   ├── ShapeMismatchError      tensor name, shape or element count differs from the model
    │   ├── NonFiniteError          NaN or Inf in a floating-point tensor
    │   ├── UnknownSenderError      sender is not a configured/known peer
    │   ├── StaleFrameError         round/step already finished, or a duplicate
    │   ├── InboxFullError          too many unclaimed frames buffered from one sender
    │   └── RateLimitedError        a neighbour sends more than max_frames_per_second
    ├── MembershipError             a gossiped membership digest was refused (never fatal to a peer)
    ├── AuthError                   a credential was refused (the client gets a bare 401)
    │   ├── TokenFormatError, MissingTokenError, BadMacError, UnknownPeerError,
    │   └── WrongTargetError, WrongPurposeError, TokenExpiredError, TokenReplayedError, ReplayCacheFullError
    ├── TransportError              connection-level failure (connect, send, handshake)
    │   └── PeerTimeoutError        a named timeout expired while talking to a peer
    ├── TrainingDivergedError       the loss became NaN or Inf (e.g. after mixing in a poisoned model)
    ├── LocalRankError              a local rank of a multi-GPU peer died; the peer leaves the swarm
    └── RoundError                  a communication round could not complete
        ├── AllReduceIncompleteError  exact averaging impossible: contributions missing
        └── QuorumLostError         an exact round stayed below strategy.min_peers for quorum_timeout

Each :class:`FrameError` subclass has a short ``reason`` used as the key of the
``frames_rejected`` counters in ``/status`` and the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class P2PDLError(Exception):
    """Base of every error p2pdl raises on purpose."""


class ConfigError(P2PDLError):
    """A config file or CLI value is invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        assert self.problems, "ConfigError needs at least one problem"
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return f"invalid config: {self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid config ({len(self.problems)} problems):\n{lines}"


class WorkloadError(P2PDLError):
    """A workload file cannot be loaded or does not define what p2pdl needs."""


class FrameError(P2PDLError):
    """A frame received from the network was refused. The peer keeps running."""

    reason = "malformed"


class FrameTooLargeError(FrameError):
    reason = "too_large"


class FrameFormatError(FrameError):
    reason = "format"


class FrameVersionError(FrameError):
    reason = "version"


class FrameSchemaError(FrameError):
    reason = "schema"


class DtypeNotAllowedError(FrameError):
    reason = "dtype"


class ShapeMismatchError(FrameError):
    reason = "shape"


class NonFiniteError(FrameError):
    reason = "non_finite"


class UnknownSenderError(FrameError):
    reason = "unknown_sender"


class StaleFrameError(FrameError):
    reason = "stale"


class InboxFullError(FrameError):
    reason = "inbox_full"


class RateLimitedError(FrameError):
    reason = "rate_limited"


class MembershipError(P2PDLError):
    """A membership digest from the network was refused: malformed, oversized or not a digest.

    Counted under ``frames_rejected[reason]`` like a refused frame; the peer keeps running.
    """

    reason = "membership"


class AuthConfigError(ConfigError):
    """The secret or a TLS file is missing, unreadable or unusable. Never quotes the secret."""


class AuthError(P2PDLError):
    """A credential was refused. The peer keeps running; the client gets a bare 401."""

    reason = "unauthorized"


class TokenFormatError(AuthError):
    reason = "malformed"


class MissingTokenError(AuthError):
    reason = "missing"


class BadMacError(AuthError):
    reason = "bad_mac"


class UnknownPeerError(AuthError):
    reason = "unknown_peer"


class WrongTargetError(AuthError):
    reason = "wrong_target"


class WrongPurposeError(AuthError):
    reason = "wrong_purpose"


class TokenExpiredError(AuthError):
    reason = "expired"


class TokenReplayedError(AuthError):
    reason = "replayed"


class ReplayCacheFullError(AuthError):
    reason = "replay_cache_full"


class TransportError(P2PDLError):
    """A connection to a peer failed: connect, handshake or send."""


class PeerTimeoutError(TransportError):
    """A named timeout (``connect_timeout``, ``send_timeout``, ...) expired."""


class TrainingDivergedError(P2PDLError):
    """The loss is not finite: training cannot continue from this state."""


class LocalRankError(P2PDLError):
    """A local rank of a multi-GPU peer (``--nproc-per-node``) died; the message names it."""


class RoundError(P2PDLError):
    """A communication round could not complete."""


class AllReduceIncompleteError(RoundError):
    """Exact averaging was impossible because some peers' contributions never arrived.

    p2pdl never falls back to local values silently: the step fails loudly instead.
    """

    def __init__(self, round_index: int, missing: Sequence[str]) -> None:
        self.round_index = round_index
        self.missing: tuple[str, ...] = tuple(missing)
        super().__init__(
            f"all-reduce round {round_index} incomplete: no contribution from "
            f"{', '.join(self.missing)}; refusing to continue with a partial average"
        )


class QuorumLostError(RoundError):
    """An exact round could not gather ``strategy.min_peers`` members within ``quorum_timeout``.

    The peer did not train alone meanwhile; it names the configured peers it could not group with.
    """

    def __init__(self, round_index: int, missing: Sequence[str], have: int, need: int, waited: float) -> None:
        self.round_index = round_index
        self.missing: tuple[str, ...] = tuple(missing)
        self.have = have
        self.need = need
        super().__init__(
            f"exact round {round_index}: only {have} of the {need} peers a quorum needs agreed on a group "
            f"for {waited:.1f} s; missing {', '.join(self.missing) or 'none'}; refusing to train without a quorum"
        )
