#!/usr/bin/env python3
"""The commit inside a small-file ``fluidfs sync``, in process (issue 16).

    python contrib/bench/bench_small_commit.py                  # 1,000 x 4 KiB, 12 peers
    python contrib/bench/bench_small_commit.py --files 3000 --delay 0.05
    python contrib/bench/bench_small_commit.py --repo /tmp/base  # another checkout

Writes ``--files`` files of 4 KiB into one directory of a local store (inline in the
block map, as ``cp -r`` into the mount leaves them), then commits the tree once to
``--peers`` real peer services on 127.0.0.1 in the same trio run (tests/fast/inproc.py).
Prints the metadata nodes written, the CPU of the trio thread and of the process during
the commit (the peers' services included: they run in this process), the StoreShard
calls, and the virtual time the commit took on a clock that jumps only while the
process is idle (tests/fast/inproc.py ``thread_aware_clock``). With ``--delay``, every
request the owner makes waits that long first, so the virtual time over the delay is
the number of round trips one after another the commit waited for; without it, the
virtual time is what idle timers (gathers, polls) added to the commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    args = parser.parse_args()
    sys.path[:0] = [str(args.repo), str(args.repo / "tests" / "fast")]

    import trio
    from inproc import LocalStore, Metadata, PeerNode, peer_nodes, thread_aware_clock
    from networked import store_through

    from fluidfs import keys
    from fluidfs.service.host import PeerService

    ring = keys.KeyRing(keys.generate(shards_total=args.peers, shards_needed=args.peers * 2 // 3))
    ops: Counter[str] = Counter()

    class Counting(PeerService):
        async def handle(self, peer_key: bytes, op: str, call_args: dict) -> dict:
            ops[op] += 1
            return await super().handle(peer_key, op, call_args)

    async def run(tmp: Path) -> None:
        async with peer_nodes(tmp, args.peers, service=Counting) as (nursery, hosts):
            owner = await PeerNode(tmp / "owner", ring).start(nursery, listen=False)
            store = LocalStore(tmp / "state", ring)
            store_through(store, owner, hosts)
            if args.delay:
                call = owner.conns.call

                async def slow(*a, **kw):
                    await trio.sleep(args.delay)
                    return await call(*a, **kw)

                owner.conns.call = slow
            meta = Metadata(store)
            try:
                async with trio.open_nursery() as tasks:
                    await tasks.start(store.blocks.remote.run)
                    await tasks.start(store.blocks.run)
                    folder = store.mkdir(1, "small")
                    for i in range(args.files):
                        await store.create(folder, f"f{i:05d}", os.urandom(4096))
                    ops.clear()
                    loop0, cpu0, virtual0 = time.thread_time(), time.process_time(), (
                        trio.current_time())
                    result = await meta.commit()
                    loop = time.thread_time() - loop0
                    cpu = time.process_time() - cpu0
                    virtual = trio.current_time() - virtual0
                    tasks.cancel_scope.cancel()
            finally:
                store.close()
                owner.close()
        stats = result.stats
        print(f"{args.files} x 4 KiB files, {args.peers} peers, checkout {args.repo}")
        print(f"  metadata nodes written   {stats.nodes_written} ({stats.bytes_written} bytes)")
        print(f"  trio thread CPU          {loop:.3f} s (peers' services included)")
        print(f"  process CPU              {cpu:.3f} s")
        print(f"  StoreShard calls         {ops['StoreShard']}")
        rounds = f" = {virtual / args.delay:.1f} rounds of {args.delay} s" if args.delay else ""
        print(f"  virtual time             {virtual:.3f} s{rounds}")

    with tempfile.TemporaryDirectory(prefix="fluidfs-small-commit-") as tmp:
        trio.run(run, Path(tmp), clock=thread_aware_clock(0.01))


if __name__ == "__main__":
    main()
