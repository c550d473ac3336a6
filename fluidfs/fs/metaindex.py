"""The local index of metadata nodes: which nodes we know and the references they hold.

Reference counting (the ``refcount`` of each record in table ``blocks``) covers
metadata the same way it covers file maps:

- every block map entry holds one reference to its data block (fs/filedata.py);
- every *registered* metadata node holds one reference to each block it names
  (data blocks, manifest chunks, child directory nodes, snapshot trees);
- the commit module holds one reference to each commit node it keeps as a head
  (fs/commit.py), and commits hold short-lived references while they are written.

So a kept snapshot keeps alive everything it reaches, and dropping a node's last
reference drops one reference of each of its children in turn (``drop``), in the
same transaction; blocks that reach zero go to garbage collection.

A node is *registered* once the references it holds have been taken: right away for
nodes this machine writes, and when it is first fetched for nodes that came from the
network (a fresh machine). Until then its record may exist (its parent named it) but
it holds nothing.

Table ``meta_nodes`` (meta.lmdb, format version 1): key node block id (32) → ``u8 1 ||
u32 count || count x (u8 kind || block id (32))``, kind 1 = metadata node, 0 = data.

Dropping a snapshot can cascade through every node of a tree, so ``drop_and_release``
does not do it in one transaction on the loop. It journals the references to drop in
table ``dropping`` (format version 1: key block id (32) → ``u32`` references still to
drop), in the caller's transaction when it has one (``journal_drops``), and ``drain``
works the journal off in worker threads, DROP_BATCH entries per write transaction:
each batch drops its references, deletes the nodes that died and journals their
children, all in one transaction. So a crash half way loses nothing: whatever is left
in the journal is drained by the next ``drain`` (every commit ends with one).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import trio

from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.concurrency import map_limited
from fluidfs.fs.metaformat import (
    INDEX,
    LEAF,
    MANIFEST,
    Entry,
    NodeError,
    Ref,
    TreeNode,
    decode_node,
)
from fluidfs.store.db import Database, scan_batch

log = logging.getLogger(__name__)

VERSION = 1
_HEAD = struct.Struct(">BI")
_CHILD = 33
# Nodes of one directory's tree fetched at once (a level at a time): 64 leaves of
# ~32 KiB (at most 256 KiB) while their shard reads share RetrieveShards calls.
FETCHERS = 64
DROP_BATCH = 500  # journal entries worked off per write transaction
_COUNT = struct.Struct(">I")


class MetaError(Exception):
    """A metadata node cannot be fetched or does not parse."""


class Holders:
    """Translates shard holders between local peer indexes and public keys."""

    def __init__(
        self,
        self_key: bytes,
        key_of: Callable[[int], bytes | None],
        index_of: Callable[[bytes], int],
    ) -> None:
        self.self_key = self_key
        self.key_of = key_of  # local index -> public key
        self.index_of = index_of  # public key -> local index (learning the peer if new)

    def ref(self, stored: StoredBlock) -> Ref:
        """A stored block as a self-contained reference."""
        keys: list[bytes | None] = []
        for holder in stored.holders:
            if holder == NO_HOLDER:
                keys.append(None)
            elif holder == LOCAL_HOLDER:
                keys.append(self.self_key)
            else:
                keys.append(self.key_of(holder))
        return Ref(stored.record, tuple(keys))

    def learn(self, refs) -> None:
        """Make sure every holder the references name is a known peer.

        Call it before opening a write transaction that adopts *refs*: learning a peer
        writes the peer list in a transaction of its own.
        """
        for ref in refs:
            self.local(ref)

    def local(self, ref: Ref) -> list[int]:
        """A reference's holders as local peer indexes."""
        out = []
        for key in ref.holders:
            if key is None:
                out.append(NO_HOLDER)
            elif key == self.self_key:
                out.append(LOCAL_HOLDER)
            else:
                out.append(self.index_of(key))
        return out


def _encode_children(children: list[tuple[bytes, bool]]) -> bytes:
    parts = [_HEAD.pack(VERSION, len(children))]
    parts += [(b"\x01" if is_node else b"\x00") + bid for bid, is_node in children]
    return b"".join(parts)


def decode_children(raw: bytes) -> list[tuple[bytes, bool]]:
    """Parse a ``meta_nodes`` value."""
    version, count = _HEAD.unpack_from(raw)
    if version != VERSION:
        raise ValueError(f"unknown meta_nodes record version {version}")
    pos = _HEAD.size
    out = []
    for i in range(count):
        item = raw[pos + i * _CHILD : pos + (i + 1) * _CHILD]
        out.append((bytes(item[1:]), item[0] == 1))
    return out


class MetaIndex:
    """Registers metadata nodes, holds their references and releases them in cascade."""

    def __init__(self, meta: Database, blocks: BlockStore, holders: Holders) -> None:
        self.meta = meta
        self.blocks = blocks
        self.holders = holders
        self._nodes = meta["meta_nodes"]
        self._dropping = meta["dropping"]
        self._blocks = meta["blocks"]
        self._loading: dict[bytes, trio.Lock] = {}

    def registered(self, block_id: bytes, txn=None) -> bool:
        """True once the node's references are held."""
        if txn is not None:
            return txn.get(block_id, db=self._nodes) is not None
        with self.meta.read() as own:
            return own.get(block_id, db=self._nodes) is not None

    def children(self, block_id: bytes) -> list[tuple[bytes, bool]] | None:
        """The blocks a registered node holds, or None if it is not registered."""
        with self.meta.read() as txn:
            raw = txn.get(block_id, db=self._nodes)
        return None if raw is None else decode_children(raw)

    def count(self) -> int:
        """How many nodes are registered."""
        with self.meta.read() as txn:
            return txn.stat(self._nodes)["entries"]

    def node_ids(self) -> set[bytes]:
        """Ids of every registered node."""
        with self.meta.read() as txn:
            return {bytes(k) for k in txn.cursor(db=self._nodes).iternext(values=False)}

    def register(self, txn, block_id: bytes, children: list[tuple[Ref | bytes, bool]]) -> None:
        """Take one reference to each child for the node *block_id*, inside *txn*.

        A child given as a Ref whose block has no record yet gets one (a node fetched
        from the network names blocks this machine has not seen); a child given as a
        block id must exist (KeyError otherwise). Does nothing if already registered.
        """
        if txn.get(block_id, db=self._nodes) is not None:
            return
        ids: list[tuple[bytes, bool]] = []
        for child, is_node in children:
            if isinstance(child, Ref):
                self.adopt(txn, child)
                ids.append((child.block_id, is_node))
            else:
                self.blocks.add_ref(txn, child)
                ids.append((child, is_node))
        txn.put(block_id, _encode_children(ids), db=self._nodes)

    def adopt(self, txn, ref: Ref, refs: int = 1) -> None:
        """Take *refs* references to the block of *ref*, creating its record if needed.

        An existing record keeps its holders, but shards it knows no holder for are
        filled in from *ref* (when both describe the same shards). The holders must be
        known peers already (``Holders.learn``, outside the transaction).
        """
        block_id = ref.block_id
        stored = self.blocks.load(block_id, txn)
        holders = self.holders.local(ref)
        if stored is None:
            stored = StoredBlock(ref.record, refs, holders)
        else:
            stored.refcount += refs
            if stored.record.shard_ids == ref.record.shard_ids:
                for i, holder in enumerate(holders):
                    if stored.holders[i] == NO_HOLDER and holder != NO_HOLDER:
                        stored.holders[i] = holder
        self.blocks.save(txn, stored)
        if stored.missing() and self.blocks.remote is not None:
            self.blocks.under.add(block_id)

    def journal_drops(self, txn, block_ids: list[bytes]) -> None:
        """Journal one reference to drop for each of *block_ids*, inside *txn*; ``drain``
        drops them (and whatever dies with them)."""
        for block_id in block_ids:
            raw = txn.get(block_id, db=self._dropping)
            count = _COUNT.unpack(raw)[0] if raw is not None else 0
            txn.put(block_id, _COUNT.pack(count + 1), db=self._dropping)

    async def drain(self) -> int:
        """Drop every journalled reference, cascading through nodes that die, in
        worker threads (DROP_BATCH per transaction); release what died batch by batch.
        Returns how many blocks died."""
        died = 0
        more = True
        while more:
            dead, more = await trio.to_thread.run_sync(
                self._drain_batch, limiter=self.blocks.limiter
            )
            died += len(dead)
            await self.blocks.release(dead)
        return died

    def _drain_batch(self) -> tuple[list[StoredBlock], bool]:
        """Work off up to DROP_BATCH journal entries in one write transaction (in a
        worker thread); return the blocks that died and whether entries remain."""
        dead: list[StoredBlock] = []
        with self.meta.write() as txn:
            found, _ = scan_batch(txn, self._dropping, b"", DROP_BATCH)
            for block_id, _ in found:
                # Read again: a node that died earlier in this batch may have added to it.
                raw = txn.get(block_id, db=self._dropping)
                if raw is None:
                    continue
                txn.delete(block_id, db=self._dropping)
                for _ in range(_COUNT.unpack(raw)[0]):
                    gone = self.blocks.drop_ref(txn, block_id)
                    if gone is None:
                        continue
                    dead.append(gone)
                    node = txn.get(block_id, db=self._nodes)
                    if node is not None:
                        txn.delete(block_id, db=self._nodes)
                        children = decode_children(bytes(node))
                        self.journal_drops(txn, [bid for bid, _ in children])
            more = txn.stat(self._dropping)["entries"] > 0
        return dead, more

    async def drop_and_release(self, block_ids: list[bytes]) -> int:
        """Drop one reference to each block (cascading), releasing what died; return
        how many died."""
        for start in range(0, len(block_ids), DROP_BATCH):
            await trio.to_thread.run_sync(
                self._journal, block_ids[start : start + DROP_BATCH], limiter=self.blocks.limiter
            )
        return await self.drain()

    def _journal(self, block_ids: list[bytes]) -> None:
        with self.meta.write() as txn:
            self.journal_drops(txn, block_ids)

    async def load(
        self, block_id: bytes, fetched: list[tuple[bytes, TreeNode]] | None = None
    ) -> TreeNode:
        """Fetch, parse and (if new to us) register the node *block_id*. With a
        *fetched* list, a leaf is appended to it instead of registered here: the caller
        registers it in its own write transaction (``register_fetched``). An index node
        is registered at once: registering it records the nodes below it, which are
        fetched next."""
        stored = self.blocks.load(block_id)
        if stored is None:
            raise MetaError(f"no record for metadata node {block_id.hex()[:16]}")
        size = stored.record.size

        def parse(plain: bytes) -> TreeNode:  # in the worker thread that opens the block
            if len(plain) != size:
                raise MetaError(f"metadata node {block_id.hex()[:16]} is short")
            try:
                return decode_node(plain)
            except NodeError as exc:
                raise MetaError(f"metadata node {block_id.hex()[:16]}: {exc}") from None

        try:
            node = await self.blocks.read_parsed(block_id, parse)
        except BlockUnavailable as exc:
            raise MetaError(f"metadata node {block_id.hex()[:16]} unavailable: {exc}") from None
        if fetched is not None and node.type != INDEX:
            fetched.append((block_id, node))
        elif not self.registered(block_id):
            self.holders.learn(ref for ref, _ in node.refs())
            lock = self._loading.setdefault(block_id, trio.Lock())
            async with lock:
                with self.meta.write() as txn:
                    if self.blocks.load(block_id, txn) is not None:
                        self.register(txn, block_id, list(node.refs()))
            self._loading.pop(block_id, None)
        return node

    def register_fetched(self, txn, fetched: list[tuple[bytes, TreeNode]]) -> None:
        """Register, inside *txn*, the nodes ``load`` put in a *fetched* list (those
        whose record exists and that are not registered yet). Call
        ``learn_fetched`` before opening *txn*."""
        for block_id, node in fetched:
            if self.blocks.load(block_id, txn) is not None:
                self.register(txn, block_id, list(node.refs()))

    def learn_fetched(self, fetched: list[tuple[bytes, TreeNode]]) -> None:
        """Learn the holders the *fetched* nodes name (outside any write transaction)."""
        for _, node in fetched:
            self.holders.learn(ref for ref, _ in node.refs())

    async def entries(
        self, top: bytes, fetched: list[tuple[bytes, TreeNode]] | None = None
    ) -> list[Entry]:
        """Every entry of the chunked tree whose top node is *top*, in name order.
        *fetched*: as for ``load``, for every node of the tree.

        The tree is read a level at a time, every node of a level at once (at most
        FETCHERS in flight): a directory of a thousand small files is ~130 leaves under
        one or two index nodes, and fetching them together makes their shard reads to
        each peer share ``RetrieveShards`` calls, where one index node's children at a
        time paid a round trip for every few leaves."""
        level: list[tuple[bytes, TreeNode]] = [(top, await self.load(top, fetched))]
        while True:
            below: list[bytes] = []
            for block_id, node in level:
                if node.type == INDEX:
                    below.extend(ref.block_id for _, ref, _ in node.children)
                elif node.type != LEAF:
                    raise MetaError(f"node {block_id.hex()[:16]} is not a directory node")
            if not below:
                return [entry for _, node in level for entry in node.entries]
            loaded = iter(zip(below, await self._load_all(below, fetched), strict=True))
            level = [
                child
                for item in level
                for child in (
                    [item] if item[1].type == LEAF else [next(loaded) for _ in item[1].children]
                )
            ]

    async def _load_all(
        self, block_ids: list[bytes], fetched: list[tuple[bytes, TreeNode]] | None
    ) -> list[TreeNode]:
        """``load`` each of *block_ids*, FETCHERS at once; the nodes in their order (one
        MetaError for the caller if any fails, not a group)."""
        async def load(block_id: bytes) -> TreeNode:
            return await self.load(block_id, fetched)

        return await map_limited(load, block_ids, FETCHERS, MetaError)

    async def file_blocks(self, entry: Entry) -> tuple[list, list]:
        """A file entry's (block index, ref) and (block index, inline bytes) lists."""
        if not entry.chunks:
            return entry.blocks, entry.inline
        blocks: list = []
        inline: list = []
        for _, ref in entry.chunks:
            node = await self.load(ref.block_id)
            if node.type != MANIFEST:
                raise MetaError(f"node {ref.block_id.hex()[:16]} is not a manifest chunk")
            blocks.extend(node.blocks)
            inline.extend(node.inline)
        return blocks, inline
