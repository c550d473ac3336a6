"""Switching storage providers: our side of each agreement moves from the old provider
to the new one, with no partner's shard ever out of reach (docs/federation.md).

A node mounted with ``--provider NEW`` whose agreements are still reserved at an older
provider OLD (``reserved_at``) moves them one partner X at a time:

1. reserve at NEW what we host for X (``Reserve``);
2. copy X's shards from OLD to NEW through this node (``ListReserved`` and
   ``FetchReserved`` at OLD, ``StoreReserved`` at NEW, one shard at a time; NEW checks
   every shard against its id, as it checks a partner's store), and the records we keep
   for X (``FetchReservedRecord`` at OLD, ``StoreReservedRecord`` at NEW, which keeps
   only X's own, validly signed, never over a newer one: peers/recordmove.py);
3. renew the agreement with X on its terms with ``store_at`` naming NEW
   (``PeerManager.move_to_provider``): X's shard ops go to NEW from then on;
4. copy again what X stored at OLD between 2 and 3 (shards and records);
5. remove the reservation at OLD (``Unreserve``): OLD keeps serving what it held for the
   keep period, then drops it.

Until step 3, X's shard ops go to OLD, which holds everything; after it, NEW holds
everything X had stored before step 2 ended. Only a shard X stores in the short gap
between steps 2 and 3 is briefly at OLD alone (step 4 brings it over a moment later).
A partner that does not renew (or an OLD that does not answer) stays at OLD: the move
is tried again every tick. Each step may be repeated (the copy skips what NEW holds), so
a move cut short by a restart resumes.

An OLD that has not answered for the new provider's ``give_up`` (half the tolerance) is
taken for gone, as a vanished provider is (peers/provider.py): the agreements move to NEW
without the copy, and the partners' audits and repair re-create what OLD took with it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from fluidfs.net.errors import RpcError
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.provider import CALL_TIMEOUT, ProviderClient
from fluidfs.peers.recordmove import copy_records, fetch_reserved
from fluidfs.peers.sidecopy import (
    OldProvider,
    copy_shards,
    leave_old,
    list_reserved,
    reserved_record_store,
    reserved_store,
)
from fluidfs.peers.sidecopy import short as _short
from fluidfs.store.settings import StateSettings

log = logging.getLogger(__name__)

Renew = Callable[[bytes], Awaitable[bool]]  # renew with a partner, store_at naming NEW


@dataclass
class Handover:
    """Moves our side of every agreement from provider *old* (id, address) to *new*."""

    conns: Connections
    ledger: Ledger
    new: ProviderClient
    old: tuple[bytes, str]
    renew: Renew
    tick: float = 30.0
    moved: int = field(default=0, init=False)  # agreements now held at NEW
    copied: int = field(default=0, init=False)  # shards handed over
    records: int = field(default=0, init=False)  # partners' records handed over

    def __post_init__(self) -> None:
        self._from = OldProvider(self.conns, self.old)

    def pending(self) -> list[bytes]:
        """The partners whose side is still reserved at the old provider."""
        return self._from.pending(self.ledger)

    async def run(self) -> None:
        """Move every agreement, retrying each tick until none is left at OLD."""
        while True:
            await self.move_all()
            if not self.pending():
                log.info("every agreement moved to provider %s", _short(self.new.key))
                return
            await trio.sleep(self.tick)

    async def move_all(self) -> int:
        """One pass over the partners still at OLD; how many moved. The new provider's
        status shows how many are left there (``moving``)."""
        await self.forward_ends()
        self.new.moving_from, self.new.moving = self.old[0], len(self.pending())
        moved = 0
        for peer in self.pending():
            try:
                moved += await self.move(peer)
            except (PeerUnavailable, RpcError) as exc:
                log.info("moving our side for %s to the new provider: %s (will retry)",
                         _short(peer), exc)
        left = len(self.pending())
        self.new.moving_from, self.new.moving = (self.old[0] if left else None), left
        return moved

    async def forward_ends(self) -> None:
        """Remove at OLD the reservations of agreements that ended while held there (the
        client of the current provider forwards only its own)."""
        await self._from.forward_ends(self.ledger)

    async def move(self, peer: bytes) -> bool:
        """Move our side for *peer* (steps 1-5 above); True once it is held at NEW."""
        agreement = self.ledger.live(peer)
        if agreement is None or agreement.reserved_at != self.old[0]:
            return False
        if not await self.new.reserve(peer, agreement.we_host):
            return False
        if not await leave_old(self._from, peer, self.new.give_up, "the new provider",
                               self._copy_all, self.renew):
            return False
        self.moved += 1
        log.info("our side for %s moved to provider %s", _short(peer), _short(self.new.key))
        return True

    async def copy(self, peer: bytes) -> int:
        """Copy the shards OLD holds for *peer* that NEW lacks; how many were copied."""
        held = set(await list_reserved(self._new, peer))
        there = await self._from.listing(peer)
        copied = await copy_shards(
            [sid for sid in there if sid not in held],
            lambda sid: self._from.fetch(peer, sid),
            reserved_store(self._new, peer, "the new provider"))
        self.copied += copied
        return copied

    async def copy_records(self, peer: bytes) -> int:
        """Copy the records OLD keeps for *peer* to NEW; how many NEW stored."""
        copied = await copy_records(peer, fetch_reserved(self._from.call, peer),
                                    reserved_record_store(self._new, peer))
        self.records += copied
        return copied

    async def _copy_all(self, peer: bytes) -> None:
        await self.copy(peer)
        await self.copy_records(peer)

    async def _new(self, op: str, args: dict) -> dict:
        return await self.conns.call(self.new.key, op, args, timeout=CALL_TIMEOUT,
                                     addr=self.new.addr)


async def switch_providers(settings: StateSettings, conns: Connections, ledger: Ledger,
                           new: ProviderClient, renew: Renew) -> None:
    """Hand our side over from the provider it was last held at, if that is not *new*
    (run once per mount), then remember *new* as the one holding it."""
    previous = settings.provider()
    if previous is not None and previous[0] != new.key:
        log.warning("switching providers: moving our side from %s to %s",
                    _short(previous[0]), _short(new.key))
        await Handover(conns, ledger, new, previous, renew, tick=new.tick).run()
    settings.set_provider((new.key, new.addr))
