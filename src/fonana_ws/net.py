"""Who is on the other end: the real client address behind a trusted proxy."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any


def peer_host(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return client[0] if client else ""


def forwarded_hops(scope: dict[str, Any]) -> list[str] | None:
    """The addresses of every ``X-Forwarded-For`` header in order, or None when there is none or any
    hop is not an IP address (then nothing in the header can be trusted: it is ignored)."""
    values = [value for name, value in scope.get("headers", []) if name == b"x-forwarded-for"]
    if not values:
        return None
    hops = []
    for value in values:
        for hop in value.decode("latin-1").split(","):
            hop = hop.strip()
            if not hop:
                continue
            try:
                hops.append(str(ipaddress.ip_address(hop)))
            except ValueError:
                return None
    return hops or None


def client_address(scope: dict[str, Any], trusted: Iterable[str]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, from X-Forwarded-For.

    The rightmost address not itself a trusted proxy is the one the nearest trusted proxy saw. A header
    with anything but IP addresses in it (``6.6.6.6 user=x``, ``unknown``, a port) is ignored, so what is
    returned is always the peer's address or a valid IP address.
    """
    trusted = set(trusted)
    host = peer_host(scope)
    if host not in trusted:
        return host
    hops = forwarded_hops(scope)
    if hops is None:
        return host
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
    return hops[0]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, and IPv4-mapped loopback (what a server listening on ``::`` sees)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def is_local_request(scope: dict[str, Any]) -> bool:
    """From loopback, and not forwarded by a proxy on someone else's behalf."""
    if not is_loopback(peer_host(scope)):
        return False
    return not any(name in (b"x-forwarded-for", b"forwarded", b"x-real-ip") for name, _ in scope["headers"])
