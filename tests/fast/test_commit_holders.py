"""Commits record the holders blocks gained after they were first committed.

Commits are incremental (fs/dirstate.py): a directory is re-read only when it changes.
A commit made while some blocks still lack a holder names them short; once placement
completes, `fluidfs sync` must commit those directories again, so that the published
snapshot, as a fresh machine reads it, names every holder. A real node with three
in-process hosts (tests/fast/test_conflicts.py's machine, N=3, K=2); one host refuses
stores at first (no agreement on its side), so every block gets 2 of 3 holders.
"""

from __future__ import annotations

import logging
import os
import stat

import trio
from test_conflicts import MIB, keyfile_hosts, machine, new_inode, write_file

from fluidfs.fs.metaformat import MANIFEST_INLINE_BLOCKS, Ref, TreeNode, decode_node
from fluidfs.fs.tree import ROOT_INO
from fluidfs.node.node import Node

SMALL_BLOCK = 4096  # a file of MANIFEST_INLINE_BLOCKS + 1 blocks stays small


async def published_refs(node: Node) -> list[Ref]:
    """Every reference in the newest published commit, read node by node from the
    commit node down (what a fresh machine restoring it would see)."""
    head = node.committer.heads.latest()
    assert head is not None and head.published
    refs: list[Ref] = []
    queue = [head.node]
    while queue:
        block_id = queue.pop()
        plain = await node.blocks.read(block_id, 0, 1 << 30)
        for ref, is_node in decode_node(plain).refs():
            refs.append(ref)
            if is_node:
                queue.append(ref.record.block_id)
    return refs


async def read_node(node: Node, block_id: bytes) -> TreeNode:
    return decode_node(await node.blocks.read(block_id, 0, 1 << 30))


async def dir_nodes(node: Node, top: bytes) -> dict[bytes, TreeNode]:
    """The nodes one directory is made of (its index nodes and leaves), by id."""
    found: dict[bytes, TreeNode] = {}
    queue = [top]
    while queue:
        block_id = queue.pop()
        found[block_id] = decoded = await read_node(node, block_id)
        queue += [ref.record.block_id for _, ref, _ in decoded.children]
    return found


async def entry_node(node: Node, top: bytes, name: bytes) -> bytes:
    """The node naming subdirectory *name* of the directory whose top node is *top*."""
    for decoded in (await dir_nodes(node, top)).values():
        for entry in decoded.entries:
            if entry.name == name:
                return entry.content.record.block_id
    raise AssertionError(f"{name!r} is not in the directory")


async def reachable(node: Node, top: bytes) -> set[bytes]:
    """Every metadata node reachable from *top*."""
    found: set[bytes] = set()
    queue = [top]
    while queue:
        block_id = queue.pop()
        if block_id in found:
            continue
        found.add(block_id)
        queue += [ref.record.block_id for ref, is_node in (await read_node(node, block_id)).refs()
                  if is_node]
    return found


def short(refs: list[Ref]) -> list[Ref]:
    return [r for r in refs if any(h is None for h in r.holders)]


async def test_sync_after_placement_publishes_every_holder(tmp_path, caplog) -> None:
    """Before: the sync found "the same tree" and the published snapshot kept naming
    two of three holders for every block written while a host refused stores."""
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        node.data.block_size = SMALL_BLOCK  # a big file's manifest without 256 MiB
        late = hosts[2]
        late.ledger.end(ring.public_key)  # refuses stores: blocks get 2 of 3 holders
        deep = new_inode(node, ROOT_INO, b"deep", stat.S_IFDIR | 0o750)
        await write_file(node, deep, b"small.txt", b"short of one holder")
        await write_file(
            node, deep, b"big.bin", os.urandom(SMALL_BLOCK * (MANIFEST_INLINE_BLOCKS + 1))
        )
        other = new_inode(node, ROOT_INO, b"other", stat.S_IFDIR | 0o750)
        await write_file(node, other, b"kept.txt", b"another directory")
        first = await node.commits.commit(user_changed=True, stall=0.5)
        assert first is not None and first.stats.incomplete_refs
        assert not first.stats.weak_refs, "K holders each: the commit is published"
        assert short(await published_refs(node)), "the test commits short references"

        late.ledger.record(ring.public_key, we_host=64 * MIB, they_host=64 * MIB, term=3600)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.repairer.run)  # places what the refusal left out
            reply = await node.remount_requests.sync(60.0)
            nursery.cancel_scope.cancel()
        assert reply["published"] and reply["full"], repr(reply)
        refs = await published_refs(node)
        assert len(refs) > MANIFEST_INLINE_BLOCKS, "the manifest's block refs are read"
        assert short(refs) == [], f"{len(short(refs))} of {len(refs)} refs still short"

        # Complete now: a one-file change writes its path only (other/, root): deep/ is
        # named by its committed node. Lists are cut where their entries' keyed hashes
        # say (metaformat.cut_points), so a path's directory or the snapshot list is at
        # times two leaves and an index node: the nodes are counted against those the
        # commit names, not against a fixed 4 (other, root, snapshots, commit).
        before = node.committer.heads.latest()
        deep_node = await entry_node(node, before.tree, b"deep")
        # Read now: the new commit's publication releases the nodes only this one names.
        old_tree, old_all = await reachable(node, before.tree), await reachable(node, before.node)
        await write_file(node, other, b"kept.txt", b"changed")
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="fluidfs.fs.commit"):
            after = await node.commits.commit(user_changed=True, stall=0.5)
        written = [r.getMessage() for r in caplog.records]  # "new node ..." each, and why
        assert after is not None and after.stats.dirs == 2, (after.stats, written)
        head = node.committer.heads.latest()
        assert await entry_node(node, head.tree, b"deep") == deep_node, "deep/ was rewritten"
        path = await dir_nodes(node, head.tree)
        path.update(await dir_nodes(node, await entry_node(node, head.tree, b"other")))
        new_in_tree = await reachable(node, head.tree) - old_tree
        assert new_in_tree <= path.keys(), (new_in_tree - path.keys(), written)
        named = await reachable(node, head.node) - old_all
        assert after.stats.nodes_written <= len(named), (after.stats, len(named), written)


async def test_directories_that_cannot_be_complete_are_not_reread_by_every_commit(
    tmp_path,
) -> None:
    """With a host refusing for good (fewer holders than shards for every block), no
    block is ever placed whole: a later one-file change elsewhere still reads only its
    own path, not every directory whose references stay short."""
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        hosts[2].ledger.end(ring.public_key)
        for name in (b"d1", b"d2", b"d3"):
            sub = new_inode(node, ROOT_INO, name, stat.S_IFDIR | 0o750)
            await write_file(node, sub, b"f", name * 100)
        first = await node.commits.commit(user_changed=True, stall=0.5)
        assert first is not None and first.stats.incomplete_refs
        for turn in range(2):
            await write_file(node, ROOT_INO, b"top.txt", b"turn %d" % turn)
            later = await node.commits.commit(user_changed=True, stall=0.5)
            assert later is not None and later.stats.dirs == 1, later.stats
