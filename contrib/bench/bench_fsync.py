#!/usr/bin/env python3
"""What an fsync costs: a loop of small appends, each followed by fsync, on a real mount.

    python contrib/bench/bench_fsync.py                          # this checkout, 3 rounds
    python contrib/bench/bench_fsync.py --repo /work/main        # beside another checkout
    python contrib/bench/bench_fsync.py --count 200 --size 4K --rounds 5 --peers 0

Each run mounts a new backup (256 KiB blocks) and appends ``--size`` bytes ``--count``
times to one file, each append followed by ``os.fsync``. With ``--peers 1`` (the default)
the mount has one `fluidfs serve` peer that refuses every shard store
(``--fault-rate 1``): every block stays unplaced, its cached plaintext its only copy —
the worst case for an fsync that has to sync those copies. ``--peers 0``: no network
(shards in ``shards.lmdb``). Per run: the loop's wall time and the mount's CPU-seconds
(utime + stime of the node, all threads) over the loop. Checkouts alternate run by run,
so the machine's load falls on both alike; medians per checkout are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import log, parse_size

REPO = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m fluidfs ARGS`` from checkout *repo*."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    return subprocess.run([sys.executable, "-m", "fluidfs", *args], cwd=repo, env=env,
                          capture_output=True, text=True, check=True, timeout=300)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def one_run(repo: Path, work: Path, peers: int, count: int, size: int) -> dict:
    """Mount from *repo*, run the loop, unmount; the run's figures."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    peer = None
    extra: list[str] = []
    if peers:
        cli(repo, "init", "--keyfile", str(work / "peer.key"))
        peer = subprocess.Popen(
            [sys.executable, "-m", "fluidfs", "serve", "--keyfile", str(work / "peer.key"),
             "--state-dir", str(work / "peer"), "--listen", "127.0.0.1:0", "--donate", "2G",
             "--fault-rate", "1"],
            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: (work / "peer" / "listen").exists(), 60, "the peer to listen")
        addr = (work / "peer" / "listen").read_text().strip()
        extra = ["--peer", addr, "--listen", "127.0.0.1:0", "--new"]
    mnt, state = work / "mnt", work / "state"
    mnt.mkdir()
    cli(repo, "init", "--keyfile", str(work / "m.key"))
    try:
        cli(repo, "mount", str(mnt), "--state-dir", str(state), "--keyfile",
            str(work / "m.key"), "--block-size", "256K", *extra)
        pid = int((state / "daemon.pid").read_text())
        if peers:
            wait(lambda: json.loads(cli(repo, "status", "--json", "--state-dir", str(state))
                                    .stdout)["peers_with_agreements"] == peers,
                 60, "the agreement")
        buf = os.urandom(size)
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        for _ in range(count):
            os.write(fd, buf)
            os.fsync(fd)
        wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        os.close(fd)
        shown = json.loads(cli(repo, "status", "--json", "--state-dir", str(state)).stdout)
        cli(repo, "unmount", str(mnt))
    finally:
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if peer is not None:
            peer.send_signal(signal.SIGKILL)
            peer.wait()
    return {"wall": wall, "cpu": cpu, "synced": shown.get("fsync_synced_blocks")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="another checkout to run beside this one")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=parse_size, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", type=int, default=1, choices=(0, 1))
    args = parser.parse_args()
    repos = [REPO, *[r.absolute() for r in args.repo]]
    results: dict[Path, list[dict]] = {repo: [] for repo in repos}
    for n in range(args.rounds):
        for repo in repos:
            with tempfile.TemporaryDirectory(prefix="bench-fsync-") as tmp:
                r = one_run(repo, Path(tmp), args.peers, args.count, args.size)
            results[repo].append(r)
            log(f"round {n} {repo}: wall {r['wall']:.3f} s, mount CPU {r['cpu']:.2f} s, "
                f"cache files synced {r['synced']}")
    print(f"\n{args.count} x (append {args.size} B + fsync), peers={args.peers}, "
          f"medians of {args.rounds}:")
    for repo, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        print(f"  {repo}: wall {wall:.3f} s ({wall / args.count * 1000:.2f} ms an fsync), "
              f"mount CPU {cpu:.2f} s ({cpu / args.count * 1000:.2f} ms an fsync)")


if __name__ == "__main__":
    main()
