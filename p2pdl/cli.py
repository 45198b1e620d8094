"""The ``p2pdl`` command: ``peer`` runs one peer, ``status`` asks a peer, ``topology`` explains one.

``status --watch`` keeps a live table of every member on screen, from that one peer's view.

Exit codes: 0 done; 1 training failed (e.g. an exact all-reduce could not complete); 2 bad
config or command line, with one message listing every problem; 130 interrupted before start.
Logging handlers are installed here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from p2pdl._malloc import tune_allocator
from p2pdl.config import Config, load_config, parse_address, with_overrides
from p2pdl.core.topology import build_graph, describe
from p2pdl.errors import ConfigError, P2PDLError
from p2pdl.faults import load as load_faults
from p2pdl.net.auth import security_from_config
from p2pdl.obs.watch import watch
from p2pdl.peer.node import resolve_device
from p2pdl.train.hybrid import LocalRanks, local_rank_problems
from p2pdl.train.loop import PeerOptions, run_peer

log = logging.getLogger("p2pdl")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Wire tensors are read-only views of received bytes, only ever read; see p2pdl.wire.decode.
    warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pdl", description="Peer-to-peer decentralized training.")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more logging (default: info; -v: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    peer = sub.add_parser("peer", help="run one peer until its steps are done")
    peer.add_argument("--config", required=True, type=Path, help="TOML config file")
    peer.add_argument("--name", required=True, help="this peer's name in [[peers]]")
    peer.add_argument("--listen", help="HOST:PORT to bind (default: the configured address)")
    peer.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override run.device")
    peer.add_argument("--steps", type=int, help="override run.steps")
    peer.add_argument("--out", type=Path, help="output directory (default runs/NAME)")
    peer.add_argument(
        "--advertise", help="HOST:PORT other peers dial (default: the configured address; a joiner's listen address)"
    )
    peer.add_argument("--bootstrap", action="append", default=[], help="HOST:PORT of a live peer (repeatable)")
    peer.add_argument("--join", action="store_true", help="download the swarm's current state before training")
    peer.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    peer.add_argument(
        "--snapshot-every",
        type=int,
        default=0,
        help="save parameters every N steps under OUT/snapshots (0: off)",
    )
    peer.add_argument(
        "--observe", metavar="HOST:PORT", help="serve /metrics and the dashboard here too (overrides observe.listen)"
    )
    peer.add_argument(
        "--tensorboard", type=Path, metavar="DIR", help="write TensorBoard event files to DIR (needs tensorboard)"
    )
    peer.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="K",
        help="train this peer on K local ranks under torch.distributed (one per GPU on CUDA; default 1)",
    )

    status = sub.add_parser("status", help="print a peer's /status")
    status.add_argument("url", help="http://HOST:PORT of a peer, or HOST:PORT")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.add_argument("--config", type=Path, help="the swarm's config, for its secret and TLS files")
    status.add_argument("--watch", action="store_true", help="a live table of every member, from this peer's view")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch")
    status.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    status.add_argument(
        "--token-env", metavar="VAR", help="environment variable with the metrics token (for an [observe] server)"
    )

    topology = sub.add_parser("topology", help="print a config's graph, weights and spectral gap")
    topology.add_argument("config", type=Path)
    return parser


def _load(path: Path, *, steps: int | None = None, device: str | None = None) -> Config:
    config = load_config(path)
    if steps is not None and steps < 1:
        raise ConfigError([f"--steps must be >= 1, got {steps}"])
    return with_overrides(config, steps=steps, device=device)


def _cmd_topology(args: argparse.Namespace) -> int:
    config = _load(args.config)
    graph = build_graph(
        config.topology.kind,
        config.peer_names,
        rows=config.topology.rows,
        cols=config.topology.cols,
        center=config.topology.center,
        edges=config.topology.edges,
    )
    print(f"topology: {config.topology.kind} over {len(config.peers)} peers ({args.config})")
    print(describe(graph))
    return EXIT_OK


class _PeerReader:
    """GETs JSON from one peer, with the swarm's HMAC tokens or a metrics token when configured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._security = None
        self._context = None
        scheme = "http"
        if args.config is not None:
            self._security = security_from_config(_load(args.config).security, "p2pdl-cli")
            self._context, scheme = self._security.client_ssl, self._security.scheme
        self._bearer: dict[str, str] = {}
        if args.token_env is not None:
            token = os.environ.get(args.token_env)
            if not token:
                raise ConfigError([f"--token-env: environment variable {args.token_env!r} is not set"])
            self._bearer = {"Authorization": f"Bearer {token}"}
        self.url = (args.url if args.url.startswith(("http://", "https://")) else f"{scheme}://{args.url}").rstrip("/")
        self._timeout = args.timeout
        self._target: str | None = None

    def get(self, path: str) -> Any:
        """The JSON at ``path``; OSError (urllib's errors included) for any failure."""
        headers = dict(self._bearer)
        if self._security is not None and self._security.secret is not None:
            if path != "/status" and self._target is None:
                # Tokens for routes other than /status name their target: learn the peer's name once.
                self._target = str(self.get("/status")["name"])
            target = None if path == "/status" else self._target
            headers.update(self._security.headers(target=target, method="GET", path=path))
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=self._timeout, context=self._context) as response:
            try:
                return json.loads(response.read())
            except ValueError as exc:
                raise OSError(f"{self.url}{path} did not answer JSON: {exc}") from exc


def _cmd_status(args: argparse.Namespace) -> int:
    reader = _PeerReader(args)
    if args.watch:
        if args.interval <= 0 or (args.count is not None and args.count < 1):
            raise ConfigError(["--interval must be > 0 seconds and --count >= 1"])

        def fetch() -> Mapping[str, Any]:
            swarm: Mapping[str, Any] = reader.get("/api/swarm")
            return swarm

        succeeded = watch(fetch, console=Console(), interval=args.interval, count=args.count)
        return EXIT_OK if succeeded else EXIT_FAILED
    try:
        body = reader.get("/status")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        print(f"p2pdl status: cannot read {reader.url}/status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(body, indent=2))
    return EXIT_OK


async def _run_peer(config: Config, name: str, options: PeerOptions, nproc: int = 1) -> int:

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if nproc > 1:  # a multi-GPU peer: this process is local rank 0 (p2pdl.train.hybrid)
            device = resolve_device(config.run.device)
            async with LocalRanks(config, name, nproc, device, options.out_dir) as local:
                summary = await local.supervise(run_peer(config, name, options, stop, local=local))
        else:
            summary = await run_peer(config, name, options, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    headline = summary["headline"]
    value = headline["value"]
    log.warning(
        "%s finished: %d steps, %s %s, %s",
        name,
        summary["steps"],
        headline["metric"].replace("_", " "),
        "n/a" if value is None else f"{value:.4f}",
        "stopped early" if summary["stopped_early"] else "complete",
    )
    return EXIT_OK


def _cmd_peer(args: argparse.Namespace) -> int:
    config = with_overrides(_load(args.config, steps=args.steps, device=args.device), observe_listen=args.observe)
    problems = []
    if config.peer(args.name) is None and args.listen is None:
        problems.append(
            f"--name {args.name!r} is not in [[peers]] (known: {', '.join(config.peer_names) or 'none'}); "
            "a joining peer needs --listen HOST:PORT and a bootstrap address"
        )
    for flag, values in (
        ("--listen", [args.listen]),
        ("--advertise", [args.advertise]),
        ("--bootstrap", args.bootstrap),
    ):
        for value in values:
            if value is None:
                continue
            try:
                parse_address(value)
            except ValueError as exc:
                problems.append(f"{flag}: {exc}")
    if problems:
        raise ConfigError(problems)
    if args.snapshot_every < 0:
        raise ConfigError([f"--snapshot-every must be >= 0, got {args.snapshot_every}"])
    device = resolve_device(config.run.device) if args.nproc_per_node > 1 else None
    run = config.run
    if problems := local_rank_problems(
        args.nproc_per_node,
        device,
        run.batch_size,
        accumulate=run.accumulate,
        precision=run.precision,
        param_dtype=run.param_dtype,
    ):
        raise ConfigError(problems)
    load_faults()  # a malformed P2PDL_FAULT fails here, by name
    out = args.out if args.out is not None else Path("runs") / args.name
    runner = _event_loop_runner()
    with runner:
        options = PeerOptions(
            out_dir=out,
            listen=args.listen,
            advertise=args.advertise,
            bootstrap=tuple(args.bootstrap),
            join=args.join,
            resume=args.resume,
            snapshot_every=args.snapshot_every,
            tensorboard=args.tensorboard,
        )
        return runner.run(_run_peer(config, args.name, options, args.nproc_per_node))


def _event_loop_runner() -> asyncio.Runner:
    """uvloop where available: it moves large WebSocket frames faster than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def main(argv: Sequence[str] | None = None) -> int:
    # First, before any large buffer exists: see p2pdl._malloc for why.
    tune_allocator()
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "topology":
            return _cmd_topology(args)
        if args.command == "status":
            return _cmd_status(args)
        return _cmd_peer(args)
    except ConfigError as exc:
        print(f"p2pdl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except P2PDLError as exc:
        print(f"p2pdl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
