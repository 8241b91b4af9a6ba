"""What a DHT record may name as a peer's gRPC endpoint: `host:port`, nothing else.

A record is written by whoever holds the owner key, so its endpoint is untrusted input that
decides where coordinators connect. Only `host:port` passes: a DNS name, an IPv4 address or
a bracketed IPv6 address, and a port in 1-65535. No scheme (`dns:`, `ipv4:`, `unix:`, ...),
no path, no user info, no query: gRPC would otherwise dial whatever target they name.
Whether a loopback or private address is acceptable depends on the swarm (a swarm on one
machine or a LAN needs them; a public one must not let a record aim coordinators at their
own network), so that is a separate question, `is_local_host`, that the coordinator asks.
"""

from __future__ import annotations

import ipaddress
import re

from .limits import MAX_ENDPOINT_LEN

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")
_ENDPOINT_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})$")
LOCAL_NAMES = frozenset({"localhost", "localhost.", "localhost.localdomain"})
# gRPC reads `NAME:rest` as a target of scheme NAME: "unix:80" is the socket file "80"
GRPC_SCHEMES = frozenset({"unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock", "xds", "google-c2p"})


def parse_endpoint(endpoint: object) -> tuple[str, int]:
    """(host, port) of a `host:port` endpoint (IPv6 hosts without their brackets); ValueError otherwise."""
    if not isinstance(endpoint, str) or not 0 < len(endpoint) <= MAX_ENDPOINT_LEN:
        raise ValueError(f"bad endpoint {endpoint!r}: a host:port string of at most {MAX_ENDPOINT_LEN} characters")
    match = _ENDPOINT_RE.fullmatch(endpoint)
    if match is None:
        raise ValueError(f"bad endpoint {endpoint!r}: only host:port (no scheme, path or unix socket)")
    host, port = match["host"], int(match["port"])
    if host.lower() in GRPC_SCHEMES:
        raise ValueError(f"bad endpoint {endpoint!r}: {host!r} is a gRPC target scheme, not a host")
    if not 0 < port < 65536:
        raise ValueError(f"bad endpoint {endpoint!r}: port out of range")
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad endpoint {endpoint!r}: not an IPv6 address in brackets") from None
    elif not _is_ipv4(host) and (host.replace(".", "").isdigit() or not _DNS_RE.fullmatch(host)):
        raise ValueError(f"bad endpoint {endpoint!r}: host is neither an IPv4 address nor a DNS name")
    return host, port


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def is_local_host(host: str) -> bool:
    """Loopback, private, link-local, unspecified or otherwise not globally routable: an address
    a public swarm's record must not point coordinators at. DNS names other than localhost are
    not resolved here (they count as public)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return not (mapped or address).is_global
