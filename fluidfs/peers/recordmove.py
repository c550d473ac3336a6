"""A partner's records (root pointer, writer lease) follow our side when it moves.

When our side of an agreement with partner X moves (to another provider,
peers/handover.py; home from a provider, peers/homecoming.py), the records we keep for X
at the old place are copied to the new one along with X's shards, so that X's lease
holder and its readers find them there at once instead of after X's next publication.

A record read from the old place is a stranger's bytes: it is kept at the new place only
as ``PutRecord`` would keep it from X itself (``adopt``): it must parse, be X's own and
carry X's valid signature; a record whose fence is below the highest held for X there is
refused (its writer was replaced), and a held record of that kind with a higher seq (or
other contents at the same seq) is never replaced. There is no compare-and-swap: once X
renewed with the new place its own writes land there, and a copied record is older than
those (refused) or the very one X last wrote at the old place.

The copy is best effort: a record the old place lacks, cannot serve or serves wrong is
skipped (logged), never holding the move up; X's next publication puts it there anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.peers import rootrecord
from fluidfs.store.records import KINDS, RecordStore

log = logging.getLogger(__name__)

Fetch = Callable[[str], Awaitable[bytes | None]]  # a kind's record at the old place, or None
Keep = Callable[[bytes], Awaitable[bool]]  # keep one at the new place; True if stored


def fetch_reserved(call: Callable[[str, dict], Awaitable[dict]], peer: bytes) -> Fetch:
    """Reads *peer*'s records under our reservation at a provider, through *call* (op,
    args) to it: None for a kind it does not hold or a reservation it dropped."""

    async def fetch(kind: str) -> bytes | None:
        try:
            reply = await call("FetchReservedRecord", {"peer": peer, "kind": kind})
        except RpcError as exc:
            if exc.code in ("not_found", "no_agreement"):
                return None
            raise
        return reply["record"]

    return fetch


def held_seq_fence(raw: bytes) -> tuple[int, int]:
    """The (seq, fence) of a record held in a store ((-1, 0) if it no longer parses: it
    gets replaced)."""
    try:
        env = rootrecord.parse(raw)
    except rootrecord.RecordError:
        return -1, 0
    return env.seq, env.fence


def adopt(records: RecordStore, key: bytes, owner: bytes, raw: bytes) -> tuple[bool, int]:
    """Keep *raw*, a record of *owner* copied from elsewhere, in *records* under *key* by
    the rules above; (stored, seq now held, -1 for none). Raises ``RecordError`` for a
    record that is not *owner*'s validly signed own. Blocking: call from a worker thread."""
    record = rootrecord.parse(raw)
    if record.owner != owner:
        raise rootrecord.RecordError("the record is not that partner's own")
    if not record.signed_ok():
        raise rootrecord.RecordError("record signature does not verify")
    return records.put_if_newer(key, record.kind, record.raw, record.seq, held_seq_fence,
                                fence=record.fence)


async def copy_records(peer: bytes, fetch: Fetch, keep: Keep) -> int:
    """Copy each kind of *peer*'s record from the old place (*fetch*) to the new one
    (*keep*); how many the new place stored. A kind that cannot be fetched or is refused
    is skipped (``PeerUnavailable`` from either place propagates: the caller decides)."""
    copied = 0
    for kind in KINDS:
        try:
            raw = await fetch(kind)
            if raw is not None and await keep(raw):
                copied += 1
        except (RpcError, rootrecord.RecordError) as exc:
            log.warning("%s's %s record was not copied: %s", encode_peer_id(peer)[:12],
                        kind, exc)
    return copied
