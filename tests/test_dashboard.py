"""`moe-swarm dashboard` against the session swarm, rendered end to end in headless Chromium.

The session swarm serves 2 layers x 8 experts (peer-a `*:0-3`, peer-b `*:4-7`); the dashboard is
told there are 9 experts per layer, so expert 8 of each layer has no replica. `make test`
installs Debian's chromium package when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from protos import toy_model
from protos.records import expert_uid

from .conftest import PEER_SPECS, TINY, peer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXPERTS = TINY.num_experts + 1  # one more than anybody serves
WINDOW = (1280, 900)


@pytest.fixture(scope="module")
def dashboard(swarm, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """(process, page URL, model id, log path) of a dashboard subprocess in its own process group."""
    model_id = toy_model.read_manifest(tiny_checkpoint).model_id
    workdir = tmp_path_factory.mktemp("dashboard")
    ready = workdir / "ready.json"
    argv = ["dashboard", "--initial-peers", *swarm.initial_peers, "--model", model_id]
    argv += ["--layers", str(TINY.num_layers), "--experts", str(EXPERTS), "--port", "0", "--refresh", "1"]
    log_path = workdir / "dashboard.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator", *argv, "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its DHT process and p2pd join its group: one killpg cleans up
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "dashboard not ready in 60 s"
            time.sleep(0.2)
        yield proc, json.loads(ready.read_text())["url"], model_id, log_path
    finally:
        _stop_group(proc, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # leftovers of the group (p2pd) once the leader is gone
        os.killpg(proc.pid, signal.SIGKILL)


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run headless Chromium on url; its stdout. Its renderer and helper processes share its process group."""
    assert CHROMIUM, "chromium is not installed: `make test` installs it (apt-get install chromium)"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    # virtual time: the page's polls run (refresh 1 s) without the test waiting 4 s of wall time
    argv += [f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=4000", *args, url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        _stop_group(proc, signal.SIGKILL)
    assert proc.returncode == 0, err[-2000:]
    return out


class DomScan(HTMLParser):
    """The coverage cells' and peer rows' data attributes of a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[int, int], int] = {}  # (layer, expert) -> serving replicas
        self.peers: dict[str, str] = {}  # peer id -> state
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "cell" in (a.get("class") or "").split():
            self.cells[int(a["data-layer"]), int(a["data-expert"])] = int(a["data-replicas"])
        elif tag == "tr" and a.get("class") == "peer":
            self.peers[a["data-peer-id"]] = a["data-state"]
        elif tag == "body":
            self.body = a


def test_page_renders_the_coverage_map_and_peers(swarm, dashboard, tmp_path):
    _, url, _, _ = dashboard
    scan = DomScan()
    scan.feed(chromium(tmp_path, url, "--dump-dom"))
    assert int(scan.body["data-fetches"]) >= 1  # rendered from /api/status by the page's own polling
    assert len(scan.cells) == TINY.num_layers * EXPERTS
    assert sorted(k for k, n in scan.cells.items() if n == 0) == [(la, TINY.num_experts) for la in range(2)]
    assert sum(n >= 1 for n in scan.cells.values()) == TINY.num_layers * TINY.num_experts
    assert scan.peers == {peer(swarm, name).info["peer_id"]: "online" for name in PEER_SPECS}


def test_screenshot_shows_the_map(dashboard, tmp_path):
    _, url, _, _ = dashboard
    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, url, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == WINDOW
        rgb = img.convert("RGB")
    colors = rgb.getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    assert len(colors) > 20  # text, a green map, red cells: not a blank page
    # the two no-replica cells (34x26 px each, hsl(0,75%,48%) ~ rgb(214,31,31)) are visibly red
    red = sum(n for n, (r, g, b) in colors if r > 180 and g < 80 and b < 80)
    assert red > 2 * 34 * 26 // 2, red


def test_api_status_lists_the_missing_experts(swarm, dashboard):
    _, url, model_id, _ = dashboard
    with urllib.request.urlopen(url + "api/status", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        doc = json.load(resp)
    assert doc["error"] is None and doc["model_id"] == model_id and doc["refresh"] == 1.0
    status = doc["status"]
    assert status["grid"] == "flags" and len(status["experts"]) == TINY.num_layers * EXPERTS
    assert status["missing"] == [expert_uid(model_id, la, TINY.num_experts) for la in range(TINY.num_layers)]
    assert {p["peer_id"]: p["hosts"] for p in status["peers"]} == {
        peer(swarm, "peer-a").info["peer_id"]: "0:0-3,1:0-3",
        peer(swarm, "peer-b").info["peer_id"]: "0:4-7,1:4-7",
    }


def test_ctrl_c_stops_it_cleanly(dashboard):
    proc, _, _, log_path = dashboard
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C signals the whole group: it, its DHT process and p2pd
    assert proc.wait(timeout=20) == 0
    log = log_path.read_text()
    assert "moe-swarm dashboard of" in log and "Traceback" not in log, log
