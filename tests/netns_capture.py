"""A packet capture inside a test's network namespace (no tcpdump needed): every frame seen on
the namespace's interfaces, appended raw to a file, until a stop file appears.

    ip netns exec NS python -m tests.netns_capture OUT STOP READY
"""

from __future__ import annotations

import select
import socket
import sys
from pathlib import Path

ETH_P_ALL = 0x0003


def main() -> None:
    out, stop, ready = (Path(a) for a in sys.argv[1:4])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    ready.write_text("capturing")
    with open(out, "wb") as f:
        while not stop.exists():
            if select.select([sock], [], [], 0.1)[0]:
                f.write(sock.recv(65535))
        while select.select([sock], [], [], 0.2)[0]:  # what is still queued
            f.write(sock.recv(65535))


if __name__ == "__main__":
    main()
