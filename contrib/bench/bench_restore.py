#!/usr/bin/env python3
"""Issue 16's big-file restore alone, checkouts side by side on the same stored data.

    python contrib/bench/bench_restore.py                         # this checkout, 3 restores
    python contrib/bench/bench_restore.py --repo /tmp/base --rounds 3   # alternating with another
    python contrib/bench/bench_restore.py --size 64M --profile /tmp/prof

One store for all: ``--peers`` ``fluidfs serve`` processes on 127.0.0.1, a mount of this
checkout with ``--peer`` each, a random file of ``--size`` copied in and ``fluidfs sync``
(full redundancy), the keyfile exported with its peers and the mount taken down. Then
each round mounts a fresh state directory with that keyfile, once per checkout in turn
(this one first, then each ``--repo``; alternating runs, so a loaded machine's drift
falls on all of them), drops the page cache, ``cp``s the file out and checks its sha256.

Per restore, divided by the GiB restored: the mount's CPU-seconds by thread (the trio loop
and the worker threads, user and system time, from ``/proc/PID/task``: measured CPU, the
figure to compare), the FUSE requests it answered and its RetrieveShard(s) calls and
shards (``status --json``); and MB/s (wall: noise on a shared machine). Medians per
checkout at the end. ``--profile DIR`` records the last round's restores with
``py-spy record --native`` (paused samples; slows the mount).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
from bench_e2e import ThreadCpu, fluidfs_cli, status
from bench_network import CpuMeter, ServePeer, mount_with_peers, start_peers
from benchlib import (
    MIB,
    REPO,
    Mount,
    drop_caches,
    log,
    make_source,
    parse_size,
    run_cleanup,
    sha256_of,
)

GIB = 1 << 30


def restore_once(
    repo: Path, work: Path, tag: str, keyfile: Path, src: Path, want: str,
    cleanup: list, profile: Path | None,
) -> dict:
    """Mount a fresh state directory of checkout *repo* with *keyfile* and copy the big
    file out: the figures per GiB."""
    benchlib.REPO = repo  # Mount runs ``python -m fluidfs`` from it (benchlib.run)
    try:
        b = Mount(work, tag, ["--listen", "127.0.0.1:0"])
        b.key = keyfile
        cleanup.append(b.cleanup)
        drop_caches()
        b.mount()
        deadline = time.monotonic() + 120
        while src.name not in os.listdir(b.mnt):
            if time.monotonic() > deadline:
                raise RuntimeError("the restored tree did not appear in 120 s")
            time.sleep(0.02)
        pid = b.pid()
        before = status(b.state)
        spy = None
        if profile is not None:
            spy = subprocess.Popen(
                ["py-spy", "record", "--native", "--threads", "--idle", "-f", "raw",
                 "-o", str(profile / f"restore-{tag}.txt"), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cpu = CpuMeter({"mount": [pid]})
        threads = ThreadCpu(pid)
        out = work / f"out-{tag}"
        t0 = time.perf_counter()
        subprocess.run(["cp", str(b.mnt / src.name), str(out)], check=True)
        took = time.perf_counter() - t0
        mount_cpu = cpu.stop()["mount"]
        by_thread = threads.stop()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        after = status(b.state)
        ok = sha256_of(out) == want
        out.unlink()
        b.unmount()
        shutil.rmtree(b.state, ignore_errors=True)
    finally:
        benchlib.REPO = REPO
    gib = src.stat().st_size / GIB

    def grown(key: str) -> dict[str, float]:
        old = before.get(key) or {}
        return {k: round((v - old.get(k, 0)) / gib) for k, v in (after.get(key) or {}).items()
                if v - old.get(k, 0)}

    return {
        "MB/s": src.stat().st_size / 1e6 / took,
        "CPU-s/GiB": mount_cpu / gib,
        **{f"{k}/GiB": v / gib for k, v in by_thread.items()},
        "fuse/GiB": grown("fuse_requests"),
        "retrieve/GiB": grown("retrieve_requests"),
        "sha256_ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 * MIB, help="big file (256M)")
    parser.add_argument("--peers", type=int, default=12, help="serve peers (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="restores per checkout (3)")
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="another checkout to restore with, alternating (repeatable)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the last round's restores into DIR")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    repos = [REPO, *[r.absolute() for r in args.repo]]
    for repo in repos:  # PYTHONDONTWRITEBYTECODE: compile once, as setup.sh does
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "fluidfs")],
                       check=False)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluidfs-restore-"))
    cleanup: list = []
    results: dict[str, list[dict]] = {str(r): [] for r in repos}
    failed = False
    try:
        src = work / "big.bin"
        want = make_source(src, args.size)
        peers = [ServePeer(work / "peers", f"peer{i:02d}") for i in range(args.peers)]
        cleanup.append(lambda: [p.stop() for p in peers])
        log(f"starting {args.peers} peers; storing {args.size / MIB:.0f} MiB")
        start_peers(peers)
        a = mount_with_peers(work, "a", peers, cleanup, timeout=180)
        benchlib.run(["cp", str(src), str(a.mnt / src.name)])
        fluidfs_cli("sync", "--state-dir", str(a.state))
        keyfile = work / "fresh.key"
        keyfile.write_text(fluidfs_cli("key", "export", "--with-peers", "--keyfile",
                                       str(a.key), "--state-dir", str(a.state)).stdout)
        keyfile.chmod(0o600)
        a.unmount()
        for n in range(args.rounds):
            for i, repo in enumerate(repos):
                profile = args.profile if n == args.rounds - 1 else None
                r = restore_once(repo, work, f"{n}-{i}", keyfile, src, want, cleanup, profile)
                results[str(repo)].append(r)
                log(f"{repo}: " + json.dumps(
                    {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
                failed |= not r["sha256_ok"]
    except BaseException as exc:  # report what we have, then clean up
        failed = True
        log(f"benchmark failed: {exc!r}")
    finally:
        failed |= not run_cleanup(cleanup)
        shutil.rmtree(work, ignore_errors=True)
    keys = ("CPU-s/GiB", "loop user/GiB", "loop sys/GiB", "workers user/GiB",
            "workers sys/GiB", "MB/s")
    print("medians        " + "".join(f"{k:>18}" for k in keys))
    for repo, runs in results.items():
        if runs:
            row = [statistics.median(r[k] for r in runs) for k in keys]
            print(f"{Path(repo).name[:14]:<15}" + "".join(f"{v:>18.2f}" for v in row))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
