"""Repair of shards whose holders are merely not recorded (blocks/repair.py ``_locate``).

A fresh machine restores a snapshot taken while a block was still being placed: its
record names fewer holders than hold the block's shards. Repairing it as lost would
download K shards, send the same shards out again and leave the copies already on
peers unaccounted. The repairer first asks its peers to prove the shards (an audit, a
few hundred bytes each) and records where they are.

Owner and hosts are real peer services on 127.0.0.1 in this process, over real LMDB
(test_emergency_repair.py's lab)."""

from __future__ import annotations

from pathlib import Path

import trio
from test_emergency_repair import BANDWIDTH, K, Lab, N, upload, with_lab

from fluidfs.blocks.record import NO_HOLDER, StoredBlock
from fluidfs.blocks.repair import Repairer, RepairPolicy


async def test_shards_without_a_recorded_holder_are_found_not_sent_again(
    tmp_path: Path,
) -> None:
    """Fails before: the repairer placed the four shards again (4 shards' bytes sent)."""

    async def body(lab: Lab, nursery: trio.Nursery) -> None:
        store = lab.store
        placed = await upload(store)
        lagging = [*placed.holders[:K], *[NO_HOLDER] * (N - K)]
        with store.db.write() as txn:  # as a snapshot taken mid-placement names them
            store.blocks.save(txn, StoredBlock(placed.record, 1, lagging))
        store.blocks.under.add(placed.record.block_id)
        held = {h.key: len(list(h.shards.ids(lab.owner.key))) for h in lab.hosts}

        repairer = Repairer(store.blocks, RepairPolicy(interval=3600, bandwidth=BANDWIDTH))
        sent = await repairer.repair(store.blocks.load(placed.record.block_id))

        assert sent == 0, f"{sent} bytes of shards sent again"
        now = store.blocks.load(placed.record.block_id)
        assert now.holders == placed.holders, "every holder recorded where it is"
        assert placed.record.block_id not in store.blocks.under
        assert {h.key: len(list(h.shards.ids(lab.owner.key))) for h in lab.hosts} == held

    await with_lab(tmp_path, body)
