#!/usr/bin/env python3
"""A fresh machine's mount, step by step: until the restored tree is visible.

    python contrib/bench/bench_fresh_mount.py                       # this checkout, 5 mounts
    python contrib/bench/bench_fresh_mount.py --repo /tmp/base      # beside another checkout
    python contrib/bench/bench_fresh_mount.py --mounts 9 --peers 12 --json out.json

Starts ``--peers`` ``fluidfs serve`` processes on 127.0.0.1, mounts a new backup with all
of them, writes a small tree (``--files`` 4 KiB files in one directory beside a
subdirectory), syncs, exports the keyfile with its peers and unmounts. Then, ``--mounts``
times per checkout (alternating between them, so that the machine's load falls on both
alike), mounts a new state directory with that keyfile alone, as bench_e2e.py's
"fresh mount until the tree is visible" row does, and records:

- ``visible``: from starting ``fluidfs mount`` until ``os.listdir`` of the mount shows
  the tree (the row's figure);
- ``cli returned``: until ``fluidfs mount`` exited (it waits for the node to say ready);
- the node's CPU-seconds (utime + stime of the background node up to ``visible``) and
  those of the ``fluidfs mount`` process itself (from its rusage);
- the megabytes each read from disk (the node's ``read_bytes`` in /proc/PID/io up to
  ``visible``, the command's ``ru_inblock``): with ``--drop-caches`` (root) the page
  cache is dropped before each fresh mount, as bench_e2e.py does before its row, so the
  interpreter and every module the mount imports come from disk. The peers run on the
  same machine and keep the shared libraries they map in memory, so a machine with no
  peer processes reads more;
- a timeline from the node's log lines (its timestamps, against the start), for the
  steps the mount logs: services listening, restored commit, mounted; and the gate's
  own steps (``mount gate:`` line: peers dialled and root read, lease taken, tree adopted),
  each in seconds of its own, where the checkout logs them.

Medians per checkout are printed side by side. Each fresh mount is unmounted and its
state removed before the next (each pays the lease handover of a clean unmount).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench_network import ServePeer, start_peers
from benchlib import REPO, is_mount, log

LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
GATE_STEP = re.compile(r"([a-z][a-z ]*) ([\d.]+) s \(([\d.]+) CPU-s\)")
STEPS = (  # (name in the timeline, the start of the log line that marks it)
    ("services up", "peer service listening"),
    ("tree restored", "restored commit"),
    ("mounted", "mounted "),
)


def cli(repo: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m fluidfs ARGS`` from checkout *repo*."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    return subprocess.run(
        [sys.executable, "-m", "fluidfs", *args],
        cwd=repo, env=env, capture_output=True, text=True, check=True, timeout=timeout,
    )


def node_cpu(pid: int) -> float:
    """utime + stime of a live process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timeline(log_path: Path, started: float) -> dict[str, float]:
    """Seconds from *started* (epoch) to each STEPS line of the node's log."""
    out: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for name, prefix in STEPS:
            if name not in out and m.group(2).startswith(prefix):
                out[name] = when - started
        if m.group(2).startswith("mount gate: "):  # remount/gate.py, Steps
            for step, seconds, cpu in GATE_STEP.findall(m.group(2)):
                out[f"gate: {step}"] = float(seconds)
                out[f"gate: {step} cpu"] = float(cpu)
    return out


def read_mb(pid: int) -> float:
    """Megabytes process *pid* has read from disk so far (/proc/PID/io read_bytes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1]) / 1e6
    return 0.0


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fresh_mount(
    repo: Path, work: Path, tag: str, keyfile: Path, expect: set[str], *, cold: bool = False
) -> dict:
    """One fresh machine: mount with the keyfile only, time the tree's appearance
    (*cold*: with the page cache dropped first)."""
    mnt, state = work / f"mnt-{tag}", work / f"state-{tag}"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(repo))
    if cold:
        drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_epoch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fluidfs", "mount", str(mnt), "--keyfile", str(keyfile),
         "--state-dir", str(state), "--listen", "127.0.0.1:0"],
        cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    visible = None
    while visible is None:
        try:
            if expect <= set(os.listdir(mnt)):
                visible = time.perf_counter() - t0
                break
        except OSError:
            pass
        if proc.poll() is not None and not is_mount(mnt):
            raise RuntimeError(f"mount failed: {proc.stderr.read()}")
        if time.perf_counter() - t0 > 120:
            raise RuntimeError("the restored tree did not appear in 120 s")
        time.sleep(0.002)
    pid = int((state / "daemon.pid").read_text())
    cpu = node_cpu(pid)
    node_read = read_mb(pid)
    proc.wait(timeout=60)
    returned = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cli_read = (after.ru_inblock - before.ru_inblock) * 512 / 1e6
    out = {"visible": visible, "cli returned": returned, "node cpu": cpu, "cli cpu": cli_cpu,
           "node read MB": node_read, "cli read MB": cli_read}
    out |= timeline(state / "fluidfs.log", started_epoch)
    cli(repo, "unmount", str(mnt))
    shutil.rmtree(state, ignore_errors=True)
    mnt.rmdir()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, action="append", default=[],
                        help="another checkout to measure beside this one (repeatable)")
    parser.add_argument("--mounts", type=int, default=5, help="fresh mounts per checkout")
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before each fresh mount (root)")
    args = parser.parse_args()
    repos = [REPO, *[r.absolute() for r in args.repo]]
    for repo in repos:  # PYTHONDONTWRITEBYTECODE: compile once, as setup.sh does
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "fluidfs")],
                       check=True)
    work = Path(tempfile.mkdtemp(prefix="fluidfs-freshmount-"))
    peers = [ServePeer(work / "peers", f"peer{i:02d}") for i in range(args.peers)]
    results: dict[str, list[dict]] = {str(r): [] for r in repos}
    a_mnt = work / "mnt-a"
    try:
        log(f"starting {args.peers} peers")
        start_peers(peers)
        a_mnt.mkdir()
        key = work / "a.key"
        cli(REPO, "init", "--keyfile", str(key))
        peer_args = [x for p in peers for x in ("--peer", p.addr)]
        cli(REPO, "mount", str(a_mnt), "--keyfile", str(key), "--state-dir",
            str(work / "state-a"), "--listen", "127.0.0.1:0", *peer_args)
        (a_mnt / "small").mkdir()
        for i in range(args.files):
            (a_mnt / "small" / f"f{i:04d}").write_bytes(os.urandom(4096))
        (a_mnt / "top.bin").write_bytes(os.urandom(300_000))
        cli(REPO, "sync", "--state-dir", str(work / "state-a"))
        exported = cli(REPO, "key", "export", "--with-peers", "--keyfile", str(key),
                       "--state-dir", str(work / "state-a")).stdout
        fresh_key = work / "fresh.key"
        fresh_key.write_text(exported)
        fresh_key.chmod(0o600)
        cli(REPO, "unmount", str(a_mnt))
        for n in range(args.mounts):
            for i, repo in enumerate(repos):
                r = fresh_mount(repo, work, f"{n}-{i}", fresh_key, {"small", "top.bin"},
                                cold=args.drop_caches)
                results[str(repo)].append(r)
                log(f"{repo}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    finally:
        for m in [a_mnt, *work.glob("mnt-*")]:
            if is_mount(m):
                subprocess.run(["fusermount3", "-u", str(m)], capture_output=True)
        for p in peers:
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    keys = list(dict.fromkeys(k for rs in results.values() for r in rs for k in r))
    print(f"\nfresh mount until the tree is visible: {args.peers} peers on 127.0.0.1, "
          f"median of {args.mounts}, cpus={os.cpu_count()}, "
          f"page cache {'dropped before each' if args.drop_caches else 'warm'} "
          f"(seconds; cpu = CPU-seconds; MB read from disk)")
    print(f"{'step':24}" + "".join(f"{str(r)[-28:]:>30}" for r in repos))
    for k in keys:
        cells = []
        for r in repos:
            values = [x[k] for x in results[str(r)] if k in x]
            cells.append(f"{statistics.median(values):30.3f}" if values else f"{'-':>30}")
        print(f"{k:24}" + "".join(cells))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
