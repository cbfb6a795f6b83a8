"""Client addresses: which one a request comes from (behind trusted proxies), and the form the
key-check script compares with a key's allowed networks.

The script compares 128-bit addresses as 32 hex digits, IPv4 mapped into IPv6
(``::ffff:a.b.c.d``), against networks stored as ``<32 hex digits>/<prefix bits>``; so one
comparison covers both families and Redis needs no address parsing of its own.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Any

_IPV4_MAPPED_BITS = 96


@functools.lru_cache(maxsize=4096)
def address_hex(address: str) -> str:
    """``"203.0.113.7"`` -> 32 hex digits of its IPv6-mapped form; '' when not an address."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(parsed, ipaddress.IPv4Address):
        parsed = ipaddress.IPv6Address(f"::ffff:{parsed}")
    return f"{int(parsed):032x}"


def network_form(network: str) -> str:
    """``"10.0.0.0/8"`` -> the stored form ``<hex>/<bits>`` (IPv4 counted in the mapped space)."""
    parsed = ipaddress.ip_network(network, strict=False)
    if isinstance(parsed, ipaddress.IPv4Network):
        mapped = ipaddress.IPv6Address(f"::ffff:{parsed.network_address}")
        return f"{int(mapped):032x}/{parsed.prefixlen + _IPV4_MAPPED_BITS}"
    return f"{int(parsed.network_address):032x}/{parsed.prefixlen}"


class ClientAddresses:
    """The address a request comes from: the peer's, unless the peer is a trusted proxy; then
    the right-most ``X-Forwarded-For`` entry that is not one (entries left of it could have
    been written by the client itself)."""

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self._trusted = tuple(_unmapped(ipaddress.ip_network(n)) for n in trusted_proxies)

    def of(self, environ: Mapping[str, Any]) -> str:
        peer = str(environ.get("REMOTE_ADDR") or "")
        if not self._trusted or not self._is_trusted(peer):
            return peer
        forwarded = str(environ.get("HTTP_X_FORWARDED_FOR") or "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        return _within(address, self._trusted)


def _unmapped(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``::ffff:10.0.0.0/104`` is ``10.0.0.0/8``: addresses are compared unmapped too."""
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= _IPV4_MAPPED_BITS:
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - _IPV4_MAPPED_BITS}")
    return network


@functools.lru_cache(maxsize=4096)
def _within(
    address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    return any(parsed in network for network in networks)
