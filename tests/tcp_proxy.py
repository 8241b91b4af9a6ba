"""A recording TCP proxy on 127.0.0.1: what a network observer between two processes sees."""

from __future__ import annotations

import contextlib
import socket
import threading

from coordinator.sim.local_swarm import free_port  # noqa: F401  (tests import it from here)


class RecordingProxy:
    def __init__(self, target_port: int, listen_port: int = 0) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.server.getsockname()[1]
        self.captured = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    self.captured += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def seen(self, needle: bytes) -> bool:
        with self._lock:
            return needle in self.captured

    def close(self) -> None:
        self.server.close()

