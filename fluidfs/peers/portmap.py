"""Asking the home gateway to forward a port to us (UPnP-IGD, through ``miniupnpc``).

A node behind a NAT router can dial out but cannot be dialled. Most home routers accept
UPnP-IGD requests from their LAN: "forward external TCP port E to my port P". When the
node listens on the unspecified address or on a private one (10/8, 172.16/12,
192.168/16, 100.64/10), ``PortMapper`` discovers the gateway (SSDP on the LAN, a
``DISCOVER_MS`` wait), asks for external port = our port (or, if that one is taken, any
port the gateway picks), for ``lease`` seconds, renews at half the lease, and deletes the
mapping when the node stops. ``mapped`` is then the gateway's external address and
port: peers/reach.py announces it first in our address record. A gateway that answers
nothing is asked again after a growing pause (up to ``RETRY_MAX``). Loopback and public
listening addresses never trigger a discovery (no multicast leaves the machine for
tests on 127.0.0.1, and a public address needs no mapping).

miniupnpc is blocking C code: every call runs in a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from fluidfs.peers.address import AddressError, PeerAddr, split_host_port

log = logging.getLogger(__name__)

DISCOVER_MS = 2000
RETRY_MIN = 30.0
RETRY_MAX = 600.0
DESCRIPTION = "fluidfs"
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")


@dataclass
class PortMapPolicy:
    """Whether to ask the gateway, and for how long a mapping is leased."""

    enabled: bool = True
    lease: int = 3600  # seconds; renewed at half of it


def wants_mapping(listen: str) -> bool:
    """True if a node listening on *listen* may sit behind a NAT: it listens on the
    unspecified address or a private IPv4 one (never loopback or a public address)."""
    try:
        host, _ = split_host_port(listen, bind=True)
        ip = ipaddress.ip_address(host)
    except (AddressError, ValueError):
        return False
    if not isinstance(ip, ipaddress.IPv4Address) or ip.is_loopback:
        return False
    return ip.is_unspecified or ip.is_private or ip in _SHARED


class GatewayError(Exception):
    """The gateway could not be found or refused the mapping."""


@dataclass
class _Gateway:
    """One discovered IGD (a miniupnpc.UPnP object) and what it granted."""

    upnp: object
    lan_addr: str
    external_port: int = 0


def _discover() -> _Gateway:
    import miniupnpc  # a C extension: loaded only where a node may need a mapping

    upnp = miniupnpc.UPnP()
    upnp.discoverdelay = DISCOVER_MS
    try:
        if upnp.discover() < 1:
            raise GatewayError("no UPnP gateway answered")
        upnp.selectigd()
    except Exception as exc:  # miniupnpc raises bare Exception with the UPnP error text
        raise GatewayError(f"UPnP discovery: {exc}") from None
    return _Gateway(upnp, upnp.lanaddr)


def _map(gateway: _Gateway, port: int, lease: int) -> PeerAddr:
    """Ask for (or renew) external port -> lan_addr:port; return the external address."""
    upnp = gateway.upnp
    try:
        external_ip = upnp.externalipaddress()
        wanted = gateway.external_port or port
        try:
            upnp.addportmapping(wanted, "TCP", gateway.lan_addr, port, DESCRIPTION, "", lease)
            granted = wanted
        except Exception:
            # taken by another machine (ConflictInMappingEntry): let the gateway choose
            granted = upnp.addanyportmapping(wanted, "TCP", gateway.lan_addr, port,
                                             DESCRIPTION, "", lease)
    except Exception as exc:
        raise GatewayError(f"UPnP mapping: {exc}") from None
    gateway.external_port = int(granted)
    try:
        return PeerAddr(str(ipaddress.ip_address(external_ip)), int(granted))
    except (AddressError, ValueError, TypeError):
        _unmap(gateway)
        raise GatewayError(
            f"the gateway's external address {external_ip!r} is not dialable") from None


def _unmap(gateway: _Gateway) -> None:
    if gateway.external_port:
        try:
            gateway.upnp.deleteportmapping(gateway.external_port, "TCP")
        except Exception as exc:
            log.info("removing the UPnP mapping failed: %s", exc)
        gateway.external_port = 0


@dataclass
class PortMapper:
    """Keeps a port mapping on the gateway while the node runs."""

    listen: Callable[[], str]  # our bound listening address (host:port), "" if none
    policy: PortMapPolicy = field(default_factory=PortMapPolicy)
    mapped: PeerAddr | None = None  # what the gateway granted, while it holds
    _gateway: _Gateway | None = None

    async def run(self) -> None:
        """Map, renew, and unmap when cancelled (does nothing if no mapping is wanted)."""
        listen = self.listen()
        if not self.policy.enabled or not wants_mapping(listen):
            await trio.sleep_forever()
        _, port = split_host_port(listen, bind=True)
        pause = RETRY_MIN
        try:
            while True:
                try:
                    await self._renew(port)
                    pause = RETRY_MIN
                    await trio.sleep(self.policy.lease / 2)
                except GatewayError as exc:
                    if self.mapped is not None:
                        log.info("UPnP mapping lost: %s", exc)
                    else:
                        log.debug("no UPnP mapping: %s", exc)
                    self.mapped, self._gateway = None, None
                    await trio.sleep(pause)
                    pause = min(pause * 2, RETRY_MAX)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.remove()

    async def _renew(self, port: int) -> None:
        if self._gateway is None:
            self._gateway = await trio.to_thread.run_sync(_discover, abandon_on_cancel=True)
        mapped = await trio.to_thread.run_sync(_map, self._gateway, port, self.policy.lease,
                                               abandon_on_cancel=True)
        if mapped != self.mapped:
            log.info("UPnP gateway forwards %s to our port %d", mapped, port)
        self.mapped = mapped

    async def remove(self) -> None:
        """Delete the mapping (at exit)."""
        gateway, self._gateway, self.mapped = self._gateway, None, None
        if gateway is not None and gateway.external_port:
            await trio.to_thread.run_sync(_unmap, gateway, abandon_on_cancel=True)
