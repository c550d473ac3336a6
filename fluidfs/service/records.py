"""Record RPCs: partners keep their signed root pointer and writer lease with us.

A record (``PutRecord``) is kept only for a peer with a live agreement, only if the peer
is its owner and its signature verifies, one per kind; a lower seq never replaces a higher
one, nor other contents at the same seq; a record whose fence is below the highest fence
of the owner's records held here is refused (its writer was replaced); and with
``expect`` (compare-and-swap, how the writer lease is taken and renewed) it is kept only
if the held record of its kind has exactly that seq (0: none held); a record the disk
cannot take without eating into the reserve our own writes need is refused
(``over_quota``, store/records.py). Records go with
the agreement (peers/lifecycle.py). A storage provider keeps a customer's partners'
records by the same rules (``keep_record``, service/provider.py). Every record-store call
runs in a worker thread of the service's limiter.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from fluidfs.diskspace import FULL_ERRNOS
from fluidfs.net.errors import RpcError
from fluidfs.peers import rootrecord
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.recordmove import held_seq_fence
from fluidfs.service.ops import Args, Op, Reply
from fluidfs.store.records import RecordStore


@dataclass
class RecordOps:
    """Answers PutRecord and GetRecord (``records`` None: this node keeps no records)."""

    records: RecordStore | None
    ledger: Ledger
    limiter: trio.CapacityLimiter

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name."""
        return {"PutRecord": self.put, "GetRecord": self.get}

    async def put(self, peer: bytes, args: Args) -> Reply:
        """Keep the caller's record unless we hold a newer one."""
        if self.records is None:
            raise RpcError("refused", "this peer keeps no records")
        if self.ledger.live(peer) is None:
            raise RpcError("no_agreement", "no live storage agreement with you")
        return await keep_record(self.records, peer, peer, args, self.limiter)

    async def get(self, peer: bytes, args: Args) -> Reply:
        """The caller's record of a kind."""
        if self.records is None:
            raise RpcError("not_found", "no such record here")
        return await read_record(self.records, peer, args["kind"], self.limiter)


async def keep_record(
    records: RecordStore, key: bytes, caller: bytes, args: Args, limiter: trio.CapacityLimiter
) -> Reply:
    """``PutRecord`` of *caller*'s own record into *records* under *key* (the caller
    itself, or on a provider the reservation it stores under), by the rules above."""
    try:
        record = rootrecord.parse(args["record"])
    except rootrecord.RecordError as exc:
        raise RpcError("bad_request", str(exc)) from None
    if record.owner != caller:
        raise RpcError("bad_request", "a record can only be stored by its owner")
    if not record.signed_ok():
        raise RpcError("bad_request", "record signature does not verify")
    with over_quota_if_full():
        stored, held = await trio.to_thread.run_sync(
            functools.partial(
                records.put_if_newer,
                key,
                record.kind,
                record.raw,
                record.seq,
                held_seq_fence,
                fence=record.fence,
                expect=args.get("expect"),
            ),
            limiter=limiter,
        )
    return {"stored": stored, "seq": max(held, 0)}


@contextmanager
def over_quota_if_full() -> Iterator[None]:
    """Answer a record store that the disk cannot take (past the reserve, or the disk
    itself full) with ``over_quota``: the peer hears why, the node goes on."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise
        raise RpcError("over_quota", "no room on this peer's disk for your record") from None


async def read_record(
    records: RecordStore, key: bytes, kind: str, limiter: trio.CapacityLimiter
) -> Reply:
    """``GetRecord``: the record of *kind* held in *records* under *key*."""
    if kind not in rootrecord.KINDS:
        raise RpcError("not_found", "no such record here")
    raw = await trio.to_thread.run_sync(records.get, key, kind, limiter=limiter)
    if raw is None:
        raise RpcError("not_found", "no such record of yours here")
    return {"record": raw}

