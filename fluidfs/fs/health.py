"""How safe is each file? Redundancy per file, and the whole-tree check behind `fluidfs check`.

A block's *redundancy* is the number of its shards held on distinct peers; a
file's is the minimum over its blocks. Files small enough to live inline in the
metadata, and blocks kept on this node only (no peers yet), are reported as
such. The check can also probe which holders answer right now, and with
``read_data`` rebuild every block from its shards and verify it.
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from fluidfs.blocks.blockstore import BlockStore, BlockUnavailable
from fluidfs.blocks.record import LOCAL_HOLDER, NO_HOLDER, StoredBlock
from fluidfs.fs.tree import BLOCK_REF, ROOT_INO, Tree

XATTR_REDUNDANCY = b"user.fluidfs.redundancy"


@dataclass
class FileHealth:
    """One file's verdict."""

    path: str
    state: str  # "ok", "degraded", "unrecoverable", "inline", "local", "empty"
    redundancy: str  # e.g. "12/12"


def redundancy(tree: Tree, blocks: BlockStore, ino: int) -> str:
    """The file's redundancy as shown in the xattr: "12/12", "local", "inline", "empty"."""
    values = tree.blocks_of(ino)
    refs = [v[1:] for _, v in values if v[:1] == BLOCK_REF]
    if not refs:
        return "inline" if values else "empty"
    worst = None
    total = blocks.codec.total
    for block_id in refs:
        stored = blocks.load(block_id)
        if stored is None:
            return f"0/{total}"
        if LOCAL_HOLDER in stored.holders:
            return "local"
        live = stored.record.total - stored.missing()
        worst = live if worst is None else min(worst, live)
        total = stored.record.total
    return f"{worst}/{total}"


def walk(tree: Tree) -> Iterator[tuple[str, int]]:
    """(path, ino) of every regular file, depth first from the root."""
    stack = [("", ROOT_INO)]
    while stack:
        prefix, ino = stack.pop()
        for _cookie, name, child in tree.entries(ino):
            node = tree.get(child)
            if node is None:
                continue
            path = f"{prefix}/{name.decode(errors='surrogateescape')}"
            if node.is_dir:
                stack.append((path, child))
            elif stat.S_ISREG(node.mode):
                yield path, child


async def _live(stored: StoredBlock, reachable: Callable[[int], Awaitable[bool]]) -> int:
    """Shards of the block whose recorded holder answers now."""
    live = 0
    for holder in set(stored.holders) - {NO_HOLDER}:
        if await reachable(holder):
            live += stored.holders.count(holder)
    return live


async def check(
    tree: Tree,
    blocks: BlockStore,
    *,
    reachable: Callable[[int], Awaitable[bool]],
    read_data: bool = False,
) -> list[FileHealth]:
    """Check every file: can it be rebuilt from peers that answer now?"""
    verified: dict[bytes, bool] = {}
    results: list[FileHealth] = []
    needed = blocks.codec.needed
    for path, ino in list(walk(tree)):
        values = tree.blocks_of(ino)
        refs = [v[1:] for _, v in values if v[:1] == BLOCK_REF]
        if not refs:
            results.append(FileHealth(path, "inline" if values else "empty", "-"))
            continue
        state, worst, total = "ok", None, blocks.codec.total
        for block_id in refs:
            stored = blocks.load(block_id)
            if stored is None:
                state, worst = "unrecoverable", 0
                break
            total = stored.record.total
            if LOCAL_HOLDER in stored.holders:
                live = total
                state = "local" if state == "ok" else state
            else:
                live = await _live(stored, reachable)
                if live < needed:
                    # The record may be out of date (repair moved shards after the commit
                    # it came from): rebuilding looks for them on every peer and records
                    # where they turn up, so count again before calling the block lost.
                    try:
                        await blocks.rebuild(stored)
                    except BlockUnavailable:
                        pass
                    else:
                        verified[block_id] = True
                        stored = blocks.load(block_id) or stored
                        live = await _live(stored, reachable)
            worst = live if worst is None else min(worst, live)
            if live < needed:
                state = "unrecoverable"
            elif read_data:
                if block_id not in verified:
                    try:
                        await blocks.rebuild(stored)
                        verified[block_id] = True
                    except BlockUnavailable:
                        verified[block_id] = False
                if not verified[block_id]:
                    state = "unrecoverable"
            if state == "ok" and live < total:
                state = "degraded"
        results.append(FileHealth(path, state, f"{worst}/{total}"))
    return results
