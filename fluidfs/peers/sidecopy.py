"""The steps the three moves of our side share (docs/federation.md): a switch of
providers (peers/handover.py), a homecoming (peers/homecoming.py) and a departure to a
provider (peers/departure.py).

Each copies one partner's shards from where our side is held to where it goes
(``copy_shards``: whatever the target lacks, one shard at a time), a provider target
through ``StoreReserved`` (``reserved_store``, refusals raised) and its records through
``StoreReservedRecord`` (``reserved_record_store``). The two that leave a provider OLD
read it through ``OldProvider`` (which notes how long OLD has been silent, so that an
OLD gone for ``give_up`` lets the side move without the copy) and finish a partner with
``leave_old``: copy, renew, copy again what came meanwhile, remove the reservation at OLD.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_LIST_PAGE
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.provider import CALL_TIMEOUT

log = logging.getLogger(__name__)

MAX_LISTED = 1 << 20  # shard ids read from one reservation's listing (a hostile OLD's bound)

Call = Callable[[str, dict], Awaitable[dict]]  # (op, args) to one peer, its reply
FetchShard = Callable[[bytes], Awaitable[bytes | None]]  # a shard's bytes, None if gone
PutShard = Callable[[bytes, bytes], Awaitable[None]]  # keep (id, bytes) at the target


def short(key: bytes) -> str:
    """A peer id short enough for a log line."""
    return encode_peer_id(key)[:12]


async def list_reserved(call: Call, peer: bytes) -> list[bytes]:
    """Every shard id a provider holds under our reservation for *peer*, through *call*
    (op, args) to it: paged, at most MAX_LISTED (a hostile provider's bound)."""
    ids: list[bytes] = []
    after = b""
    while len(ids) < MAX_LISTED:
        page = await call("ListReserved",
                          {"peer": peer, "after": after, "limit": MAX_LIST_PAGE})
        fresh = sorted(sid for sid in page["ids"] if sid > after)  # or we would loop
        ids.extend(fresh)
        if not page["more"] or not fresh:
            break
        after = fresh[-1]
    return ids


async def copy_shards(wanted: Iterable[bytes], fetch: FetchShard, put: PutShard) -> int:
    """Copy each shard id in *wanted* from *fetch* to *put*, one at a time; how many were
    copied (a shard *fetch* no longer has is skipped)."""
    copied = 0
    for sid in wanted:
        data = await fetch(sid)
        if data is None:
            continue
        await put(sid, data)
        copied += 1
    return copied


def reserved_store(call: Call, peer: bytes, where: str) -> PutShard:
    """Keeps *peer*'s shards under our reservation at the provider *call* reaches
    (``StoreReserved``); a refusal raises RpcError naming *where*."""

    async def put(sid: bytes, data: bytes) -> None:
        stored = await call("StoreReserved",
                            {"peer": peer, "shards": [{"id": sid, "data": data}]})
        if stored["refused"]:
            code = stored["refused"][0]["code"]
            raise RpcError(code, f"{where} refused shard {sid.hex()[:12]}")

    return put


def reserved_record_store(call: Call, peer: bytes) -> Callable[[bytes], Awaitable[bool]]:
    """Keeps *peer*'s records under our reservation at the provider *call* reaches
    (``StoreReservedRecord``); True if it stored one."""

    async def keep(raw: bytes) -> bool:
        reply = await call("StoreReservedRecord", {"peer": peer, "record": raw})
        return reply["stored"]

    return keep


class OldProvider:
    """The provider (id, address) our side moves away from, as the mover calls it."""

    def __init__(self, conns: Connections, old: tuple[bytes, str]) -> None:
        self.conns = conns
        self.key, self.addr = old
        self.silent_since: float | None = None  # trio clock; None while it answers

    async def call(self, op: str, args: dict) -> dict:
        """One call to OLD, noting when it started to be silent."""
        try:
            reply = await self.conns.call(self.key, op, args, timeout=CALL_TIMEOUT,
                                          addr=self.addr)
        except PeerUnavailable:
            if self.silent_since is None:
                self.silent_since = trio.current_time()
            raise
        self.silent_since = None
        return reply

    def pending(self, ledger: Ledger) -> list[bytes]:
        """The partners whose side is still reserved at OLD."""
        return [a.peer for a in ledger.active() if a.reserved_at == self.key]

    def gone(self, give_up: float) -> bool:
        """Whether OLD has not answered for *give_up* seconds."""
        silent = self.silent_since
        return silent is not None and trio.current_time() - silent >= give_up

    async def listing(self, peer: bytes) -> list[bytes]:
        """The shard ids OLD holds for *peer*; none if it dropped that reservation
        (account closed: nothing to copy)."""
        try:
            return await list_reserved(self.call, peer)
        except RpcError as exc:
            if exc.code != "no_agreement":
                raise
            return []

    async def fetch(self, peer: bytes, sid: bytes) -> bytes:
        """One of *peer*'s shards as OLD serves it (a stranger's bytes: the target checks
        them against *sid*)."""
        return (await self.call("FetchReserved", {"peer": peer, "id": sid}))["data"]

    async def forward_ends(self, ledger: Ledger) -> None:
        """Remove at OLD the reservations of agreements that ended while held there."""
        for agreement in ledger.ended():
            if agreement.reserved_at != self.key:
                continue
            try:
                await self.call("Unreserve", {"peer": agreement.peer})
            except (PeerUnavailable, RpcError):
                continue  # OLD gone or the account closed: its keep period drops them
            agreement.reserved_at = None
            ledger.save(agreement)


async def leave_old(old: OldProvider, peer: bytes, give_up: float, to: str,
                    copy: Callable[[bytes], Awaitable[object]],
                    renew: Callable[[bytes], Awaitable[bool]]) -> bool:
    """Move our side for *peer* off *old* to *to* (named for the log): *copy* it, have
    the partner *renew* naming the new place, copy again what it stored at OLD meanwhile,
    then remove the reservation at OLD. An OLD silent for *give_up* counts as gone: the
    side moves without the copy. True once the partner renewed."""
    try:
        await copy(peer)
    except PeerUnavailable:
        if not old.gone(give_up):
            raise
        log.warning("provider %s is gone: our side for %s moves to %s empty",
                    short(old.key), short(peer), to)
    if not await renew(peer):
        log.info("partner %s did not renew with %s: its side stays at provider %s",
                 short(peer), to, short(old.key))
        return False
    with contextlib.suppress(PeerUnavailable):  # OLD went away since: nothing more
        await copy(peer)
    try:
        await old.call("Unreserve", {"peer": peer})
    except (PeerUnavailable, RpcError) as exc:
        # The new place holds it now; the old reservation ends with OLD's account or
        # keep period.
        log.info("removing the reservation for %s at provider %s failed: %s",
                 short(peer), short(old.key), exc)
    return True
