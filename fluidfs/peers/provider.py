"""The customer's side of a storage provider (docs/federation.md).

A node mounted with ``--provider ID@HOST:PORT`` has its side of every agreement it
proposes held by that provider: before proposing to a peer it reserves space for it there
(``Reserve``, the size it offers), proposes with ``store_at`` naming the provider, and
removes the reservation (``Unreserve``) when the proposal is refused or the agreement
ends. The peer then sends its shards, audits and reads for us to the provider, which
answers them whether or not we are online.

The provider is reached by its id at the given address only (it must prove that id).
Ends are forwarded by ``run``: every tick it pings the provider (so ``status`` can say
whether it answers) and removes the reservation of every agreement that has ended, until
the provider confirms; an agreement's ``reserved_at`` is cleared once it has.

A provider that has not answered for ``give_up`` seconds (half the tolerance partners
give us, so they have not ended anything yet) is taken for gone: every agreement it held
is renewed without ``store_at`` (``take_back``), so partners come to this node again,
and ``status`` says so loudly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0
TakeBack = Callable[[bytes], Awaitable[bool]]  # renew with a partner without store_at


@dataclass
class ProviderClient:
    """Reservations at our provider, and whether it answers."""

    conns: Connections
    ledger: Ledger
    key: bytes  # the provider's id
    addr: str  # where it listens
    tick: float = 30.0
    give_up: float = 12 * 3600.0  # seconds unanswered before the provider counts as gone
    reachable: bool | None = field(default=None, init=False)  # None: not asked yet
    last_seen: float | None = field(default=None, init=False)
    last_error: str = field(default="", init=False)
    silent_since: float | None = field(default=None, init=False)  # monotonic
    taken_back: int = field(default=0, init=False)  # agreements brought home
    moving_from: bytes | None = field(default=None, init=False)  # switching providers
    moving: int = field(default=0, init=False)  # agreements still at that one
    held_here: int = field(default=0, init=False)  # agreements still to move here from home
    account: dict[str, int] | None = field(default=None, init=False)  # its last Account
    account_error: str = field(default="", init=False)  # why it gave none ("refused": no
    # customer of it), "" once it did

    @property
    def gone(self) -> bool:
        """True once the provider has been silent for ``give_up`` seconds: new agreements
        are then proposed without it."""
        silent = self.silent_since
        return silent is not None and trio.current_time() - silent >= self.give_up

    def store_at(self) -> dict[str, Any]:
        """The ``store_at`` field of our proposals."""
        return {"id": self.key, "addr": self.addr}

    async def reserve(self, peer: bytes, size: int) -> bool:
        """Reserve *size* bytes at the provider for *peer*'s shards; False if it will not."""
        try:
            await self._call("Reserve", {"peer": peer, "size": size})
        except (PeerUnavailable, RpcError) as exc:
            log.warning("provider %s did not reserve %d bytes for %s: %s",
                        _short(self.key), size, _short(peer), exc)
            return False
        return True

    async def unreserve(self, peer: bytes) -> bool:
        """Remove *peer*'s reservation; True once the provider has confirmed it."""
        try:
            await self._call("Unreserve", {"peer": peer})
        except (PeerUnavailable, RpcError) as exc:
            log.info("removing the reservation for %s at the provider failed: %s",
                     _short(peer), exc)
            return False
        return True

    async def run(self, take_back: TakeBack) -> None:
        """Ping the provider and forward ended agreements, every tick, until cancelled."""
        while True:
            await self.check(take_back)
            await trio.sleep(self.tick)

    async def check(self, take_back: TakeBack | None = None) -> None:
        """One tick: is the provider there, and does it still reserve for ended partners?
        If it has been silent past ``give_up``, bring its agreements home (*take_back*)."""
        try:
            await self._call("Ping", {})
        except (PeerUnavailable, RpcError):
            if self.silent_since is None:
                self.silent_since = trio.current_time()
            if take_back is not None and self.gone:
                await self._bring_home(take_back)
            return
        self.silent_since = None
        await self._read_account()
        for agreement in self.ledger.ended():
            if agreement.reserved_at == self.key and await self.unreserve(agreement.peer):
                agreement.reserved_at = None
                self.ledger.save(agreement)

    async def _read_account(self) -> None:
        """Our quota and what the provider holds for us, for ``status``."""
        try:
            self.account, self.account_error = await self._call("Account", {}), ""
        except (PeerUnavailable, RpcError) as exc:
            # "refused": the operator has not admitted us (or closed our account)
            self.account = None
            self.account_error = exc.code if isinstance(exc, RpcError) else str(exc)

    async def _bring_home(self, take_back: TakeBack) -> None:
        for agreement in self.ledger.active():
            if agreement.reserved_at == self.key and await take_back(agreement.peer):
                self.taken_back += 1
                log.warning("provider %s is gone: we hold our side for %s ourselves now",
                            _short(self.key), _short(agreement.peer))

    def status(self) -> dict[str, Any]:
        """What ``fluidfs status`` shows of the provider."""
        held = [a for a in self.ledger.active() if a.reserved_at == self.key]
        return {
            "id": encode_peer_id(self.key),
            "addr": self.addr,
            "reachable": self.reachable,
            "last_seen": self.last_seen,
            "last_error": self.last_error,
            "reservations": len(held),
            "reserved_bytes": sum(a.we_host for a in held),
            "taken_back": self.taken_back,
            "moving_from": None if self.moving_from is None else encode_peer_id(self.moving_from),
            "moving": self.moving,
            "held_here": self.held_here,
            # our account there: None until it gave one
            "quota": self.account["quota"] if self.account else None,
            "held_bytes": self.account["held"] if self.account else None,
            "account_error": self.account_error,
        }

    def with_status(
        self, status: Callable[[dict], Awaitable[dict]]
    ) -> Callable[[dict], Awaitable[dict]]:
        """The node's ``status`` control handler, with the provider added."""

        async def handler(request: dict) -> dict:
            reply = await status(request)
            reply["provider"] = self.status()
            if self.reachable is False and "overview" in reply:
                text = (f"The storage provider {encode_peer_id(self.key)[:12]} at "
                        f"{self.addr} does not answer: while this machine is offline, "
                        "partners cannot check the shards we keep for them.")
                if self.taken_back:
                    text += (f" {self.taken_back} agreements were brought back to this "
                             "machine: keep it online.")
                reply["overview"]["warnings"].append({"kind": "provider", "text": text})
            elif self.account_error == "refused" and "overview" in reply:
                reply["overview"]["warnings"].append({"kind": "provider", "text": (
                    f"The storage provider {encode_peer_id(self.key)[:12]} does not know "
                    "this node as a customer: it holds nothing new for us. Ask its "
                    "operator to admit us (fluidfs provider add, with this node's "
                    "fluidfs id), or join with an invitation code (fluidfs provider "
                    "join CODE).")})
            return reply

        return handler

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self.conns.call(self.key, op, args, timeout=CALL_TIMEOUT,
                                          addr=self.addr)
        except PeerUnavailable as exc:
            self.reachable, self.last_error = False, str(exc)
            raise
        self.reachable, self.last_seen, self.last_error = True, time.time(), ""
        return reply


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
