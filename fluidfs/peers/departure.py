"""Joining a storage provider: our side of the agreements held here moves to it
(docs/federation.md, "Joining a provider").

A node mounted with ``--provider NEW`` that holds its side of some agreements itself
(``reserved_at`` unset: made before it had a provider, brought home, or made while the
provider was gone) moves them to NEW one partner X at a time, as a switch of providers
does (peers/handover.py) with this node as the old holder:

1. reserve at NEW what we host for X (``Reserve``);
2. copy X's shards from our shard store to NEW (``StoreReserved``, one shard at a time;
   NEW checks each against its id) and the records we keep for X
   (``StoreReservedRecord``: peers/recordmove.py);
3. renew the agreement with X on its terms with ``store_at`` naming NEW
   (``PeerManager.move_to_provider``): X's shard and record ops go to NEW from then on;
4. copy again what X stored here between 2 and 3;
5. drop here the shards NEW now lists as held (any other stays: nothing acknowledged
   to X is dropped before NEW holds it).

Until step 3 X's ops come here, where everything is; after it NEW holds everything X
stored before step 4. A partner that does not renew, or a NEW that does not reserve or
answer, leaves X's side here (served as before) and the move is retried every tick; so
is a side that comes home later (taken back while the provider was gone), once the
provider answers again.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import trio

from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.handover import Renew
from fluidfs.peers.homecoming import LocalSide
from fluidfs.peers.provider import CALL_TIMEOUT, ProviderClient
from fluidfs.peers.recordmove import copy_records
from fluidfs.peers.sidecopy import (
    copy_shards,
    list_reserved,
    reserved_record_store,
    reserved_store,
)
from fluidfs.peers.sidecopy import short as _short

log = logging.getLogger(__name__)

DROP_BATCH = 1024  # shards dropped here per write transaction once NEW holds them


@dataclass
class Departure:
    """Moves our side of every agreement held here to our provider *new*."""

    conns: Connections
    ledger: Ledger
    home: LocalSide
    new: ProviderClient
    renew: Renew
    tick: float = 30.0
    moved: int = field(default=0, init=False)  # agreements now held at NEW
    copied: int = field(default=0, init=False)  # shards handed over
    records: int = field(default=0, init=False)  # partners' records handed over

    def pending(self) -> list[bytes]:
        """The partners whose side we still hold here (the provider itself, when it is
        also a partner, holds nothing of ours for itself)."""
        return [a.peer for a in self.ledger.active()
                if a.reserved_at is None and a.peer != self.new.key]

    async def run(self) -> None:
        """Move every agreement held here, each tick, until cancelled: one may come home
        later (made or taken back while the provider was gone)."""
        while True:
            if self.new.silent_since is None:  # a silent provider reserves nothing
                await self.move_all()
            await trio.sleep(self.tick)

    async def move_all(self) -> int:
        """One pass over the partners whose side is held here; how many moved. The
        provider's status shows how many are still held here (``held_here``)."""
        moved = 0
        self.new.held_here = len(self.pending())
        for peer in self.pending():
            try:
                moved += await self.move(peer)
            except (PeerUnavailable, RpcError) as exc:
                log.info("moving our side for %s to our provider: %s (will retry)",
                         _short(peer), exc)
        self.new.held_here = len(self.pending())
        return moved

    async def move(self, peer: bytes) -> bool:
        """Move our side for *peer* (steps 1-5 above); True once it is held at NEW."""
        agreement = self.ledger.live(peer)
        if agreement is None or agreement.reserved_at is not None or peer == self.new.key:
            return False
        if not await self.new.reserve(peer, agreement.we_host):
            return False
        await self.copy(peer)
        await self.copy_records(peer)
        if not await self.renew(peer):
            log.info("partner %s did not renew with our provider: its side stays here",
                     _short(peer))
            return False
        with contextlib.suppress(PeerUnavailable, RpcError):  # held here until retried
            await self.copy(peer)
            await self.copy_records(peer)
            await self.drop_moved(peer)
        self.moved += 1
        log.info("our side for %s moved to our provider %s", _short(peer),
                 _short(self.new.key))
        return True

    async def copy(self, peer: bytes) -> int:
        """Copy the shards we hold for *peer* that NEW lacks; how many were copied."""
        there = set(await list_reserved(self._new, peer))
        here = await self.home.held(peer)

        async def fetch(sid: bytes) -> bytes | None:  # None: deleted by the partner since
            return await trio.to_thread.run_sync(self.home.shards.get, peer, sid,
                                                 limiter=self.home.limiter)

        copied = await copy_shards(sorted(here - there), fetch,
                                   reserved_store(self._new, peer, "our provider"))
        self.copied += copied
        return copied

    async def copy_records(self, peer: bytes) -> int:
        """Copy the records we keep for *peer* to NEW; how many NEW stored."""
        records = self.home.records

        async def fetch(kind: str) -> bytes | None:
            if records is None:
                return None
            return await trio.to_thread.run_sync(records.get, peer, kind,
                                                 limiter=self.home.limiter)

        copied = await copy_records(peer, fetch, reserved_record_store(self._new, peer))
        self.records += copied
        return copied

    async def drop_moved(self, peer: bytes) -> int:
        """Drop here the shards of *peer* that NEW lists as held; how many."""
        there = set(await list_reserved(self._new, peer))
        ids = sorted(await self.home.held(peer) & there)
        for start in range(0, len(ids), DROP_BATCH):
            await trio.to_thread.run_sync(self.home.shards.delete_many, peer,
                                          ids[start : start + DROP_BATCH],
                                          limiter=self.home.limiter)
        return len(ids)

    async def _new(self, op: str, args: dict) -> dict:
        return await self.conns.call(self.new.key, op, args, timeout=CALL_TIMEOUT,
                                     addr=self.new.addr)
