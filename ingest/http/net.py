"""The sender's address, believed only from the peer (or a trusted proxy), and kept only anonymised."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from aiohttp import web

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)  # peers repeat (proxies, NAT, keep-alive): parse each once
def _parse(value: str) -> Address | None:
    try:
        ip = ipaddress.ip_address(value.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(request: web.Request, trusted: Sequence[Network]) -> Address | None:
    """The TCP peer, or, when the peer is a trusted proxy, the right-most untrusted X-Forwarded-For hop."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    ip = _parse(peer[0]) if peer else None
    if ip is None or not trusted or not any(ip in net for net in trusted):
        return ip
    hops = [h for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if h.strip()]
    for hop in reversed(hops):
        hop_ip = _parse(hop)
        if hop_ip is None:
            return ip  # a malformed chain is not believed past the last proxy we trust
        if not any(hop_ip in net for net in trusted):
            return hop_ip
        ip = hop_ip
    return ip


@functools.lru_cache(maxsize=4096)
def anonymise(ip: Address | None) -> Network | None:
    """IPv4 to its /24, IPv6 to its /48: the only form an address is ever stored in."""
    if ip is None:
        return None
    prefix = 24 if ip.version == 4 else 48
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


@functools.lru_cache(maxsize=4096)
def anonymised_text(ip: Address | None) -> str | None:
    """anonymise(ip) as text ("192.0.2.0/24"): what is stored (cast to cidr in SQL) and rate-limited by."""
    net = anonymise(ip)
    return None if net is None else str(net)
