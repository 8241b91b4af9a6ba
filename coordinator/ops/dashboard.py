"""`moe-swarm dashboard`: a live web page of what `moe-swarm status` shows.

The coverage map (layers x experts, each cell coloured by its serving replicas and shaded by
their load) and the peers' health, from the same DHT reads as `status` (coordinator/ops/status.py).
One background thread runs an asyncio loop that re-reads the DHT every --refresh seconds and
swaps in a new snapshot; HTTP handlers only serve that snapshot, so page views never cost DHT
lookups. The page (dashboard.html, next to this file) polls GET /api/status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from coordinator.ops.status import add_swarm_view_args, collect, join_swarm, resolve_uids
from protos.plumbing.files import write_json_atomic

PAGE = Path(__file__).with_name("dashboard.html")
FIRST_SNAPSHOT_WAIT = 60.0  # seconds the ready file waits for the first DHT read (a scan takes a few lookups)


def add_dashboard_args(p: argparse.ArgumentParser) -> None:
    add_swarm_view_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8700, help="TCP port (default 8700; 0 picks a free one)")
    p.add_argument("--refresh", type=float, default=2.0, help="seconds between DHT reads and page updates (default 2)")
    p.add_argument(
        "--ready-file", type=Path, default=None, help='write {"url": ..., "pid": ...} here as JSON once serving'
    )


class Snapshots:
    """The latest DHT read, refreshed by one asyncio loop in a background thread."""

    def __init__(self, dht, args: argparse.Namespace, model_id: str, uids: list[str] | None, grid: str) -> None:
        self.dht, self.args, self.model_id, self.uids, self.grid = dht, args, model_id, uids, grid
        self.first = threading.Event()  # set after the first read, successful or not
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {
            "model_id": model_id,
            "refresh": args.refresh,
            "status": None,
            "updated": None,
            "error": None,
        }
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), name="dashboard-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def latest(self) -> dict[str, Any]:
        with self._lock:
            return self._doc

    async def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            update: dict[str, Any]
            try:
                status = await collect(
                    self.dht, self.model_id, self.uids, self.grid, self.args.layers, self.args.experts
                )
                update = {"status": status.to_json(), "updated": time.time(), "error": None}
            except Exception as e:  # keep serving the last good map, with the reason it is stale
                update = {"error": f"{type(e).__name__}: {e}"}
            with self._lock:
                self._doc = {**self._doc, **update}  # a new dict: handlers may be serializing the old one
            self.first.set()
            # sleep in short steps so SIGINT/SIGTERM stops the loop promptly
            while not self._stop.is_set() and time.monotonic() - started < self.args.refresh:
                await asyncio.sleep(min(0.2, self.args.refresh))


def make_handler(snapshots: Snapshots, page: bytes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(page, "text/html; charset=utf-8")
            elif path == "/api/status":
                body = {**snapshots.latest(), "now": time.time()}  # `now`: the page shows the map's age
                self._send(json.dumps(body).encode(), "application/json")
            else:
                self.send_error(HTTPStatus.NOT_FOUND)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # a poll every few seconds: keep stderr quiet
            pass

    return Handler


def run_dashboard(args: argparse.Namespace) -> int:
    if args.refresh <= 0:
        raise ValueError(f"--refresh must be positive, got {args.refresh}")
    model_id, uids, grid = resolve_uids(args)  # checkpoint/model-id errors before joining the swarm
    try:  # bind before joining the swarm: a taken port is one error line, at once
        server = ThreadingHTTPServer((args.host, args.port), BaseHTTPRequestHandler)
    except OSError as e:
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    server.daemon_threads = True
    dht = join_swarm(args.initial_peers)
    if dht is None:
        server.server_close()
        return 1
    snapshots = Snapshots(dht, args, model_id, uids, grid)
    server.RequestHandlerClass = make_handler(snapshots, PAGE.read_bytes())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True)
    try:
        snapshots.start()
        serving.start()
        host, port = server.server_address[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        print(f"moe-swarm dashboard of {model_id}: {url}", flush=True)
        # the ready file promises a page with data: wait for the first read (or stop)
        deadline = time.monotonic() + FIRST_SNAPSHOT_WAIT
        while not stop.is_set() and not snapshots.first.wait(0.2) and time.monotonic() < deadline:
            pass
        if args.ready_file and not stop.is_set():
            write_json_atomic(args.ready_file, {"url": url, "pid": os.getpid()})
        stop.wait()
    finally:
        if serving.is_alive():
            server.shutdown()
        server.server_close()
        snapshots.stop()
        dht.shutdown()
    return 0
