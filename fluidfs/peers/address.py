"""Peer addresses: parsed once, where they arrive, into a typed value.

An address is text ``HOST:PORT`` (``[IPV6]:PORT`` for IPv6), at most 300 characters
(``messages.MAX_ADDR``). HOST is an IPv4 or IPv6 literal or a DNS name (RFC 1123 labels:
letters, digits and inner hyphens, 1-63 characters each, at most 253 in all, the last
label not all digits). PORT is 1-65535, written in decimal without sign or padding beyond
five digits.

A peer address (``PeerAddr``) must also be one we could dial: the unspecified address
(``0.0.0.0/8``, ``::``), multicast, broadcast and reserved (``240.0.0.0/4``) addresses are
refused (``UnusableAddress``): dialling ``0.0.0.0`` reaches this machine itself, and the
others reach no single peer. Loopback and private addresses are allowed (tests, LANs).
IPv6 zone ids (``fe80::1%eth0``) are refused: a zone names an interface of the sender's
machine, not of ours. Text that only looks numeric to the C resolver (``127.1``,
``0x7f.1``) is refused rather than guessed at.

Bind addresses (``--listen``) may also use the unspecified address and port 0:
``split_host_port(text, bind=True)``.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

MAX_TEXT = 300
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


class AddressError(ValueError):
    """The text is not a well-formed ``HOST:PORT`` address."""


class UnusableAddress(AddressError):
    """A well-formed address that names no peer we could dial (e.g. ``0.0.0.0``)."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _looks_numeric(host: str) -> bool:
    """True for text that inet_aton would read as an IPv4 address ("127.1", "0x0")."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _check_name(host: str) -> str:
    name = host[:-1] if host.endswith(".") else host
    name = name.lower()
    if not name or len(name) > 253:
        raise AddressError(f"host name of {len(name)} characters")
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise AddressError(f"not a host name: {host!r}")
    if labels[-1].isdigit() or _looks_numeric(name):
        raise AddressError(f"not an IP address nor a host name: {host!r}")
    return name


def _canonical_host(host: str, *, bracketed: bool) -> str:
    """The host in canonical form (IP literals normalised, names lower case)."""
    ip = _ip(host)
    if bracketed:
        if not isinstance(ip, ipaddress.IPv6Address) or "%" in host:
            raise AddressError(f"not an IPv6 address in brackets: [{host}]")
        return str(ip)
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address):
            raise AddressError(f"an IPv6 address needs brackets: [{host}]:PORT")
        return str(ip)
    return _check_name(host)


def _split(text: object) -> tuple[str, bool, str]:
    if type(text) is not str:
        raise AddressError(f"an address is text, not {type(text).__name__}")
    if not text or len(text) > MAX_TEXT:
        raise AddressError(f"an address has 1 to {MAX_TEXT} characters, not {len(text)}")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"not a [HOST]:PORT address: {text!r}")
        return host, True, port
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"not a HOST:PORT address: {text!r}")
    return host, False, port


def _port(text: str, *, bind: bool) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise AddressError(f"not a port number: {text!r}")
    port = int(text)
    if not (0 if bind else 1) <= port <= 65535:
        raise AddressError(f"port {port} is out of range")
    return port


def _usable(host: str) -> None:
    ip = _ip(host)
    if ip is None:
        return
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        raise UnusableAddress(f"{host} is the unspecified address (it would reach ourselves)")
    if ip.is_multicast:
        raise UnusableAddress(f"{host} is a multicast address")
    if ip == _BROADCAST or (isinstance(ip, ipaddress.IPv4Address) and ip.is_reserved):
        raise UnusableAddress(f"{host} is a broadcast or reserved address")


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: object, *, bind: bool = False) -> tuple[str, int]:
    """Parse ``HOST:PORT`` into (canonical host, port); raise ``AddressError``.

    With *bind*, the address is one to listen on: port 0 (any free port) and the
    unspecified address are allowed. Without it the address must be dialable
    (``UnusableAddress`` otherwise).
    """
    host, bracketed, port_text = _split(text)
    canonical = _canonical_host(host, bracketed=bracketed)
    port = _port(port_text, bind=bind)
    if not bind:
        _usable(canonical)
    return canonical, port


@dataclass(frozen=True, order=True)
class PeerAddr:
    """Where a peer says it accepts connections: a dialable host and port (1-65535)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if type(self.port) is not int or not 1 <= self.port <= 65535:
            raise AddressError(f"port {self.port!r} is out of range")
        if type(self.host) is not str:
            raise AddressError("a host is text")
        bracketed = ":" in self.host
        if _canonical_host(self.host, bracketed=bracketed) != self.host:
            raise AddressError(f"host not in canonical form: {self.host!r}")
        _usable(self.host)

    @classmethod
    def parse(cls, text: object) -> PeerAddr:
        """Parse peer-supplied text; raise ``AddressError`` (``UnusableAddress``)."""
        host, port = split_host_port(text)
        return cls(host, port)

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)
