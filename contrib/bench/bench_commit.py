"""Commit and remount figures: what one changed file costs, and how soon a fresh machine lists.

    /tmp/venv/bin/python contrib/bench/bench_commit.py                # 10,000 files, 12 peers
    /tmp/venv/bin/python contrib/bench/bench_commit.py --files 2000 --peers 12 --json out.json

Steps, all through the real CLI with `fluidfs serve` peers on 127.0.0.1:

1. machine A mounts with every peer, writes ``--files`` files (``--dirs`` directories,
   sizes drawn from ``--sizes``) and runs ``fluidfs sync`` (first commit);
2. A changes one file, ``fluidfs sync`` again: the metadata nodes and bytes written by
   that commit (from ``fluidfs sync --json``) are the figure the issue asks for;
3. ``fluidfs key export --with-peers``, A unmounts;
4. machine B (new state dir, new port, only the exported keyfile) mounts; the time
   until ``fluidfs mount`` returns, then the time of ``find MNT | wc -l`` from that
   moment, are measured; the count must equal A's.

Everything is torn down at the end (mounts unmounted, peers killed by pid).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLUIDFS = [sys.executable, "-m", "fluidfs"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [*FLUIDFS, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"fluidfs {' '.join(args)}: {result.stderr.strip()}")
    return result


class Peers:
    """`fluidfs serve` processes, killed by pid at the end."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.addrs: list[str] = []
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for i in range(count):
            key = root / f"peer{i}.key"
            cli("init", "--keyfile", str(key))
            state = root / f"peer{i}"
            logf = open(root / f"peer{i}.log", "ab")  # noqa: SIM115 - lives with the process
            self.procs.append(
                subprocess.Popen(
                    [*FLUIDFS, "serve", "--keyfile", str(key), "--state-dir", str(state),
                     "--listen", "127.0.0.1:0", "--donate", "8G"],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env, cwd=REPO,
                )
            )
        for i in range(count):
            listen = root / f"peer{i}" / "listen"
            deadline = time.monotonic() + 30
            while not listen.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"peer {i} did not start")
                time.sleep(0.05)
            self.addrs.append(listen.read_text().strip())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)


def unmount(path: Path) -> None:
    if os.path.ismount(path) and subprocess.run(
        ["fusermount3", "-u", str(path)], capture_output=True
    ).returncode:
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def make_tree(root: Path, files: int, dirs: int, sizes: list[int], seed: int) -> int:
    """Two levels of directories (about sqrt(dirs) at the top), files spread evenly."""
    rng = random.Random(seed)
    paths = [root]
    top = max(1, int(dirs**0.5))
    made = 0
    for t in range(top):
        parent = root / f"dir{t:04d}"
        parent.mkdir()
        paths.append(parent)
        made += 1
        for s in range(dirs // top - 1):
            if made >= dirs:
                break
            path = parent / f"sub{s:04d}"
            path.mkdir()
            paths.append(path)
            made += 1
    dirs = made
    for i in range(files):
        size = rng.choice(sizes)
        (rng.choice(paths) / f"file{i:05d}.dat").write_bytes(rng.randbytes(size))
    return files + dirs


def sync(state: Path) -> dict:
    return json.loads(cli("sync", "--json", "--state-dir", str(state)).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--dirs", type=int, default=200)
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--sizes", default="100,1000,3000,20000",
                        help="file sizes to draw from, bytes, comma-separated")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="fluidfs-bench-commit-", dir=args.workdir))
    peers = None
    mounts = [work / "a-mnt", work / "b-mnt"]
    figures: dict = {"files": args.files, "dirs": args.dirs, "peers": args.peers}
    try:
        for m in mounts:
            m.mkdir()
        log(f"starting {args.peers} peers")
        peers = Peers(work, args.peers)
        key = work / "a.key"
        cli("init", "--keyfile", str(key))
        peer_args = [a for addr in peers.addrs for a in ("--peer", addr)]
        cli("mount", str(mounts[0]), "--keyfile", str(key), "--state-dir", str(work / "a-state"),
            "--listen", "127.0.0.1:0", "--commit-quiet", "3600", *peer_args)
        log(f"writing {args.files} files in {args.dirs} directories")
        started = time.perf_counter()
        entries = make_tree(mounts[0], args.files, args.dirs, sizes, seed=1)
        figures["write_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        first = sync(work / "a-state")
        figures["first_sync"] = first | {"wall_seconds": time.perf_counter() - started}
        log(f"first sync: {first['nodes_written']} nodes, {first['bytes_written']} bytes")
        victim = next(mounts[0].rglob("file00042.dat"))
        victim.write_bytes(b"changed " + os.urandom(500))
        started = time.perf_counter()
        second = sync(work / "a-state")
        figures["one_file_sync"] = second | {"wall_seconds": time.perf_counter() - started}
        log(f"one changed file: {second['nodes_written']} nodes, {second['bytes_written']} "
            f"bytes ({second['shard_bytes']} bytes of shards)")
        exported = cli("key", "export", "--with-peers", "--keyfile", str(key),
                       "--state-dir", str(work / "a-state")).stdout
        (work / "b.key").write_text(exported)
        os.chmod(work / "b.key", 0o600)
        cli("unmount", str(mounts[0]))
        log("machine B mounts with the exported keyfile only")
        started = time.perf_counter()
        cli("mount", str(mounts[1]), "--keyfile", str(work / "b.key"),
            "--state-dir", str(work / "b-state"), "--listen", "127.0.0.1:0")
        figures["fresh_mount_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        count = subprocess.run(f"find {mounts[1]} | wc -l", shell=True, capture_output=True,
                               text=True, check=True).stdout.strip()
        figures["find_seconds"] = time.perf_counter() - started
        figures["find_count"] = int(count)
        figures["expected_count"] = entries + 1
        log(f"fresh mount {figures['fresh_mount_seconds']:.2f} s; find | wc -l = {count} "
            f"in {figures['find_seconds']:.2f} s")
        started = time.perf_counter()
        subprocess.run(["cat", str(next(mounts[1].rglob("file00042.dat")))],
                       capture_output=True, check=True)
        figures["first_read_seconds"] = time.perf_counter() - started
        cli("unmount", str(mounts[1]))
    finally:
        for m in mounts:
            unmount(m)
        for state in ("a-state", "b-state"):
            pid_file = work / state / "daemon.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
        if peers is not None:
            peers.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    one = figures["one_file_sync"]
    print(f"tree: {args.files} files in {args.dirs} directories, {args.peers} peers")
    print(f"first commit: {figures['first_sync']['nodes_written']} metadata blocks, "
          f"{figures['first_sync']['bytes_written']:,} bytes "
          f"(sync {figures['first_sync']['wall_seconds']:.2f} s)")
    print(f"commit after changing one file: {one['nodes_written']} metadata blocks, "
          f"{one['bytes_written']:,} bytes plaintext, {one['shard_bytes']:,} bytes of shards "
          f"(sync {one['wall_seconds']:.2f} s)")
    print(f"fresh machine: mount {figures['fresh_mount_seconds']:.2f} s, "
          f"find | wc -l = {figures['find_count']} (expected {figures['expected_count']}) "
          f"in {figures['find_seconds']:.2f} s, first read {figures['first_read_seconds']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["find_count"] == figures["expected_count"] else 1


if __name__ == "__main__":
    sys.exit(main())
