"""Moving a user's side between holders: a provider switch against bringing it home.

    .venv/bin/python contrib/bench/bench_provider_moves.py [--shards 64] [--runs 3]

In process (real services, real LMDB, real loopback sockets; ``tests/fast/inproc.py``):
partner X stores ``--shards`` shards of 1 MiB under user U's side at provider P. Then
U's side moves, through U, one shard at a time: to provider P2 (``peers/handover.py``:
fetched from P, stored at P2) and, on a fresh set of nodes, home to U
(``peers/homecoming.py``: fetched from P, kept in U's shard store). Prints MiB/s of each
and their ratio, per run (the machine is shared: compare within a run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fast"))
from inproc import PeerNode  # noqa: E402

from fluidfs.blocks import merkle  # noqa: E402
from fluidfs.peers.handover import Handover  # noqa: E402
from fluidfs.peers.homecoming import Homecoming, LocalSide  # noqa: E402
from fluidfs.peers.manager import PeerManager  # noqa: E402
from fluidfs.peers.provider import ProviderClient  # noqa: E402

MIB = 1 << 20
SIZE = 128 * MIB  # what U offers X


async def move(root: Path, shards: int, home: bool) -> float:
    """MiB/s of one move of *shards* MiB (to P2, or home with *home*)."""
    p, p2 = PeerNode(root / "p", provider=True), PeerNode(root / "p2", provider=True)
    u, x = PeerNode(root / "u", proposes_only=True), PeerNode(root / "x")
    try:
        async with trio.open_nursery() as nursery:
            for node in (p, p2, u, x):
                await node.start(nursery)
            for provider in (p, p2):
                provider.service.provider.book.add(u.key, 1 << 30)
            client = ProviderClient(u.conns, u.ledger, p.key, p.addr)
            await PeerManager(u.conns, u.peers, u.ledger, donate=1 << 30,
                              agreement_size=SIZE, provider=client).add(x.addr)
            for _ in range(0, shards, 8):
                batch = [os.urandom(MIB) for _ in range(8)]
                await x.conns.call(u.key, "StoreShard", {"shards": [
                    {"id": merkle.shard_id(d), "data": d} for d in batch]})
            if home:
                alone = PeerManager(u.conns, u.peers, u.ledger, donate=1 << 30,
                                    agreement_size=SIZE)
                side = LocalSide(u.shards, u.ledger, 1 << 30, u.key, trio.CapacityLimiter(2))
                mover = Homecoming(u.conns, u.ledger, side, (p.key, p.addr), alone.take_back)
            else:
                new = ProviderClient(u.conns, u.ledger, p2.key, p2.addr)
                renew = PeerManager(u.conns, u.peers, u.ledger, donate=1 << 30,
                                    agreement_size=SIZE, provider=new).move_to_provider
                mover = Handover(u.conns, u.ledger, new, (p.key, p.addr), renew)
            started = time.perf_counter()
            assert await mover.move_all() == 1
            seconds = time.perf_counter() - started
            nursery.cancel_scope.cancel()
        return shards / seconds
    finally:
        for node in (p, p2, u, x):
            node.close()


async def main(args: argparse.Namespace) -> None:
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            switch = await move(Path(a), args.shards, home=False)
            home = await move(Path(b), args.shards, home=True)
        print(f"switch to P2 {switch:.1f} MiB/s, home {home:.1f} MiB/s "
              f"(ratio {home / switch:.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=64, help="shards of 1 MiB (multiple of 8)")
    parser.add_argument("--runs", type=int, default=3)
    trio.run(main, parser.parse_args())
