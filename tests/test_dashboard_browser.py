"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``) over a 4-peer swarm.

It opens one peer's page, waits until it shows 4 live peers and rising steps with no JavaScript
console errors, SIGKILLs another peer and waits until the page marks it dead, and saves a
screenshot as a test artifact (under ``$P2PDL_TEST_ARTIFACTS`` when set, else the test's tmp dir).
Without Chromium the test is skipped locally and fails under CI (``CI=true``), where
``.ci/prereqs-browser.sh`` installs it.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PeerProcesses, free_ports

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _browser_problem() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).is_file() and os.access(path, os.X_OK)) and shutil.which(Path(path).name) is None:
            return f"{path} is missing (apt-get install chromium chromium-driver, or .ci/prereqs-browser.sh)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    problem = _browser_problem()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI: {problem}")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never tries to download anything.
    service = Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rows(driver: Any) -> dict[str, tuple[str, int | None]]:
    """What the members table shows: name -> (state, step)."""
    found = driver.execute_script(
        "return Array.from(document.querySelectorAll('#members tbody tr'))"
        ".map(r => [r.dataset.name, r.dataset.state, r.dataset.step]);"
    )
    return {name: (state, int(step) if step else None) for name, state, step in found}


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_dashboard_shows_a_live_swarm_and_a_killed_peer(
    browser: Any, peer_processes: PeerProcesses, config_writer: Callable[..., Path], tmp_path: Path
) -> None:
    names = ["p0", "p1", "p2", "p3"]
    ports = free_ports(4)
    config = config_writer(
        names=names,
        ports=ports,
        run={"steps": 100_000, "eval_every": 20, "batch_size": 16, "torch_threads": 1},
        strategy={"kind": "gossip", "round_timeout": 2.0},
        membership={"gossip_interval": 0.5, "suspect_after": 2.0, "dead_after": 4.0, "gossip_timeout": 1.0},
    )
    for name in names:
        peer_processes.start(config, name)
    port = ports[0]
    wait_for(lambda: healthy(port), 180, "p0 to serve")

    browser.get(f"http://127.0.0.1:{port}/")
    shown = wait_for(
        lambda: (r := rows(browser)) and sum(s in ("alive", "suspect") for s, _ in r.values()) == 4 and r,
        240,
        "the page to show 4 live peers",
    )
    assert browser.find_element("id", "summary").get_attribute("data-live") == "4"
    first = {name: step or 0 for name, (_, step) in shown.items()}
    wait_for(
        lambda: all((rows(browser)[n][1] or 0) > first[n] for n in names), 120, "every peer's step to rise on the page"
    )
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors

    peer_processes.procs["p3"].kill()  # SIGKILL: no leave is announced
    wait_for(lambda: rows(browser)["p3"][0] == "dead", 60, "p3 to be marked dead")
    node_state = browser.execute_script(
        "return document.querySelector('#graph g[data-name=\"p3\"]').getAttribute('data-state');"
    )
    assert node_state == "dead"
    wait_for(lambda: "death" in browser.find_element("id", "events").text, 30, "the death in the timeline")
    assert browser.find_element("id", "summary").get_attribute("data-live") == "3"

    artifacts = Path(os.environ.get("P2PDL_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
