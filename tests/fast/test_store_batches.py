"""Several small shards per ``StoreShard`` (issue 15): a burst of small blocks (a
commit's metadata nodes) goes to each holder in few calls, recorded and counted exactly
as single stores are; a hostile answer to a batch leaves every shard in it uncertain
and placed elsewhere, and never ends the node.

The owner's block store uploads through real peer services on 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from inproc import LocalStore, PeerNode, peer_nodes, slow_jump_clock
from networked import store_through, storing_through

from fluidfs import keys
from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.repair import Repairer, RepairPolicy
from fluidfs.blocks.storebatch import GATHER_SHARDS, GATHER_WAIT
from fluidfs.fs.commit import PLACED_POLL, wait_placed
from fluidfs.net.messages import MAX_BATCH_IDS
from fluidfs.service.host import PeerService

N = 4
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=2))
BLOCKS = 48  # small blocks put in one burst, as a commit writes its nodes
WAITERS = 16  # nodes waiting for placement at once
PER_CALL = 2  # the least the calls to one holder carry on average (~8 on a quiet machine)


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Time that jumps only when this process is idle (every honest answer is in)."""
    return slow_jump_clock()


class Counting(PeerService):
    """Counts the StoreShard calls it answers and the shards in each, and every op."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.calls: list[int] = []
        self.ops: Counter[str] = Counter()

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        self.ops[op] += 1
        if op == "StoreShard":
            self.calls.append(len(args["shards"]))
        return await super().handle(peer_key, op, args)


class InFlight(Counting):
    """Counts the most StoreShard calls it answered at once."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.running = self.most = 0

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op != "StoreShard":
            return await super().handle(peer_key, op, args)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await trio.sleep(0.01)  # a host a little slower than the owner's burst
            return await super().handle(peer_key, op, args)
        finally:
            self.running -= 1


class NamesUnsent(Counting):
    """Stores what it is sent, then answers that it stored a shard it was never sent."""

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        reply = await super().handle(peer_key, op, args)
        if op == "StoreShard":
            reply = {**reply, "stored": [*reply["stored"], os.urandom(32)]}
        return reply


async def start_uploads(store: LocalStore, nursery: trio.Nursery) -> None:
    """Start the store's batch senders and uploaders in *nursery*."""
    await nursery.start(store.blocks.remote.run)
    await nursery.start(store.blocks.run)


async def put_burst(store: LocalStore, nursery: trio.Nursery) -> list[bytes]:
    """``start_uploads`` in *nursery*, then ``put_blocks``."""
    await start_uploads(store, nursery)
    return await put_blocks(store)


async def put_blocks(store: LocalStore, count: int = BLOCKS) -> list[bytes]:
    """Put *count* small blocks at once (a commit's node writers run concurrently), the
    uploaders running; wait until every upload was tried; the block ids."""
    ids: list[bytes] = []

    async def put() -> None:
        ids.append(await store.blocks.put(os.urandom(3000)))

    async with trio.open_nursery() as putters:
        for _ in range(count):
            putters.start_soon(put)
    with trio.fail_after(30):
        await store.blocks.drain()
    return ids


@asynccontextmanager
async def after_a_burst(
    tmp_path: Path, service: type[PeerService]
) -> AsyncIterator[tuple[LocalStore, PeerNode, list[PeerNode], list[bytes]]]:
    """An owner storing through N hosts running *service* once it has put BLOCKS blocks
    in one burst (``put_burst``), each shard of each with a holder: (store, owner, hosts,
    block ids)."""
    async with storing_through(tmp_path, N, RING, service=service) as (store, owner, hosts):
        async with trio.open_nursery() as tasks:  # ends before the store is closed
            ids = await put_burst(store, tasks)
            tasks.cancel_scope.cancel()
        for block_id in ids:
            assert NO_HOLDER not in store.blocks.load(block_id).holders, (
                "every shard has its holder")
        yield store, owner, hosts, ids


async def test_a_burst_of_small_blocks_reaches_each_holder_in_few_calls(
    tmp_path: Path,
) -> None:
    """Before: one StoreShard per shard, BLOCKS calls to every holder."""
    async with after_a_burst(tmp_path, Counting) as (store, owner, hosts, ids):
        for block_id in ids:
            stored = store.blocks.load(block_id)
            for i, holder in enumerate(stored.holders):
                host = hosts[[owner.peers.get(h.key).index for h in hosts].index(holder)]
                assert host.shards.get(owner.key, stored.record.shard_ids[i])
        for host in hosts:
            calls = host.service.calls
            assert sum(calls) == BLOCKS, "one shard of each block on each of the N"
            assert len(calls) <= BLOCKS // PER_CALL, calls
            assert owner.ledger.get(host.key).they_use == host.shards.used(owner.key)
        assert not store.blocks.under


async def test_one_store_call_at_a_time_to_a_peer(tmp_path: Path) -> None:
    """Batched stores run one StoreShard call at a time to a peer, so the shards that
    arrive meanwhile go together in the next one. Before: two calls at once, each
    carrying half as many shards (and costing the host as much)."""
    async with after_a_burst(tmp_path, InFlight) as (_, _, hosts, _):
        for host in hosts:
            assert sum(host.service.calls) == BLOCKS
            assert host.service.most == 1, host.service.most


async def test_a_batch_answer_naming_an_unsent_shard_counts_as_no_answer(
    tmp_path: Path,
) -> None:
    """The liar's shards go elsewhere, none is recorded on it, and what it keeps is
    journalled for deletion (it may hold them: the answer could not be trusted)."""
    async with peer_nodes(tmp_path, N, service=Counting) as (nursery, honest):
        liar = await PeerNode(tmp_path / "liar", service=NamesUnsent).start(nursery)
        owner = await PeerNode(tmp_path / "owner", RING).start(nursery, listen=False)
        store = LocalStore(tmp_path / "state", RING)
        try:
            store_through(store, owner, [*honest, liar])
            async with trio.open_nursery() as tasks:  # ends before the store is closed
                ids = await put_burst(store, tasks)
                liar_index = owner.peers.get(liar.key).index
                assert liar.service.calls, "the liar was asked"
                for block_id in ids:
                    holders = store.blocks.load(block_id).holders
                    assert NO_HOLDER not in holders and liar_index not in holders
                assert owner.ledger.get(liar.key).they_use == 0
                await store.blocks.collector.collect()
                tasks.cancel_scope.cancel()
            assert liar.shards.used(owner.key) == 0, "what it was sent is taken back"
        finally:
            store.close()
            owner.close()
            liar.close()


async def test_blocks_waiting_for_their_first_upload_are_left_to_it(tmp_path: Path) -> None:
    """A commit's nodes wait in the upload queue, short of holders; a repair pass then
    must not take them. Before: repair took every short block not uploading at that
    moment, so each queued node was looked for on every peer (an AuditShard per peer
    and shard) and rebuilt, racing its own upload."""
    async with storing_through(tmp_path, N, RING, service=Counting) as (store, _owner, hosts):
        ids: list[bytes] = []

        async def put() -> None:
            ids.append(await store.blocks.put(os.urandom(3000)))

        async with trio.open_nursery() as tasks:  # ends before the store is closed
            await tasks.start(store.blocks.remote.run)
            async with trio.open_nursery() as putters:
                for _ in range(8):  # more than the upload queue holds: some wait in put
                    putters.start_soon(put)
                with trio.fail_after(10):
                    while len(store.blocks.under) < 8:
                        await trio.sleep(0.01)
                await Repairer(store.blocks, RepairPolicy()).repair_pass()
                await tasks.start(store.blocks.run)  # the uploaders start only now
            with trio.fail_after(30):
                await store.blocks.drain()
            tasks.cancel_scope.cancel()
        for block_id in ids:
            assert NO_HOLDER not in store.blocks.load(block_id).holders
        for host in hosts:
            assert host.service.ops["AuditShard"] == 0, host.service.ops
            assert sum(host.service.calls) == len(ids), "each shard sent once"


async def test_nodes_waiting_for_placement_wake_for_their_own_upload(tmp_path: Path) -> None:
    """A commit's node writers each wait for their own node's placement. Before: every
    upload's end woke every waiter, and each re-read its record (and re-armed a 50 ms
    timer): O(nodes in flight) record reads per upload."""
    async with storing_through(tmp_path, N, RING) as (store, _owner, _hosts):
        blocks = store.blocks
        sealed = []
        for _ in range(WAITERS):
            data = os.urandom(3000)
            record, shards = store.codec.seal(data, store.codec.block_id(data))
            with store.db.write() as txn:
                blocks.save(txn, StoredBlock(record, 1, [NO_HOLDER] * N))
            blocks.under.add(record.block_id)
            sealed.append((record, shards))
        reads = 0
        load = blocks.load

        def counted(*args, **kw):
            nonlocal reads
            reads += 1
            return load(*args, **kw)

        placed: list[bool] = []

        async def wait(block_id: bytes) -> None:
            placed.append(await wait_placed(blocks, [block_id], stall=30, limit=60))

        blocks.load = counted
        started = trio.current_time()
        async with trio.open_nursery() as waiters:
            for record, _ in sealed:
                waiters.start_soon(wait, record.block_id)
            await trio.testing.wait_all_tasks_blocked()
            for record, shards in sealed:  # one upload after another
                await blocks.upload(record, shards)
        polls = (trio.current_time() - started) / PLACED_POLL
        assert placed == [True] * WAITERS
        own = 2 * WAITERS  # each upload reads its record twice
        assert reads - own <= WAITERS * (2 + polls), (reads - own, polls)


class TasksSpawned(trio.abc.Instrument):
    """Counts the tasks spawned by the owner's block code (fluidfs.blocks), by name."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if task.name.startswith("fluidfs.blocks."):
            self.names[task.name] += 1


async def test_a_small_block_is_stored_by_about_one_task_not_one_per_shard(
    tmp_path: Path,
) -> None:
    """Storing a block of 8 small shards spawned a task per shard: 9.3 tasks per block
    here, counting the block's upload and the batch senders. One task now waits for all
    of a block's shards (a ``StoreGroup``): 1.3. Every shard still reaches a holder."""
    ring = keys.KeyRing(keys.generate(shards_total=8, shards_needed=4))
    async with storing_through(tmp_path, 8, ring) as (store, _owner, _hosts):
        async with trio.open_nursery() as tasks:  # ends before the store is closed
            await start_uploads(store, tasks)
            counter = TasksSpawned()
            trio.lowlevel.add_instrument(counter)
            try:
                ids = await put_blocks(store)
            finally:
                trio.lowlevel.remove_instrument(counter)
            tasks.cancel_scope.cancel()
        for block_id in ids:
            assert NO_HOLDER not in store.blocks.load(block_id).holders
        per_block = sum(counter.names.values()) / BLOCKS
        assert per_block <= 2, (per_block, counter.names)


async def test_a_call_waits_for_the_shards_of_blocks_being_put(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """While more small blocks are being put, a call about to leave with fewer than
    GATHER_SHARDS shards waits for theirs (at most GATHER_WAIT): a burst of BLOCKS blocks
    reaches each holder in one call. Time jumps only when the process is idle, so the
    wait ends on the shards, not on a loaded machine's timing. Before: a call left as
    soon as its peer was free, with what had arrived meanwhile (three calls: 2, 25 and
    21 shards)."""
    async with after_a_burst(tmp_path, Counting) as (_, _, hosts, _):
        for host in hosts:
            calls = host.service.calls
            assert sum(calls) == BLOCKS
            assert len(calls) <= -(-BLOCKS // GATHER_SHARDS), calls


async def test_a_burst_beyond_one_call_goes_in_full_calls(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A burst of small blocks whose shards to a holder fill more than one call (a
    commit's 136 leaves after 1,000 small files) reaches it in full calls: one call
    runs to a peer at a time, so each call that leaves half full is one more round trip
    in a row. Before: a call left once it had half a call's shards (32), and a burst of
    100 took three calls or more (e.g. 33, 64, 3)."""
    burst = MAX_BATCH_IDS + MAX_BATCH_IDS // 2
    async with storing_through(tmp_path, N, RING, service=Counting) as (store, _owner, hosts):
        async with trio.open_nursery() as tasks:
            await start_uploads(store, tasks)
            await put_blocks(store, burst)
            tasks.cancel_scope.cancel()
        for host in hosts:
            calls = host.service.calls
            assert sum(calls) == burst
            assert len(calls) <= -(-burst // MAX_BATCH_IDS), calls
        assert not store.blocks.under, "every shard has its holder"
        assert not store.blocks.remote.store_batches._queued, "no bytes left counted queued"


async def spin_until(predicate, what: str) -> None:
    """Yield to the other tasks until *predicate* holds (30 s of real time at most). The
    run is never idle meanwhile, so a slow-jump clock's virtual time stands still."""
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await trio.sleep(0)


async def test_a_gathering_call_leaves_once_nothing_more_is_coming(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A call waiting for the shards of a block still being put leaves as soon as that put
    ends without an upload (a block stored already): a small commit's level of nodes
    does not wait GATHER_WAIT for nothing. Before: it waited until GATHER_WAIT passed."""
    async with (
        storing_through(tmp_path, N, RING, service=Counting) as (store, _owner, _hosts),
        trio.open_nursery() as tasks,  # ends before the store is closed
    ):
        await start_uploads(store, tasks)
        stored = os.urandom(3000)
        await store.blocks.put(stored)
        with trio.fail_after(30):
            await store.blocks.drain()
        gate = threading.Event()

        def held() -> bytes:  # a put of a stored block, held in its worker thread
            gate.wait(30)
            return stored

        tasks.start_soon(store.blocks.put, held)
        tasks.start_soon(store.blocks.put, os.urandom(3000))
        batches = store.blocks.remote.store_batches
        await spin_until(batches.gathering, "a call gathering shards")
        started = trio.current_time()
        gate.set()
        await spin_until(lambda: not store.blocks.putting and not batches.gathering(),
                         "the puts to end and the call to leave")
        with trio.fail_after(30):
            await store.blocks.drain()
        assert trio.current_time() - started < GATHER_WAIT
        assert not store.blocks.under, "the new block is placed"
        tasks.cancel_scope.cancel()


async def test_a_burst_of_uploads_commits_a_transaction_per_block_and_a_few_per_call(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """Each block's first attempts were journalled in a write transaction of their own
    before its shards joined the queues, and each block's holders were recorded in one
    of their own when its upload ended: with the block's record when it is put and the
    outcomes of each call, three a block and one a call (48 blocks on 4 hosts in 8 calls:
    152 commits of ``meta.lmdb``). Now a call's shards are journalled together just
    before it leaves, and the uploads that a call's answer ends record their holders in
    one transaction (blocks/recordwrites.py): one a block and at most three a call (66).
    Counted as LMDB's own count of committed write transactions."""
    async with storing_through(tmp_path, N, RING, service=Counting) as (store, _owner, hosts):
        before = store.db.env.info()["last_txnid"]
        async with trio.open_nursery() as tasks:
            await put_burst(store, tasks)
            tasks.cancel_scope.cancel()
        commits = store.db.env.info()["last_txnid"] - before
        calls = sum(len(host.service.calls) for host in hosts)
        assert sum(sum(host.service.calls) for host in hosts) == BLOCKS * N
        assert commits <= BLOCKS + 3 * calls + 2, (commits, calls)
        assert not store.blocks.under, "every shard has its holder"


async def test_a_call_whose_journal_fails_is_not_sent(
    tmp_path: Path, virtual_clock: trio.testing.MockClock
) -> None:
    """A batched call journals its shards before it leaves; if that transaction fails
    (here: the journal raises, as a full disk would make it), the call is not sent: no
    host gets a shard nobody journalled, the blocks stay short of holders (for repair
    to place) and the block store goes on. Before the calls journalled their own shards,
    ``place`` did, and its failure ended the block's upload the same way; without the
    guard in ``StoreBatches._call`` the error would end the batch senders, and the node."""
    async with storing_through(tmp_path, N, RING, service=Counting) as (store, _owner, hosts):

        def disk_full(_txn, _shards: list) -> None:
            raise OSError(28, "No space left on device")

        store.blocks.collector._placing_in = disk_full
        async with trio.open_nursery() as tasks:
            ids = await put_burst(store, tasks)
            tasks.cancel_scope.cancel()
        assert all(not host.service.calls for host in hosts)
        assert set(ids) <= store.blocks.under
        for block_id in ids:
            assert set(store.blocks.load(block_id).holders) == {NO_HOLDER}
