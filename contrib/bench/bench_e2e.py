#!/usr/bin/env python3
"""fluidfs against restic, end to end, in the same run (issue 16's table).

    python contrib/bench/bench_e2e.py                 # 256 MiB + 1,000 x 4 KiB, median of 3
    python contrib/bench/bench_e2e.py --quick         # 64 MiB + 200 files, 1 run
    python contrib/bench/bench_e2e.py --runs 5 --json out.json --no-stages
    python contrib/bench/bench_e2e.py --store-only    # only the 256 MiB cp + sync rows
    python contrib/bench/bench_e2e.py --small-only    # only the small-file rows (no big file)

Per run, on the same source data (warm in the page cache):

- restic 0.14 backs up to a fresh local repository and restores after the page cache is
  dropped (a "fresh machine": restic keeps one copy on one disk);
- fluidfs: a new keyfile, a mount with ``--peer`` every one of ``--peers`` ``fluidfs serve``
  processes on 127.0.0.1 (started once for all runs); ``cp`` into the mount then
  ``fluidfs sync`` (returns at full redundancy); then ``fluidfs key export --with-peers``,
  unmount, drop the page cache, and mount a new state directory with that keyfile only
  (the fresh machine): time until the tree is listed, ``cp -r`` of the small files out,
  ``cp`` of the big file out (checked by sha256).

CPU-seconds of the mount process (utime + stime from /proc/PID/stat) are taken around the
big file's store (cp + sync) and restore (cp out) and divided by its GiB, and split by
thread from ``/proc/PID/task`` (the trio loop and the worker threads, user and system
time: measured CPU, the figure to compare; ``ThreadCpu``); the mount's peak VmRSS and
RssAnon during that store are sampled every 50 ms (``NetRssSampler``). With py-spy
available (``pip install py-spy``; ``--no-stages`` to skip), the last run is sampled with
``py-spy record --nonblocking`` and each busy sample is put in the stage of its innermost
recognised frame (see STAGES); the stage shares split the measured CPU-seconds. py-spy
counts a thread blocked in a syscall as busy, so where a stage blocks (file writes under
dirty-page throttling) its share is thread time, not CPU: read it beside the thread split.

restic: if it is not on PATH the bench runs ``apt-get install -y restic`` (root) or stops
saying so (``--no-restic`` runs without the baseline).
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
from contextlib import contextmanager
from pathlib import Path

from bench_network import CpuMeter, NetRssSampler, ServePeer, mount_with_peers, start_peers
from benchlib import (
    MB,
    MIB,
    Mount,
    drop_caches,
    fmt,
    is_mount,
    log,
    make_source,
    parse_size,
    run,
    run_cleanup,
    sha256_of,
    spy_record,
)

SMALL_FILE = 4096
GIB = 1 << 30

# Stage of a py-spy sample: the innermost frame matching one of these (file-path
# fragments, checked in order for each frame from the leaf up) names it.
STAGES = (
    ("frame crypto", ("fluidfs/net/framecipher.py",)),
    (
        "sealing (hash, encrypt, encode)",
        (
            "fluidfs/blocks/codec.py",
            "fluidfs/blocks/erasure.py",
            "fluidfs/blocks/isal.py",
            "zfec/",
            "pyeclib/",
            "nacl/",
            "hashlib",
            "blake3",
            "fluidfs/blocks/merkle.py",
        ),
    ),
    ("LMDB", ("lmdb/", "fluidfs/store/")),
    (
        "RPC and CBOR",
        ("cbor2/", "fluidfs/wire/", "fluidfs/net/", "fluidfs/service/", "trio/_highlevel_socket"),
    ),
    ("FUSE handling", ("pyfuse3", "fluidfs/fs/")),
    ("blocks, placement, peers", ("fluidfs/blocks/", "fluidfs/peers/", "fluidfs/remount/")),
)
OTHER = "other (trio scheduling, logging, ...)"
# Waits that py-spy --nonblocking still reports as running (it cannot always tell): trio's
# epoll wait and a worker thread waiting for its next job. Such samples are idle.
IDLE = (
    "get_events (trio/_core/_io_epoll.py",
    "_work (trio/_core/_thread_cache.py",
)

# (figure, unit, higher is better, goal from the issue)
GOALS = {
    "big_store": 150.0,
    "big_restore": 220.0,
    "small_store": 2000.0,
    "small_restore": 2000.0,
    "tree_visible": 0.5,
}


def restic_binary(install: bool) -> str | None:
    found = shutil.which("restic")
    if found or not install:
        return found
    if os.geteuid() != 0:
        raise SystemExit("restic is missing: apt-get install restic (or run with --no-restic)")
    log("restic missing: apt-get install -y restic")
    subprocess.run(["apt-get", "install", "-y", "restic"], check=True, capture_output=True)
    return shutil.which("restic")


def make_small_files(directory: Path, count: int, size: int = SMALL_FILE) -> None:
    directory.mkdir(parents=True)
    for i in range(count):
        (directory / f"f{i:05d}").write_bytes(os.urandom(size))


def warm(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.iterdir()):
        p.read_bytes()


# --- restic ---------------------------------------------------------------------------


def restic_run(
    restic: str, work: Path, src: Path | None, small: Path, n: int
) -> dict:
    """Backup and restore figures of restic with a new local repository (*src* None: no
    big file)."""
    repo = work / f"restic-{n}"
    restore = work / f"restic-restore-{n}"
    env = dict(os.environ, RESTIC_REPOSITORY=str(repo), RESTIC_PASSWORD="bench")
    env["RESTIC_CACHE_DIR"] = str(work / f"restic-cache-{n}")

    def restic_cmd(*args: str) -> float:
        start = time.perf_counter()
        subprocess.run([restic, "--quiet", *args], env=env, check=True, capture_output=True)
        return time.perf_counter() - start

    restic_cmd("init")
    out: dict = {}
    if src is not None:
        warm(src)
        out["big_store_s"] = restic_cmd("backup", "--tag", "big", str(src))
    warm(small)
    out["small_store_s"] = restic_cmd("backup", "--tag", "small", str(small))
    drop_caches()
    out["tree_visible_s"] = restic_cmd("snapshots")  # open the repository, read the index
    if src is not None:
        drop_caches()
        out["big_restore_s"] = restic_cmd(
            "restore", "latest", "--tag", "big", "--target", str(restore)
        )
    drop_caches()
    out["small_restore_s"] = restic_cmd(
        "restore", "latest", "--tag", "small", "--target", str(restore)
    )
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(restore, ignore_errors=True)
    return out


# --- py-spy stage split ------------------------------------------------------------------


class StageSampler:
    """``py-spy record --nonblocking`` of one process, for one phase; busy samples by stage."""

    def __init__(self, outdir: Path | None) -> None:
        self.outdir = outdir
        self.spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.available = outdir is not None and os.path.exists(self.spy)

    @contextmanager
    def record(self, name: str, pid: int, into: dict):
        if not self.available:
            yield
            return
        out = self.outdir / f"{name}.txt"
        try:
            with spy_record(self.spy, pid, out, "--nonblocking"):
                yield
        finally:
            into[name] = self.classify(out)

    @staticmethod
    def stage_of(frames: list[str]) -> str:
        for frame in reversed(frames):
            for stage, fragments in STAGES:
                if any(f in frame for f in fragments):
                    return stage
        return OTHER

    @classmethod
    def classify(cls, path: Path) -> dict[str, int]:
        """Busy samples per stage (py-spy without --idle records only running threads)."""
        counts: dict[str, int] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return counts
        for line in lines:
            stack, _, n = line.rpartition(" ")
            if stack and n.isdigit():
                frames = stack.split(";")[1:]
                if frames and any(pattern in frames[-1] for pattern in IDLE):
                    continue
                stage = cls.stage_of(frames)
                counts[stage] = counts.get(stage, 0) + int(n)
                if stage == OTHER and frames:  # what is left unnamed, by innermost frame
                    leaf = f"{OTHER}: {frames[-1]}"
                    counts[leaf] = counts.get(leaf, 0) + int(n)
        return counts


# --- fluidfs --------------------------------------------------------------------------


def fluidfs_cli(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "fluidfs", *args], timeout=timeout)


def fluidfs_run(
    work: Path,
    n: int,
    src: Path | None,
    small: Path,
    want: str,
    peers: list[ServePeer],
    stages: StageSampler,
    profile: bool,
    cleanup: list,
    store_only: bool = False,
) -> dict:
    out: dict = {"stages": {}}
    profiled = out["stages"] if profile else {}
    a = mount_with_peers(work, f"a{n}", peers, cleanup, timeout=120)
    pid = a.pid()

    def sync() -> None:
        fluidfs_cli("sync", "--state-dir", str(a.state))

    if src is not None:
        warm(src)
        cpu = CpuMeter({"mount": [pid]})
        threads = ThreadCpu(pid)
        rss = NetRssSampler(a.state / "daemon.pid", [])
        rss.start()
        try:
            with stages.record(f"store-{n}", pid, profiled):
                t0 = time.perf_counter()
                run(["cp", str(src), str(a.mnt / src.name)])
                t1 = time.perf_counter()
                sync()
                t2 = time.perf_counter()
        finally:
            rss.stop()
        out["big_store_cpu_s"] = cpu.stop()["mount"]
        out["big_store_rss_mib"] = {k: v / 1024 for k, v in rss.mount.items()}
        out["big_store_threads"] = threads.stop()
        out["big_cp_s"], out["big_store_s"] = t1 - t0, t2 - t0
    if store_only:
        a.unmount()
        shutil.rmtree(a.state, ignore_errors=True)
        return out

    warm(small)
    files = len(os.listdir(small))
    before = status(a.state)
    requests = before.get("fuse_requests") or {}
    stores = before.get("store_requests") or {}
    cpu = CpuMeter({"mount": [pid]})
    with stages.record(f"small-cp-{n}", pid, profiled):
        t0 = time.perf_counter()
        run(["cp", "-r", str(small), str(a.mnt / small.name)])
        t1 = time.perf_counter()
    out["small_cp_cpu_s"] = cpu.stop()["mount"]
    out["small_cp_requests"] = per_file(requests, fuse_requests(a.state), files)
    cpu = CpuMeter({"mount": [pid], "peers": [p.proc.pid for p in peers if p.proc]})
    with stages.record(f"small-sync-{n}", pid, profiled):
        sync()
        t2 = time.perf_counter()
    spent = cpu.stop()
    out["small_sync_cpu_s"] = spent["mount"]
    # The peers share the machine's cores with the mount: their CPU is the sync's too.
    out["small_sync_peers_cpu_s"] = spent["peers"]
    after = status(a.state).get("store_requests") or {}
    out["small_sync_store_calls"] = after.get("calls", 0) - stores.get("calls", 0)
    out["small_cp_s"], out["small_store_s"] = t1 - t0, t2 - t0

    # A sync with a handful of small changes: the fixed cost of a commit.
    for i in range(3):
        (a.mnt / f"note{i}.txt").write_bytes(os.urandom(100))
    t0 = time.perf_counter()
    sync()
    out["tiny_sync_s"] = time.perf_counter() - t0

    keyfile = work / f"fresh{n}.key"
    keyfile.write_text(
        fluidfs_cli(
            "key", "export", "--with-peers", "--keyfile", str(a.key), "--state-dir", str(a.state)
        ).stdout
    )
    keyfile.chmod(0o600)
    a.unmount()

    # The fresh machine: a new state directory and the exported keyfile, nothing else.
    b = Mount(work, f"b{n}", ["--listen", "127.0.0.1:0"])
    b.key = keyfile
    cleanup.append(b.cleanup)
    drop_caches()
    t0 = time.perf_counter()
    b.mount()
    names = {small.name} if src is None else {src.name, small.name}
    while not names <= set(os.listdir(b.mnt)):
        if time.perf_counter() - t0 > 120:
            raise RuntimeError("the restored tree did not appear in 120 s")
        time.sleep(0.01)
    out["tree_visible_s"] = time.perf_counter() - t0
    pid = b.pid()
    restore = work / f"restore-{n}"
    restore.mkdir()
    requests = fuse_requests(b.state)
    cpu = CpuMeter({"mount": [pid]})
    with stages.record(f"small-restore-{n}", pid, profiled):
        t0 = time.perf_counter()
        run(["cp", "-r", str(b.mnt / small.name), str(restore / small.name)])
        out["small_restore_s"] = time.perf_counter() - t0
    out["small_restore_cpu_s"] = cpu.stop()["mount"]
    restored = status(b.state)
    out["small_restore_requests"] = per_file(requests, restored.get("fuse_requests") or {}, files)
    # Since the fresh mount started: its tree's metadata nodes came in these calls.
    out["restore_retrieve"] = restored.get("retrieve_requests")
    if len(os.listdir(restore / small.name)) != len(os.listdir(small)):
        raise RuntimeError("the restored small-file directory is incomplete")
    if src is None:
        b.unmount()
        shutil.rmtree(restore, ignore_errors=True)
        for m in (a, b):
            shutil.rmtree(m.state, ignore_errors=True)
        return out
    cpu = CpuMeter({"mount": [pid]})
    threads = ThreadCpu(pid)
    with stages.record(f"restore-{n}", pid, profiled):
        t0 = time.perf_counter()
        run(["cp", str(b.mnt / src.name), str(restore / src.name)])
        out["big_restore_s"] = time.perf_counter() - t0
    out["big_restore_cpu_s"] = cpu.stop()["mount"]
    out["big_restore_threads"] = threads.stop()
    out["sha256_ok"] = sha256_of(restore / src.name) == want
    b.unmount()
    shutil.rmtree(restore, ignore_errors=True)
    for m in (a, b):
        shutil.rmtree(m.state, ignore_errors=True)
    return out


def status(state: Path) -> dict:
    """The mount's ``status --json``."""
    return json.loads(fluidfs_cli("status", "--json", "--state-dir", str(state)).stdout)


def fuse_requests(state: Path) -> dict[str, int]:
    """The mount's FUSE requests so far, by operation (``status --json``)."""
    return status(state).get("fuse_requests") or {}


def per_file(before: dict[str, int], after: dict[str, int], files: int) -> dict[str, float]:
    """Requests per file between two ``fuse_requests`` readings, by operation."""
    return {
        op: round((after[op] - before.get(op, 0)) / files, 2)
        for op in sorted(after)
        if after[op] - before.get(op, 0) >= files / 100
    }


class ThreadCpu:
    """The mount's CPU-seconds between two points, measured per thread from
    ``/proc/PID/task/*/stat`` and summed by kind: the trio thread (the loop: FUSE
    requests, RPC, frame crypto) and the worker threads (sealing, opening, disk writes),
    each as user and system time. Unlike the py-spy split this is CPU, not thread time:
    a thread blocked in a syscall adds nothing. A thread that ended in between is lost
    (the process total still has it)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self._read()

    def _read(self) -> dict[int, tuple[int, int]]:
        out = {}
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return out
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(fields[11]), int(fields[12]))
        return out

    def stop(self) -> dict[str, float]:
        """{"loop user", "loop sys", "workers user", "workers sys"}: CPU-seconds."""
        end = self._read()
        out = dict.fromkeys(("loop user", "loop sys", "workers user", "workers sys"), 0.0)
        for tid, (user, sys_) in end.items():
            u0, s0 = self.start.get(tid, (0, 0))
            kind = "loop" if tid == self.pid else "workers"
            out[f"{kind} user"] += (user - u0) / self.TICK
            out[f"{kind} sys"] += (sys_ - s0) / self.TICK
        return out


# --- the benchmark ----------------------------------------------------------------------


def bench(args, work: Path, res: dict, cleanup: list) -> None:
    restic = None if args.no_restic or args.store_only else restic_binary(install=True)
    res["restic_version"] = (
        subprocess.run([restic, "version"], capture_output=True, text=True).stdout.strip()
        if restic
        else None
    )
    src: Path | None = work / "source" / "big.bin"
    small = work / "source" / "small"
    (work / "source").mkdir()
    if args.small_only:
        src, want = None, ""
        log(f"source: {args.files} x {args.small_size:,} B random files (no big file)")
    else:
        log(f"source: {args.size / MIB:.0f} MiB random file, {args.files} x "
            f"{args.small_size:,} B random files")
        want = make_source(src, args.size)
    if not args.store_only:
        make_small_files(small, args.files, args.small_size)

    peers = [ServePeer(work / "peers", f"peer{i:02d}") for i in range(args.peers)]
    cleanup.append(lambda: [p.stop() for p in peers])
    log(f"starting {args.peers} fluidfs serve peers")
    start_peers(peers)
    stages = StageSampler(None if args.no_stages else work / "profile")
    if stages.available:
        stages.outdir.mkdir()
    elif not args.no_stages:
        log("py-spy not found: no split by stage (pip install py-spy)")
    res["runs"] = []
    for n in range(args.runs):
        one: dict = {}
        if restic:
            log(f"run {n + 1}/{args.runs}: restic")
            one["restic"] = restic_run(restic, work, src, small, n)
        log(f"run {n + 1}/{args.runs}: fluidfs")
        one["fluidfs"] = fluidfs_run(
            work, n, src, small, want, peers, stages, n == args.runs - 1, cleanup,
            args.store_only,
        )
        res["runs"].append(one)
        if not one["fluidfs"].get("sha256_ok", True):
            log("ERROR: the restored big file differs from the source")


# --- report ---------------------------------------------------------------------------


def median(runs: list[dict], tool: str, key: str) -> float | None:
    values = [r[tool][key] for r in runs if tool in r and key in r[tool]]
    return statistics.median(values) if values else None


def summarise(args, res: dict) -> dict:
    runs = res.get("runs", [])
    mb = args.size / MB
    rows = []

    def rate(amount: float, seconds: float | None) -> float | None:
        return None if not seconds else amount / seconds

    def add(key: str, label: str, unit: str, fluid, restic, higher_is_better=True) -> None:
        ratio = fluid / restic if fluid is not None and restic else None
        goal = GOALS.get(key)
        verdict = ""
        if goal is not None and fluid is not None:
            ok = fluid >= goal if higher_is_better else fluid <= goal
            verdict = "PASS" if ok else "SHORT"
        rows.append(
            {
                "metric": key,
                "label": label,
                "unit": unit,
                "fluidfs": fluid,
                "restic": restic,
                "ratio": ratio,
                "goal": goal,
                "verdict": verdict,
            }
        )

    def m(tool: str, key: str) -> float | None:
        return median(runs, tool, key)

    add(
        "big_store",
        f"{args.size / MIB:.0f} MiB: cp + sync",
        "MB/s",
        rate(mb, m("fluidfs", "big_store_s")),
        rate(mb, m("restic", "big_store_s")),
    )
    add("big_cp", "  cp alone", "MB/s", rate(mb, m("fluidfs", "big_cp_s")), None)
    for field in ("VmRSS", "RssAnon"):
        peaks = [r["fluidfs"]["big_store_rss_mib"][field] for r in runs
                 if "big_store_rss_mib" in r.get("fluidfs", {})]
        add(f"big_store_{field}", f"  mount peak {field} during cp + sync", "MiB",
            statistics.median(peaks) if peaks else None, None, False)
    add(
        "big_restore",
        "restore on a fresh machine (cp out)",
        "MB/s",
        rate(mb, m("fluidfs", "big_restore_s")),
        rate(mb, m("restic", "big_restore_s")),
    )
    add(
        "small_store",
        f"{args.files} small files: cp -r + sync",
        "files/s",
        rate(args.files, m("fluidfs", "small_store_s")),
        rate(args.files, m("restic", "small_store_s")),
    )
    add("small_cp", "  cp -r alone", "files/s", rate(args.files, m("fluidfs", "small_cp_s")), None)
    small_sync = None
    if m("fluidfs", "small_store_s") is not None:
        small_sync = statistics.median(
            r["fluidfs"]["small_store_s"] - r["fluidfs"]["small_cp_s"] for r in runs
        )
    add("small_sync", "  its sync", "s", small_sync, None, False)
    for key, label in (
        ("small_cp_cpu_s", "  mount CPU-ms per file, cp -r"),
        ("small_sync_cpu_s", "  mount CPU-ms per file, its sync"),
        ("small_sync_peers_cpu_s", "  peers' CPU-ms per file, its sync"),
    ):
        cpu = m("fluidfs", key)
        add(key, label, "ms", None if cpu is None else 1000 * cpu / args.files, None, False)
    add("small_sync_store_calls", "  StoreShard calls, cp -r + sync", "calls",
        m("fluidfs", "small_sync_store_calls"), None, False)
    add("tiny_sync", "sync after 3 small files", "s", m("fluidfs", "tiny_sync_s"), None, False)
    add(
        "small_restore",
        f"{args.files} small files restored (cp -r out)",
        "files/s",
        rate(args.files, m("fluidfs", "small_restore_s")),
        rate(args.files, m("restic", "small_restore_s")),
    )
    cpu = m("fluidfs", "small_restore_cpu_s")
    add(
        "small_restore_cpu",
        "  mount CPU-ms per file, cp -r out",
        "ms",
        None if cpu is None else 1000 * cpu / args.files,
        None,
        False,
    )
    add(
        "tree_visible",
        "fresh mount until the tree is visible",
        "s",
        m("fluidfs", "tree_visible_s"),
        m("restic", "tree_visible_s"),
        False,
    )
    gib = args.size / GIB
    store_cpu = m("fluidfs", "big_store_cpu_s")
    restore_cpu = m("fluidfs", "big_restore_cpu_s")
    add(
        "cpu_store",
        "mount CPU-s per GiB stored",
        "CPU-s",
        None if store_cpu is None else store_cpu / gib,
        None,
        False,
    )
    add(
        "cpu_restore",
        "mount CPU-s per GiB restored",
        "CPU-s",
        None if restore_cpu is None else restore_cpu / gib,
        None,
        False,
    )

    print()
    big = "no big file" if args.small_only else f"{args.size / MIB:.0f} MiB"
    print(
        f"fluidfs vs restic: {big}, {args.files} x {args.small_size:,} B, {args.peers} "
        f"peers, median of {len(runs)} run(s), cpus={os.cpu_count()}; "
        f"{res.get('restic_version') or 'restic not run'}"
    )
    print("MB = 10^6 bytes; ratio = fluidfs/restic (for seconds, > 1 means fluidfs is slower)")
    header = f"{'measure':42} {'unit':>7} {'fluidfs':>9} {'restic':>9} {'ratio':>6} {'goal':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        goal = "" if r["goal"] is None else fmt(r["goal"])
        print(
            f"{r['label']:42} {r['unit']:>7} {fmt(r['fluidfs']):>9} {fmt(r['restic']):>9} "
            f"{ratio:>6} {goal:>6} {r['verdict']}"
        )
    split = {}
    last = runs[-1]["fluidfs"] if runs and "fluidfs" in runs[-1] else {}
    if last.get("restore_retrieve"):
        print(f"\nfresh mount, shards fetched until the small files were copied out (last run): "
              f"{last['restore_retrieve']}")
    for key, label in (("small_cp_requests", "cp -r in"), ("small_restore_requests", "cp -r out")):
        if last.get(key):
            ops = ", ".join(f"{op} {n:g}" for op, n in last[key].items())
            print(f"\nFUSE requests per small file, {label} (last run): {ops}")
    for phase in ("store", "restore"):
        measured = [r["fluidfs"][f"big_{phase}_threads"] for r in runs
                    if f"big_{phase}_threads" in r.get("fluidfs", {})]
        if measured:
            print(f"\nmount CPU-s per GiB {phase}d, by thread (measured, median of "
                  f"{len(measured)} run(s)):")
            for kind in measured[0]:
                value = statistics.median(m[kind] for m in measured) / gib
                print(f"  {kind:40} {value:6.2f}")
    for phase, cpu_key in (("store", "big_store_cpu_s"), ("restore", "big_restore_cpu_s")):
        counts = next((v for k, v in last.get("stages", {}).items() if k.startswith(phase)), None)
        if not counts or cpu_key not in last:
            continue
        unnamed = sorted(
            ((k, v) for k, v in counts.items() if k.startswith(f"{OTHER}: ")), key=lambda kv: -kv[1]
        )
        counts = {k: v for k, v in counts.items() if not k.startswith(f"{OTHER}: ")}
        total = sum(counts.values())
        per_gib = last[cpu_key] / gib
        split[phase] = {s: per_gib * c / total for s, c in counts.items()}
        print(
            f"\nmount CPU-s per GiB {phase}d, by stage (py-spy, last run: "
            f"{per_gib:.2f} CPU-s/GiB, {total} busy samples):"
        )
        for stage, value in sorted(split[phase].items(), key=lambda kv: -kv[1]):
            print(f"  {stage:40} {value:6.2f}  ({100 * value / per_gib:4.1f}%)")
        for leaf, count in unnamed[:5]:
            print(f"    {100 * count / total:4.1f}%  {leaf[len(OTHER) + 2 :]}")
    out = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "runs": runs,
        "stage_split_cpu_s_per_gib": split,
        "restic_version": res.get("restic_version"),
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None, help="big file (256M)")
    parser.add_argument("--files", type=int, default=None, help="4 KiB files (1000)")
    parser.add_argument("--small-size", type=int, default=SMALL_FILE,
                        help="bytes of each small file (4096: inline in the metadata; "
                             "larger ones are blocks of their own, fetched ahead on a copy)")
    parser.add_argument("--peers", type=int, default=12, help="serve peers (default 12)")
    parser.add_argument("--runs", type=int, default=None, help="runs, median kept (3)")
    parser.add_argument("--quick", action="store_true", help="64 MiB, 200 files, 1 run")
    parser.add_argument("--no-restic", action="store_true", help="skip the restic baseline")
    parser.add_argument("--no-stages", action="store_true", help="no py-spy stage split")
    parser.add_argument(
        "--store-only", action="store_true", help="only the big file's cp + sync (no restic)"
    )
    parser.add_argument(
        "--small-only", action="store_true", help="only the small-file rows (no big file)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the scratch dir")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    args.size = args.size or (64 * MIB if args.quick else 256 * MIB)
    args.files = args.files or (200 if args.quick else 1000)
    args.runs = args.runs or (1 if args.quick else 3)
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluidfs-e2e-", dir=parent))
    signal.signal(signal.SIGTERM, _interrupted)
    res: dict = {}
    cleanup: list = []
    failed = False
    try:
        bench(args, work, res, cleanup)
    except BaseException as exc:  # report what we have, then clean up
        failed = True
        log(f"benchmark failed: {exc!r}")
        for state_log in sorted(work.glob("state-*/fluidfs.log")):
            tail = state_log.read_text(errors="replace").splitlines()[-15:]
            log(f"last lines of {state_log}:\n" + "\n".join(tail))
    finally:
        failed |= not run_cleanup(cleanup)
        left = [p for p in work.glob("mnt-*") if is_mount(p)]
        if not args.keep and not left:
            shutil.rmtree(work, ignore_errors=True)
    summarise(args, res)
    bad = any(not r.get("fluidfs", {}).get("sha256_ok", True) for r in res.get("runs", []))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
