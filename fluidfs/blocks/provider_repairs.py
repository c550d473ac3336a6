"""The user's side of provider-side repair (``mount --provider-repairs``, issue 13 item 4).

While mounted, the user U keeps its provider P able to repair for it
(service/customer_repair.py is P's side):

- every ``tick`` U sends ``RepairGrant``: a delegation naming P (peers/delegation.py,
  signed for ``DEFAULT_TERM``) and the partners P may place shards on, with their
  addresses and the room U's agreements have left there. Partners whose own side is held
  by their provider (``store_at``) are left out: a delegation is shown to the holder
  itself. The grant doubles as U's presence: P repairs only for a customer that said it
  went away or stopped refreshing it.
- U uploads its blocks' repair capabilities (block id, K, N, shard size, shard ids,
  holders' ids) in pages of ``RepairCaps``, each replacing a range of block ids, so a full
  upload also drops deleted blocks: at mount, when holders changed (at most every
  ``caps_every`` seconds) and at unmount. Shards kept on U itself or held at a partner's
  provider are sent without a holder (P leaves them alone).
- At unmount U uploads once more and sends ``RepairAway``.
- At mount, before anything else, U fetches P's journal (``FetchJournal``), checks each
  entry (P's signature, for U, a block U has, the same shard id at that index, a new
  holder U holds a live agreement with and that proves the shard in an audit: a P that
  lied about a move would otherwise have U drop a good copy), merges it
  (``BlockStore.learn_holder``: the old
  holder's copy is queued for deletion) and acknowledges what it read (``AckJournal``).
  Entries that fail a check are counted, logged and dropped with the rest.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nacl.signing
import trio

from fluidfs.blocks import merkle
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_CAPS_PAGE, MAX_JOURNAL_PAGE
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.delegation import sign_delegation
from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.repairjournal import JournalError, Move, read_move
from fluidfs.store.db import scan_batch

log = logging.getLogger(__name__)

LAST_ID = b"\xff" * 32
PAGE_ITEMS = 3000
AUDIT_TIMEOUT = 10.0  # seconds for the new holder of a moved shard to prove it


@dataclass
class JournalMerge:
    """What one merge of the provider's journal found."""

    merged: int = 0  # entries applied to our records
    refused: int = 0  # entries that failed a check
    blocks: set[bytes] = field(default_factory=set)  # blocks whose holders changed


@dataclass
class ProviderRepairs:
    """Keeps the provider able to repair for us, and takes its repairs back in."""

    conns: Connections
    provider: bytes
    self_key: bytes  # ours: the customer the journal names
    provider_addr: str
    identity: nacl.signing.SigningKey
    blocks: BlockStore
    peers: PeerList
    ledger: Ledger
    tick: float = 60.0
    caps_every: float = 600.0
    last_merge: JournalMerge | None = None  # the merge at this mount (status shows it)
    caps_bytes: int = 0
    caps_quota: int = 0
    _uploaded_version: int = -1
    _uploaded_at: float | None = None  # trio clock of the last full upload

    def status(self) -> dict:
        """What ``fluidfs status`` shows: what the provider repaired while we were away
        (the merge at this mount; None until it ran) and our capability's size there."""
        merge = self.last_merge
        return {
            "merged": None if merge is None else merge.merged,
            "refused": None if merge is None else merge.refused,
            "blocks": None if merge is None else len(merge.blocks),
            "caps_bytes": self.caps_bytes,
            "caps_quota": self.caps_quota,
        }

    def with_status(
        self, status: Callable[[dict], Awaitable[dict]]
    ) -> Callable[[dict], Awaitable[dict]]:
        """The node's ``status`` control handler, with provider repairs added."""

        async def handler(request: dict) -> dict:
            reply = await status(request)
            reply["provider_repairs"] = self.status()
            return reply

        return handler

    async def call(self, op: str, args: dict) -> dict:
        """One call to the provider."""
        return await self.conns.call(self.provider, op, args, addr=self.provider_addr)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Merge the journal, then keep the grant and capabilities current until
        cancelled; a provider that does not answer is asked again next tick."""
        merged = False
        task_status.started()
        while True:
            try:
                if not merged:
                    self.last_merge = await self.merge_journal()
                    merged = True
                await self.grant()
                if self._uploaded_version != self.blocks.holders_version and (
                        self._uploaded_at is None
                        or trio.current_time() - self._uploaded_at >= self.caps_every):
                    await self.upload_caps()
            except (PeerUnavailable, RpcError) as exc:
                log.warning("provider repairs: the provider did not take our grant: %s", exc)
            await trio.sleep(self.tick if merged else min(self.tick, 5.0))

    async def leave(self) -> None:
        """At unmount: upload the capabilities as they are now and say we go away."""
        await self.grant()
        await self.upload_caps()
        await self.call("RepairAway", {})

    async def grant(self) -> None:
        """Send a fresh delegation and our partners' room."""
        delegation = sign_delegation(self.identity, self.provider).raw
        partners = []
        for agreement in self.ledger.active():
            peer = self.peers.get(agreement.peer)
            if (peer is None or not peer.addr or agreement.store_at is not None
                    or agreement.peer == self.provider):
                continue
            partners.append({"id": agreement.peer, "addr": str(peer.addr),
                             "room": agreement.room})
        reply = await self.call("RepairGrant", {"delegation": delegation,
                                                "peers": partners[:1024]})
        self.caps_bytes, self.caps_quota = reply["caps_bytes"], reply["caps_quota"]

    async def upload_caps(self) -> int:
        """Upload every block's capability, a page of ids at a time; return how many."""
        version = self.blocks.holders_version
        after: bytes = b""
        sent = 0
        while True:
            page, upto = await trio.to_thread.run_sync(
                self._page, after, limiter=self.blocks.limiter)
            reply = await self.call("RepairCaps", {"after": after, "upto": upto, "put": page})
            self.caps_bytes, self.caps_quota = reply["caps_bytes"], reply["caps_quota"]
            sent += len(page)
            if upto == LAST_ID:
                break
            after = upto
        self._uploaded_version = version
        self._uploaded_at = trio.current_time()
        return sent

    def _page(self, after: bytes) -> tuple[list[dict], bytes]:
        """Up to MAX_CAPS_PAGE capabilities after *after*, and the range's end (in a
        worker thread)."""
        # A message holds at most 4,096 CBOR items: a capability is about 2N + 16.
        limit = max(1, min(MAX_CAPS_PAGE, PAGE_ITEMS // (2 * self.blocks.codec.total + 16)))
        with self.blocks.meta.read() as txn:
            rows, more = scan_batch(txn, self.blocks.meta["blocks"], after, limit)
        page = [self._cap(StoredBlock.decode(key, raw)) for key, raw in rows]
        return page, (rows[-1][0] if more is not None else LAST_ID)

    def _cap(self, stored: StoredBlock) -> dict:
        record = stored.record
        holders = []
        for index in stored.holders:
            key = None if index in (NO_HOLDER, LOCAL_HOLDER) else self.peers.key_of(index)
            agreement = self.ledger.live(key) if key is not None else None
            usable = agreement is not None and agreement.store_at is None
            holders.append(key if usable else b"")
        return {"block": record.block_id, "k": record.needed, "n": record.total,
                "size": record.shard_size, "ids": list(record.shard_ids),
                "holders": holders}

    async def merge_journal(self) -> JournalMerge:
        """Fetch, check and merge the provider's journal, then acknowledge it."""
        result = JournalMerge()
        after = 0
        while True:
            reply = await self.call("FetchJournal", {"after": after,
                                                     "limit": MAX_JOURNAL_PAGE})
            start = after
            for raw in reply["entries"]:
                try:
                    move = read_move(raw, self.provider, self.self_key)
                except JournalError as exc:
                    result.refused += 1
                    log.warning("provider repairs: a journal entry is refused: %s", exc)
                    continue
                after = max(after, move.seq)
                if not await self._new_holder_proves(move):
                    result.refused += 1
                    continue
                used = await trio.to_thread.run_sync(self._apply, move, result,
                                                     limiter=self.blocks.limiter)
                if used is None:
                    result.refused += 1
                    continue
                result.merged += 1
                if used:
                    self.ledger.add_use(move.new, used)
            if not reply["more"] or after == start:  # (a page of forgeries: stop there)
                break
        if after:
            await self.call("AckJournal", {"upto": after})
        if result.merged or result.refused:
            log.info("provider repairs: the provider moved %d shards of %d blocks while we "
                     "were away (%d entries refused)", result.merged, len(result.blocks),
                     result.refused)
        return result

    async def _new_holder_proves(self, move: Move) -> bool:
        """Audit the new holder on the moved shard before believing the provider: a
        journal naming a holder without the shard would have us drop good copies."""
        stored = await trio.to_thread.run_sync(self.blocks.load, move.block,
                                               limiter=self.blocks.limiter)
        if stored is None or move.index >= stored.record.total:
            return False
        size = stored.record.shard_size
        leaf = random.randrange(merkle.leaf_count(size))
        try:
            proof = await self.conns.call(move.new, "AuditShard", {
                "id": move.shard, "leaf": leaf, "nonce": os.urandom(32)},
                timeout=AUDIT_TIMEOUT)
        except (PeerUnavailable, RpcError) as exc:
            log.warning("provider repairs: the new holder of a moved shard does not prove "
                        "it (%s); the move is refused", exc)
            return False
        return merkle.verify(move.shard, size, leaf, proof["leaf_data"], proof["path"])

    def _apply(self, move: Move, result: JournalMerge) -> int | None:
        """Merge one verified move into our record (in a worker thread): the bytes the
        new holder keeps for us from now on, or None if the move is refused."""
        stored = self.blocks.load(move.block)
        if stored is None or move.index >= stored.record.total:
            return None
        if stored.record.shard_ids[move.index] != move.shard:
            log.warning("provider repairs: a move names another shard id; refused")
            return None
        peer = self.peers.get(move.new)
        if peer is None or self.ledger.live(move.new) is None:
            return None
        if stored.holders[move.index] == peer.index:
            return 0  # already recorded there (a merge repeated before its ack)
        self.blocks.learn_holder(move.block, move.index, peer.index)
        result.blocks.add(move.block)
        return stored.record.shard_size
