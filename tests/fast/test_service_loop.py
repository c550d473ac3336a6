"""The peer service never blocks the event loop (DESIGN.md promise 4).

A partner stores, retrieves, audits and deletes many large shards over a real connection
to a real PeerService in this process while the node writes large batches of its own
shards in a worker thread (as sealing does), and a trio instrument records the longest
task step. A shard-store call made on the loop would wait there for the LMDB writer lock
those batches hold; every one must run in a worker thread.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import nacl.signing
import trio

from fluidfs.blocks import merkle
from fluidfs.net.tcp import open_rpc, serve_tcp
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

MIB = 1024 * 1024
SHARD = 2 * MIB
COUNT = 8
OWN_BATCH = 32  # the node's own shards written per transaction, meanwhile
STALL_LIMIT = 0.1


class LongestStep(trio.abc.Instrument):
    """The longest time one task held the loop: a step's wall time less the time the
    loop's thread spent runnable but waiting for a CPU (the kernel's run delay in
    /proc/.../schedstat), which other processes on a loaded machine cause. Waiting for a
    lock is sleeping, not runnable, so a store blocked on the writer lock still counts."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started: float | None = None  # None: added during a step, not timed
        self._sched = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat",
                              os.O_RDONLY)
        self._delay_at_start = 0.0

    def _run_delay(self) -> float:
        return int(os.pread(self._sched, 128, 0).split()[1]) / 1e9

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()
        self._delay_at_start = self._run_delay()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is not None:
            wall = time.perf_counter() - self._started
            self.longest = max(self.longest, wall - (self._run_delay() - self._delay_at_start))

    def close(self) -> None:
        os.close(self._sched)


async def test_storing_and_serving_big_shards_never_stalls_the_loop(tmp_path: Path):
    db = Database(tmp_path / "meta", META_TABLES)
    shards = ShardStore(tmp_path / "shards")
    ledger = Ledger(db)
    host_key, me = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    svc = PeerService(shards, ledger, PeerList(db, host_key.verify_key.encode()),
                      donate=1 << 30, ratio=1.5, limiter=trio.CapacityLimiter(2),
                      records=RecordStore(tmp_path / "records"), on_end=lambda _key: None)
    owner = me.verify_key.encode()
    ledger.record(owner, we_host=1 << 30, they_host=1 << 30, term=3600)
    blobs = [os.urandom(SHARD) for _ in range(COUNT)]
    ids = [merkle.shard_id(b) for b in blobs]
    steps = LongestStep()
    own = [(os.urandom(32), blobs[0]) for _ in range(OWN_BATCH)]
    sealing = trio.CapacityLimiter(1)

    async def seal_own_data() -> None:
        while True:
            await trio.to_thread.run_sync(shards.put_many, host_key.verify_key.encode(), own,
                                          limiter=sealing)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tcp, "127.0.0.1", 0, host_key, svc)
        nursery.start_soon(seal_own_data)
        async with open_rpc("127.0.0.1", port, me) as conn:
            # What pytest's heap holds is frozen out of the garbage collector meanwhile: a
            # full collection over it is no work of the service (see test_loop_stalls.py).
            gc.collect()
            gc.freeze()
            trio.lowlevel.add_instrument(steps)

            async def round_trip(sid: bytes, blob: bytes) -> None:
                stored = await conn.call("StoreShard", {"shards": [{"id": sid, "data": blob}]},
                                         timeout=60)
                assert stored["stored"] == [sid]
                assert (await conn.call("RetrieveShard", {"id": sid}, timeout=60))["data"] == blob
                await conn.call("AuditShard", {"id": sid, "leaf": 3, "nonce": os.urandom(32)},
                                timeout=60)

            try:
                async with trio.open_nursery() as clients:
                    for sid, blob in zip(ids, blobs, strict=True):
                        clients.start_soon(round_trip, sid, blob)
                deleted = await conn.call("DeleteShard", {"ids": ids}, timeout=60)
                assert deleted["deleted"] == COUNT
            finally:
                trio.lowlevel.remove_instrument(steps)
                steps.close()
                gc.unfreeze()
        nursery.cancel_scope.cancel()
    assert shards.used(owner) == 0
    db.close()
    shards.close()
    assert steps.longest < STALL_LIMIT, f"the loop stalled for {steps.longest * 1000:.0f} ms"
