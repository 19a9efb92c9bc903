"""Which webhook URLs the farm sends to: the URL's form (:func:`check_webhook_url`, used by job
specs and the per-user default) and the addresses it may reach (:class:`AddressPolicy`).

Only ``http`` and ``https``, no user name or password in the URL, at most 2,048 characters.
A host must be public: private, loopback, link-local, multicast, reserved, shared (CGNAT) and
unspecified addresses are refused, IPv4 and IPv6 alike (an IPv4 address inside IPv6, mapped,
6to4 or Teredo, is judged as the IPv4 address), unless ``webhooks.allow_hosts`` names the host
or a network holding the address. A literal address is judged at submit; a name is resolved and
judged at every delivery, and the delivery connects to the address that was judged.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
HOST_NAME_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?)*\.?"
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(ValueError):
    """A webhook's host is, or resolves to, an address the farm does not send to."""


def check_webhook_url(url: str) -> SplitResult:
    """The URL split, or :class:`ValueError` saying what is wrong with it."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"must be at most {MAX_URL_CHARS} characters")
    if any(ord(ch) <= 32 or ord(ch) == 127 for ch in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not carry a user name or password (the farm signs each delivery instead)")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host")
    if literal_address(host) is None and HOST_NAME_RE.fullmatch(host) is None:
        raise ValueError(f"host {host!r} is neither a host name nor an IP address")
    if port == 0:
        raise ValueError("port 0 is not a port")
    return parts


def literal_address(host: str) -> Address | None:
    """The address ``host`` is written as (``10.0.0.5``, ``::1`` without brackets), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
        if address in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the last 32 bits are the IPv4 address
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: Address) -> str | None:
    """Why the farm does not send to ``address`` (``"loopback"``, ``"private"``, ...), or None
    for a public address."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        reason = refusal(inner)
        return f"{reason} (inside an IPv6 address)" if reason else None
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
    )
    for name, hit in checks:
        if hit:
            return name
    if not address.is_global:  # shared (100.64/10), documentation, benchmarking and the like
        return "not public"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """``webhooks.allow_hosts`` read once: host names (any address they resolve to is fine) and
    networks (their addresses are fine)."""

    names: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = field(default_factory=tuple)

    @classmethod
    def from_entries(cls, entries: list[str]) -> AddressPolicy:
        """The policy for a list of names, addresses and CIDRs; :class:`ValueError` names a bad entry."""
        names: set[str] = set()
        networks: list[Network] = []
        for entry in entries:
            text = entry.strip().lower().strip("[]")
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            if not text or HOST_NAME_RE.fullmatch(text) is None:
                raise ValueError(f"allow_hosts: {entry!r} is neither a host name, an address nor a CIDR network")
            names.add(text.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def address_allowed(self, address: Address) -> bool:
        return refusal(address) is None or any(address in network for network in self.networks)

    def check_literal(self, host: str) -> None:
        """At submit: :class:`AddressRefused` when ``host`` is an address the farm does not send
        to (names are judged when delivering, once resolved)."""
        address = literal_address(host)
        if address is None or host.lower().rstrip(".") in self.names or self.address_allowed(address):
            return
        raise AddressRefused(
            f"{address} is a {refusal(address)} address: webhooks go to public addresses only "
            "(an administrator may allow it in webhooks.allow_hosts)"
        )

    def resolve(self, host: str, port: int) -> Address:
        """The address to connect to for ``host``: every address it resolves to must be allowed
        (the first is used); :class:`AddressRefused` otherwise, or when it does not resolve."""
        literal = literal_address(host)
        try:
            found = (
                [literal]
                if literal is not None
                else [
                    ipaddress.ip_address(info[4][0].split("%")[0])
                    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                ]
            )
        except (OSError, UnicodeError) as exc:
            raise AddressRefused(f"{host} does not resolve ({exc})") from None
        if not found:
            raise AddressRefused(f"{host} does not resolve")
        if host.lower().rstrip(".") in self.names:
            return found[0]
        for address in found:
            if not self.address_allowed(address):
                raise AddressRefused(
                    f"{host} resolves to {address}, a {refusal(address)} address: webhooks go to public "
                    "addresses only (an administrator may allow it in webhooks.allow_hosts)"
                )
        return found[0]
