"""p2pdl: peer-to-peer decentralized deep-learning training over aiohttp.

The public API is small: load a :class:`Config`, then train with a :class:`Peer`::

    config = p2pdl.load_config("configs/ring4.toml")
    async with p2pdl.Peer(config, "p0", model, optimizer) as peer:
        for batch in batches:
            result = await peer.step(closure)

Everything not listed in ``__all__`` is private.
"""

from p2pdl.config import Config, load_config
from p2pdl.errors import (
    AllReduceIncompleteError,
    ConfigError,
    FrameError,
    P2PDLError,
    RoundError,
    TrainingDivergedError,
    TransportError,
    WorkloadError,
)
from p2pdl.peer.node import Peer, StepResult
from p2pdl.strategies.base import RoundOutcome

__all__ = [
    "AllReduceIncompleteError",
    "Config",
    "ConfigError",
    "FrameError",
    "P2PDLError",
    "Peer",
    "RoundError",
    "RoundOutcome",
    "StepResult",
    "TrainingDivergedError",
    "TransportError",
    "WorkloadError",
    "load_config",
]
__version__ = "0.1.0"
