"""Large blocks waiting for upload are bounded in bytes, not in blocks (issue 16): a larger
block size must not multiply what a large copy holds in memory while the peers are slow.

The owner's block store uploads through real peer services on 127.0.0.1; the hosts hold
every StoreShard call until the test lets them answer.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from inproc import LocalStore, PeerNode, peer_nodes, slow_jump_clock
from networked import store_through

from fluidfs import keys
from fluidfs.blocks import blockstore
from fluidfs.blocks.record import NO_HOLDER
from fluidfs.concurrency import ByteBudget
from fluidfs.net.messages import MAX_BATCH_SHARD
from fluidfs.service.host import PeerService

N = 4
RING = keys.KeyRing(keys.generate(shards_total=N, shards_needed=2))
BLOCK = 1 << 20  # shards of 512 KiB: a large block's, above MAX_BATCH_SHARD
BLOCKS = 10


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Time that jumps only when this process is idle (every honest answer is in)."""
    return slow_jump_clock()


class Holding(PeerService):
    """Holds every StoreShard call until ``gate`` is set."""

    gate: trio.Event

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op == "StoreShard":
            await self.gate.wait()
        return await super().handle(peer_key, op, args)


async def test_large_blocks_handed_to_the_uploaders_stay_within_the_byte_budget(
    tmp_path, monkeypatch, virtual_clock
):
    """With the peers holding every store, the blocks whose ``put`` returned (their
    shards handed to the uploaders, queued or uploading) hold at most UPLOAD_BYTES of
    shards; once the peers answer, every block is placed whole. Fails on the code
    before, where 4 queued and 4 uploading blocks were let through whatever their size
    (8 of these, 16 MiB of shards against a 5 MiB budget)."""
    budget = 5 << 20
    monkeypatch.setattr(blockstore, "UPLOAD_BYTES", budget, raising=False)
    gate = trio.Event()
    monkeypatch.setattr(Holding, "gate", gate, raising=False)
    returned: list[bytes] = []
    async with peer_nodes(tmp_path, N, service=Holding) as (nursery, hosts):
        owner = await PeerNode(tmp_path / "owner", RING).start(nursery, listen=False)
        store = LocalStore(tmp_path / "state", RING)
        try:
            store_through(store, owner, hosts)
            async with trio.open_nursery() as tasks:  # ends before the store is closed
                await tasks.start(store.blocks.remote.run)
                await tasks.start(store.blocks.run)

                async def put() -> None:
                    returned.append(await store.blocks.put(os.urandom(BLOCK)))

                async with trio.open_nursery() as putters:
                    for _ in range(BLOCKS):
                        putters.start_soon(put)
                    await trio.sleep(1)  # virtual: every put that can return has
                    record = store.blocks.load(returned[0]).record
                    assert record.shard_size > MAX_BATCH_SHARD
                    held = len(returned) * record.total * record.shard_size
                    assert held <= budget, (len(returned), held)
                    gate.set()
                with trio.fail_after(60):
                    await store.blocks.drain()
                tasks.cancel_scope.cancel()
            assert len(returned) == BLOCKS
            for block_id in returned:
                assert NO_HOLDER not in store.blocks.load(block_id).holders
        finally:
            store.close()
            owner.close()


async def test_a_byte_budget_lets_an_oversized_item_through_alone():
    """An item larger than the whole budget passes when nothing else is held (else it
    would wait for ever), and the next waits for it; empty items never wait."""
    budget = ByteBudget(10)
    await budget.take(25)
    assert not budget.try_take(1)
    assert budget.try_take(0)
    taken = trio.Event()

    async def take() -> None:
        await budget.take(4)
        taken.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert not taken.is_set()
        budget.give(25)
        await taken.wait()
    assert budget.used == 4
