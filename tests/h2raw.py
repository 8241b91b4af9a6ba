"""A raw HTTP/2 gRPC client for attack tests: it can stop a message short, never read answers
(an initial window of 0), and send from another loopback address (127.0.0.2), so an honest
client on 127.0.0.1 is another address to the peer.

It follows just enough of HTTP/2 to keep a gRPC server talking: the preface, SETTINGS (and
their ACK), PINGs, flow control on what it sends, and header blocks made of literal fields.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
INITIAL_WINDOW = 65535


def _literal(name: str, value: str) -> bytes:
    """HPACK literal header field without indexing, new name (lengths < 127, no Huffman)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def grpc_message(body: bytes, declared: int | None = None) -> bytes:
    """The gRPC length-prefixed message (declared length: len(body) unless told otherwise)."""
    return b"\x00" + struct.pack(">I", len(body) if declared is None else declared) + body


class RawH2:
    def __init__(self, endpoint: str, source: str = "127.0.0.2", read_window: int | None = None) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0))
        self.authority = endpoint
        self.lock = threading.Condition()
        self.send_window = {0: INITIAL_WINDOW}
        self.initial_send_window = INITIAL_WINDOW
        self.max_frame = 16384
        self.closed: dict[int, str] = {}  # stream -> "end" or "rst"
        self.goaway = False
        self.next_stream = 1
        settings = b"" if read_window is None else struct.pack(">HI", 4, read_window)  # INITIAL_WINDOW_SIZE
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0, settings))
        threading.Thread(target=self._read, daemon=True).start()

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def _read(self) -> None:
        try:
            while True:
                head = self._recv(9)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF
                self._on_frame(kind, flags, stream, self._recv(length))
        except (OSError, ConnectionError):
            with self.lock:
                self.goaway = True
                self.lock.notify_all()

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        with self.lock:
            if kind == SETTINGS and not flags & ACK:
                for i in range(0, len(payload), 6):
                    key, value = struct.unpack(">HI", payload[i : i + 6])
                    if key == 4:
                        delta = value - self.initial_send_window
                        self.initial_send_window = value
                        for s in self.send_window:
                            if s:
                                self.send_window[s] += delta
                    elif key == 5:
                        self.max_frame = value
                self.sock.sendall(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                self.sock.sendall(frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                self.send_window[stream] = self.send_window.get(stream, 0) + struct.unpack(">I", payload)[0]
            elif kind == RST_STREAM:
                self.closed[stream] = "rst"
            elif kind in (HEADERS, DATA) and flags & END_STREAM:
                self.closed.setdefault(stream, "end")
            elif kind == GOAWAY:
                self.goaway = True
            self.lock.notify_all()

    def open(self, method: str) -> int:
        with self.lock:
            stream, self.next_stream = self.next_stream, self.next_stream + 2
            self.send_window[stream] = self.initial_send_window
            block = b"".join(
                _literal(k, v)
                for k, v in (
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", f"/moe_swarm.v1.ExpertService/{method}"),
                    (":authority", self.authority),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                )
            )
            self.sock.sendall(frame(HEADERS, END_HEADERS, stream, block))
        return stream

    def send(self, stream: int, data: bytes, end: bool = False, timeout: float = 10.0) -> int:
        """Send as much of `data` as flow control allows within `timeout`; the bytes sent."""
        sent = 0
        while sent < len(data):
            with self.lock:
                ok = self.lock.wait_for(
                    lambda: (
                        self.goaway or stream in self.closed or min(self.send_window[0], self.send_window[stream]) > 0
                    ),
                    timeout,
                )
                if not ok or self.goaway or stream in self.closed:
                    return sent
                n = min(self.send_window[0], self.send_window[stream], self.max_frame, len(data) - sent)
                self.send_window[0] -= n
                self.send_window[stream] -= n
                last = end and sent + n == len(data)
                self.sock.sendall(frame(DATA, END_STREAM if last else 0, stream, data[sent : sent + n]))
            sent += n
        return sent

    def wait_closed(self, stream: int, timeout: float = 10.0) -> str | None:
        with self.lock:
            self.lock.wait_for(lambda: stream in self.closed or self.goaway, timeout)
            return self.closed.get(stream, "goaway" if self.goaway else None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
