"""Config validation at the edge, and the CLI's exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_ports, write_config

from p2pdl.cli import main
from p2pdl.config import Config, config_from_mapping, load_config, parse_address, with_overrides
from p2pdl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
WORKLOAD = str(REPO / "peers" / "mnist1d_cnn.py")


def peers(n: int, base: int = 29700) -> list[dict[str, str]]:
    return [{"name": f"p{i}", "address": f"127.0.0.1:{base + i}"} for i in range(n)]


def problems_of(data: dict[str, object]) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data)
    return info.value.problems


def test_every_shipped_config_loads() -> None:
    configs = sorted((REPO / "configs").glob("*.toml"))
    assert configs, "configs/ is empty"
    for path in configs:
        config = load_config(path)
        assert isinstance(config, Config)
        assert config.run.workload.is_file()


def test_defaults_are_sane() -> None:
    config = config_from_mapping({"run": {"workload": WORKLOAD}, "peers": peers(3)})
    assert config.strategy.kind == "gossip" and config.strategy.local_steps == 1
    assert config.topology.kind == "ring"
    # aiohttp's defaults (1 MiB bodies, 4 MiB WebSocket messages) would break real models.
    assert config.transport.max_frame_bytes >= 256 * 1024 * 1024


def test_all_problems_reported_together_with_their_keys() -> None:
    found = problems_of(
        {
            "run": {"workload": "/nonexistent/workload.py", "steps": 0, "colour": "blue"},
            "strategy": {"kind": "telepathy"},
            "topology": {"kind": "hypercube"},
            "transport": {"send_timeout": -1},
            "peers": [
                {"name": "a", "address": "127.0.0.1:1"},
                {"name": "a", "address": "127.0.0.1:1"},
            ],
            "extra": {},
        }
    )
    text = "\n".join(found)
    for fragment in (
        "run.steps",
        "run.colour: unknown key",
        "strategy.kind",
        "'telepathy'",
        "topology.kind",
        "transport.send_timeout",
        "extra: unknown section",
    ):
        assert fragment in text, f"{fragment!r} missing from:\n{text}"


def test_duplicate_names_ports_and_missing_workload() -> None:
    found = problems_of(
        {
            "run": {"workload": "/nonexistent/w.py"},
            "peers": [
                {"name": "a", "address": "127.0.0.1:5000"},
                {"name": "a", "address": "127.0.0.1:5001"},
                {"name": "b", "address": "127.0.0.1:5000"},
            ],
        }
    )
    text = "\n".join(found)
    assert "duplicate name 'a'" in text
    assert "127.0.0.1:5000 is already used" in text
    assert "run.workload" in text and "does not exist" in text


@pytest.mark.parametrize(
    ("section", "values", "fragment"),
    [
        ("run", {"lr": "fast"}, "run.lr: expected float"),
        ("run", {"steps": True}, "run.steps: expected int"),
        ("run", {"optimizer": "lbfgs"}, "run.optimizer"),
        ("strategy", {"round_timeout": 0}, "strategy.round_timeout must be > 0"),
        ("strategy", {"max_lead": -1}, "strategy.max_lead must be >= 0"),
        ("strategy", {"kind": "ps", "ps_mode": "async", "local_steps": 4}, "needs ps_mode = 'sync'"),
        ("transport", {"reconnect_initial": 9.0, "reconnect_max": 1.0}, "transport.reconnect_initial"),
        ("transport", {"max_frame_mib": 0}, "transport.max_frame_mib"),
        ("topology", {"kind": "torus", "rows": 5}, "topology"),
        ("topology", {"kind": "explicit", "edges": [["p0", "zz"]]}, "zz"),
    ],
)
def test_bad_values_name_the_key(section: str, values: dict[str, object], fragment: str) -> None:
    data: dict[str, object] = {"run": {"workload": WORKLOAD}, "peers": peers(4)}
    data[section] = {**data.get(section, {}), **values}  # type: ignore[dict-item]
    assert any(fragment in p for p in problems_of(data)), problems_of(data)


def test_bad_addresses() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_address("host:99999")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("nocolon")
    assert parse_address("[::1]:80") == ("::1", 80)
    found = problems_of({"run": {"workload": WORKLOAD}, "peers": [{"name": "x y", "address": "h"}]})
    assert len(found) == 2


def test_overrides_revalidate() -> None:
    config = config_from_mapping({"run": {"workload": WORKLOAD}, "peers": peers(2)})
    assert with_overrides(config, steps=7).run.steps == 7
    with pytest.raises(ConfigError, match="--device"):
        with_overrides(config, device="tpu")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_cli_bad_config_exits_2_listing_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        """
[run]
workload = "missing.py"
steps = -3
[topology]
kind = "moebius"
[[peers]]
name = "a"
address = "127.0.0.1:1"
[[peers]]
name = "a"
address = "127.0.0.1:1"
""",
    )
    code = main(["peer", "--config", str(path), "--name", "a"])
    err = capsys.readouterr().err
    assert code == 2
    for fragment in ("run.workload", "run.steps", "topology.kind", "duplicate name"):
        assert fragment in err
    assert "Traceback" not in err


def test_cli_rejects_unknown_name_and_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = REPO / "configs" / "ring4.toml"
    assert main(["peer", "--config", str(good), "--name", "nobody"]) == 2
    assert "nobody" in capsys.readouterr().err
    assert main(["peer", "--config", str(write(tmp_path, "[run\n")), "--name", "a"]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["peer", "--config", str(tmp_path / "absent.toml"), "--name", "a"]) == 2
    assert "cannot read config" in capsys.readouterr().err
    assert main(["peer", "--config", str(good), "--name", "p0", "--listen", "nonsense"]) == 2
    assert main(["peer", "--config", str(good), "--name", "p0", "--steps", "0"]) == 2


def test_cli_topology_prints_weights_and_spectral_gap(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", str(REPO / "configs" / "ring8.toml")]) == 0
    out = capsys.readouterr().out
    assert "0.8047" in out  # λ2 of the ring of 8: (1 + 2 cos(2π/8)) / 3
    assert "gap" in out.lower()


def test_cli_status_of_unreachable_peer_fails_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "127.0.0.1:9", "--timeout", "1"]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_console_script_entry_point_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pdl.cli", "topology", str(REPO / "configs" / "torus16.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "0.6000" in result.stdout  # λ2 of the 4x4 torus


def test_compression_is_refused_for_ps_local_sgd() -> None:
    data: dict[str, object] = {
        "run": {"workload": WORKLOAD},
        "peers": peers(4),
        "strategy": {"kind": "ps", "local_steps": 4},
        "compression": {"kind": "int8"},
    }
    assert any("ps with local_steps = 1" in p for p in problems_of(data)), problems_of(data)


def test_membership_must_outlast_a_round() -> None:
    """A round waiting for a slow partner times out before membership declares that partner dead."""
    data = {
        "run": {"workload": str(REPO / "peers" / "mnist1d_cnn.py")},
        "peers": peers(2),
        "strategy": {"kind": "allreduce", "round_timeout": 30.0},
    }
    assert any(
        "membership.dead_after (20.0 s) must be > strategy.round_timeout (30.0 s)" in p for p in problems_of(data)
    )
    config = config_from_mapping({**data, "membership": {"suspect_after": 30.0, "dead_after": 60.0}})
    assert config.membership.dead_after == 60.0
    config = config_from_mapping({**data, "strategy": {"kind": "allreduce"}})  # the defaults agree
    assert config.membership.dead_after > config.strategy.round_timeout


def test_allreduce_refuses_peer_names_too_long_to_name_a_group_in_a_frame() -> None:
    long_names = [
        {"name": f"peer-with-a-long-hostname-{i:02d}.example", "address": f"127.0.0.1:{9000 + i}"} for i in range(8)
    ]
    data: dict[str, object] = {"run": {"workload": WORKLOAD}, "peers": long_names, "strategy": {"kind": "allreduce"}}
    assert any("295 characters, more than 256" in p for p in problems_of(data)), problems_of(data)
    config_from_mapping({**data, "strategy": {"kind": "gossip"}})  # gossip names no group: accepted
    config_from_mapping({**data, "peers": long_names[:6]})  # 221 characters: accepted


def test_test_configs_keep_membership_above_the_round_timeout(tmp_path: Path) -> None:
    """helpers.write_config: a slow round must time out before membership declares partners dead."""
    names, ports = ["p0", "p1"], free_ports(2)
    with pytest.raises(ValueError, match="dead_after"):
        write_config(tmp_path / "a.toml", names=names, ports=ports, strategy={"round_timeout": 5.0},
                     membership={"suspect_after": 2.0, "dead_after": 5.0})  # fmt: skip
    # Without a membership table, one is written that outlasts a long round.
    path = write_config(tmp_path / "b.toml", names=names, ports=ports, strategy={"round_timeout": 30.0})
    config = load_config(path)
    assert config.membership.dead_after > config.strategy.round_timeout
    # A short round keeps p2pdl's defaults.
    path = write_config(tmp_path / "c.toml", names=names, ports=ports, strategy={"round_timeout": 2.0})
    config = load_config(path)
    assert config.membership.dead_after > config.strategy.round_timeout == 2.0
