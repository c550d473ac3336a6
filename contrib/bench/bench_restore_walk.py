"""Walking a restored tree on a fresh machine when each fetch costs a round trip.

    /tmp/venv/bin/python contrib/bench/bench_restore_walk.py               # 200 dirs x 100
    /tmp/venv/bin/python contrib/bench/bench_restore_walk.py --delay 0 0.005 0.02

In process (real LMDB, real block store, real node decoding in worker threads): machine
A commits ``--dirs`` directories of ``--per-dir`` files of 200 B; for each ``--delay``
(seconds added to every block read, standing in for the network's round trip), machine
B adopts the commit from a copy of A's shards and walks it depth-first in name order,
loading each directory before listing it as FUSE opendir/readdir do — once with
directories loaded only when the walk reaches them, once with the prefetcher fetching
them ahead (``Restorer.prefetch``). ``bench_scale.py`` measures the same walk through
FUSE with 12 real peers on 127.0.0.1, where there is no round trip to hide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fast"))
from inproc import LocalStore, Metadata  # noqa: E402

from fluidfs import keys  # noqa: E402
from fluidfs.fs.tree import ROOT_INO  # noqa: E402

RING = keys.KeyRing(keys.generate())
BLOCK_SIZE = 64 * 1024


async def commit_tree(root: Path, dirs: int, per_dir: int):
    a = LocalStore(root / "a", RING, BLOCK_SIZE)
    try:
        payload = os.urandom(192)
        for d in range(dirs):
            ino = a.mkdir(ROOT_INO, f"d{d:05d}")
            for f in range(per_dir):
                await a.create(ino, f"f{d * per_dir + f:07d}", payload + f.to_bytes(8, "big"))
        return (await Metadata(a).commit()).ref
    finally:
        a.close()


async def walk(store: LocalStore, meta: Metadata) -> int:
    """Depth-first in name order, loading each directory first; how many names it saw."""
    names = 0
    stack = [ROOT_INO]
    while stack:
        ino = stack.pop()
        await meta.restorer.ensure(ino)
        entries = sorted(store.tree.entries(ino), key=lambda e: e[1], reverse=True)
        names += len(entries)
        stack.extend(child for _, _, child in entries if store.tree.get(child).is_dir)
    return names


async def timed_walk(root: Path, ref, delay: float, ahead: bool) -> tuple[float, int]:
    shutil.rmtree(root / "b", ignore_errors=True)
    shutil.copytree(root / "a" / "shards", root / "b" / "shards")
    b = LocalStore(root / "b", RING, BLOCK_SIZE)
    try:
        meta = Metadata(b)
        meta.holders.learn([ref])
        with b.db.write() as txn:
            meta.index.adopt(txn, ref)
        meta.restorer.adopt_root((await meta.index.load(ref.block_id)).commit)
        real = b.blocks.read_parsed

        async def over_the_network(*args, **kw):
            await trio.sleep(delay)
            return await real(*args, **kw)

        b.blocks.read_parsed = over_the_network
        async with trio.open_nursery() as nursery:
            if ahead:
                nursery.start_soon(meta.restorer.prefetch)
            started = time.perf_counter()
            names = await walk(b, meta)
            took = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        return took, names
    finally:
        b.close()


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="fluidfs-bench-walk-"))
    try:
        ref = await commit_tree(root, args.dirs, args.per_dir)
        print(f"{args.dirs + 1} directories, {args.dirs * args.per_dir:,} files")
        print(f"{'per fetch, ms':>14} {'on demand, s':>13} {'prefetch, s':>12} {'ratio':>6}")
        for delay in args.delay:
            alone, n1 = await timed_walk(root, ref, delay, ahead=False)
            ahead, n2 = await timed_walk(root, ref, delay, ahead=True)
            assert n1 == n2 == args.dirs * (args.per_dir + 1), (n1, n2)
            print(f"{delay * 1000:14.1f} {alone:13.2f} {ahead:12.2f} {alone / ahead:6.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dirs", type=int, default=200)
    parser.add_argument("--per-dir", type=int, default=100)
    parser.add_argument("--delay", type=float, nargs="+", default=[0.0, 0.005, 0.02])
    trio.run(main, parser.parse_args())
