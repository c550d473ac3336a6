"""Leaving a storage provider: our side of each agreement comes home to this node
(docs/federation.md, "Leaving the provider").

A node mounted *without* ``--provider`` whose side was last held at a provider OLD
(``settings`` key ``provider``) takes it back in order, one partner X at a time, as a
switch of providers does (peers/handover.py) with this node as the new holder:

1. copy X's shards from OLD into our own shard store, under X as their owner, through
   the quota of our agreement with X and our donation (``ListReserved``,
   ``FetchReserved``; every shard checked against its id: OLD's bytes are a stranger's),
   and the records OLD keeps for X into our own record store (``FetchReservedRecord``;
   kept only if X's own, validly signed, never over a newer one: peers/recordmove.py);
2. renew the agreement with X on its terms without ``store_at``
   (``PeerManager.take_back``): X's shard and record ops come to this node from then on;
3. copy again what X stored at OLD between 1 and 2 (shards and records);
4. remove the reservation at OLD (``Unreserve``), which keeps serving what it held for
   its keep period.

A partner that does not renew, a shard that does not fit (our donation is full) or an
OLD that does not answer leaves X's side at OLD, which still holds and serves it; the
move is retried every tick. An OLD silent for ``give_up`` (half the tolerance) counts as
gone: the agreement comes home without the copy (X's audits and repair re-create what
OLD took with it), as when a provider vanishes. Once no agreement is left at OLD the
state forgets it, and this node holds its side itself, like a node that never had a
provider.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from fluidfs.blocks import merkle
from fluidfs.diskspace import FULL_ERRNOS, PEER_RESERVE, DiskReserve
from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.recordmove import adopt, copy_records, fetch_reserved
from fluidfs.peers.sidecopy import OldProvider, copy_shards, leave_old
from fluidfs.peers.sidecopy import short as _short
from fluidfs.store.records import RecordStore
from fluidfs.store.settings import StateSettings
from fluidfs.store.shards import SHARD_OVERHEAD, ShardStore

log = logging.getLogger(__name__)

TakeBack = Callable[[bytes], Awaitable[bool]]  # renew with a partner without store_at


class NoRoom(Exception):
    """A shard of the partner's side does not fit what we promised it or our donation."""


@dataclass
class LocalSide:
    """Where our side of the agreements is kept when it is home: our own shard store."""

    shards: ShardStore
    ledger: Ledger
    donate: int  # bytes we hold for all partners together, at most
    self_key: bytes  # our own shards do not count against the donation
    limiter: trio.CapacityLimiter
    records: RecordStore | None = None  # where we keep partners' records (None: nowhere)
    reserve: DiskReserve | None = None  # the state disk's (None: one over the shards' disk)

    def __post_init__(self) -> None:
        if self.reserve is None:
            self.reserve = DiskReserve(self.shards.path)

    async def held(self, peer: bytes) -> set[bytes]:
        """The ids of *peer*'s shards we hold."""
        return await trio.to_thread.run_sync(lambda: set(self.shards.ids(peer)),
                                             limiter=self.limiter)

    async def put(self, peer: bytes, shard_id: bytes, data: bytes) -> None:
        """Keep one of *peer*'s shards, checked against its id, within what our agreement
        with it promises, our donation and the disk's room past PEER_RESERVE (NoRoom if
        it does not fit)."""
        agreement = self.ledger.live(peer)
        quota = agreement.we_host if agreement is not None else 0

        def check_and_write() -> bool:
            if merkle.shard_id(data) != shard_id:
                return False
            assert self.reserve is not None
            wanted = len(data) + SHARD_OVERHEAD
            with self.reserve.claim_upto(wanted, PEER_RESERVE, self.shards.data_file) as disk:
                over = self.shards.put_within(peer, [(shard_id, data)], quota=quota,
                                              pool=self.donate, outside_pool=self.self_key,
                                              disk=disk)
            if over:
                raise NoRoom(f"no room for {encode_peer_id(peer)[:12]}'s shard here")
            return True

        if not await trio.to_thread.run_sync(check_and_write, limiter=self.limiter):
            raise RpcError("bad_shard", f"the provider served shard {shard_id.hex()[:12]} "
                                        "with other bytes")

    async def put_record(self, peer: bytes, raw: bytes) -> bool:
        """Keep one of *peer*'s records fetched from the provider, by ``PutRecord``'s
        rules without compare-and-swap (peers/recordmove.py); True if stored."""
        if self.records is None:
            return False
        try:
            stored, _held = await trio.to_thread.run_sync(adopt, self.records, peer, peer, raw,
                                                          limiter=self.limiter)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            log.warning("no room on this disk for %s's record: not kept", _short(peer))
            return False
        return stored


@dataclass
class Homecoming:
    """Brings our side of every agreement home from provider *old* (id, address)."""

    conns: Connections
    ledger: Ledger
    home: LocalSide
    old: tuple[bytes, str]
    take_back: TakeBack
    tick: float = 30.0
    give_up: float = 12 * 3600.0  # seconds OLD may be silent before it counts as gone
    moved: int = field(default=0, init=False)  # agreements brought home
    copied: int = field(default=0, init=False)  # shards copied home
    records: int = field(default=0, init=False)  # partners' records copied home

    def __post_init__(self) -> None:
        self._from = OldProvider(self.conns, self.old)

    def pending(self) -> list[bytes]:
        """The partners whose side is still reserved at the old provider."""
        return self._from.pending(self.ledger)

    async def run(self) -> None:
        """Bring every agreement home, retrying each tick until none is left at OLD."""
        while True:
            await self.move_all()
            if not self.pending():
                log.info("every agreement is held here again, none at provider %s",
                         _short(self.old[0]))
                return
            await trio.sleep(self.tick)

    async def move_all(self) -> int:
        """One pass over the partners still at OLD; how many came home."""
        await self.forward_ends()
        moved = 0
        for peer in self.pending():
            try:
                moved += await self.move(peer)
            except (PeerUnavailable, RpcError, NoRoom) as exc:
                log.warning("bringing our side for %s home from the provider: %s "
                            "(it stays there; will retry)", _short(peer), exc)
        return moved

    async def forward_ends(self) -> None:
        """Remove at OLD the reservations of agreements that ended while held there."""
        await self._from.forward_ends(self.ledger)

    async def move(self, peer: bytes) -> bool:
        """Bring our side for *peer* home (steps 1-4 above); True once it is held here."""
        agreement = self.ledger.live(peer)
        if agreement is None or agreement.reserved_at != self.old[0]:
            return False
        if not await leave_old(self._from, peer, self.give_up, "this node",
                               self._copy_all, self.take_back):
            return False
        self.moved += 1
        log.info("our side for %s is held here again", _short(peer))
        return True

    async def copy(self, peer: bytes) -> int:
        """Copy the shards OLD holds for *peer* that we lack; how many were copied."""
        held = await self.home.held(peer)
        there = await self._from.listing(peer)
        copied = await copy_shards(
            [sid for sid in there if sid not in held],
            lambda sid: self._from.fetch(peer, sid),
            lambda sid, data: self.home.put(peer, sid, data))
        self.copied += copied
        return copied

    async def copy_records(self, peer: bytes) -> int:
        """Copy the records OLD keeps for *peer* into our record store; how many stored."""
        copied = await copy_records(peer, fetch_reserved(self._from.call, peer),
                                    lambda raw: self.home.put_record(peer, raw))
        self.records += copied
        return copied

    async def _copy_all(self, peer: bytes) -> None:
        await self.copy(peer)
        await self.copy_records(peer)

    def status(self) -> dict[str, Any]:
        """What ``fluidfs status`` shows while the side comes home."""
        return {"id": encode_peer_id(self.old[0]), "addr": self.old[1],
                "left": len(self.pending()), "brought_home": self.moved,
                "copied": self.copied}

    def with_status(
        self, status: Callable[[dict], Awaitable[dict]]
    ) -> Callable[[dict], Awaitable[dict]]:
        """The node's ``status`` control handler, with the homecoming added while some
        agreement is still held at the old provider."""

        async def handler(request: dict) -> dict:
            reply = await status(request)
            if self.pending():  # nothing to say once every agreement is home
                reply["leaving_provider"] = self.status()
            return reply

        return handler


async def leave_provider(settings: StateSettings, homecoming: Homecoming) -> None:
    """Bring our side home from the provider it was last held at (run once per mount
    without ``--provider``), then forget that provider."""
    log.warning("mounted without --provider: bringing our side of %d agreements home from "
                "provider %s (mount with --provider to keep it there)",
                len(homecoming.pending()), _short(homecoming.old[0]))
    await homecoming.run()
    settings.set_provider(None)
