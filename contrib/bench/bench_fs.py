#!/usr/bin/env python3
"""End-to-end filesystem benchmark: fluidfs (mounted through the real CLI) vs. a
plain local directory on the same disk, in the same run.

Measures sequential write (accepted / sealed and stored), cold read, small-file
creation, ``ls -lR`` (cold and warm) and the mount process's peak memory, and
checks each figure against the targets of the performance issue.

    python contrib/bench/bench_fs.py                       # 1 GiB, 10,000 files
    python contrib/bench/bench_fs.py --quick               # CI smoke (64 MiB, 500 files)
    python contrib/bench/bench_fs.py --json out.json --profile /tmp/prof

Needs /dev/fuse and fusermount3; dropping the page cache needs root (without it
the "cold" figures are only cold for fluidfs's own cache and are marked so).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from benchlib import (
    BLOCK_SIZE,
    MB,
    MIB,
    Mount,
    Profiler,
    RssSampler,
    drop_caches,
    fmt,
    is_mount,
    log,
    make_source,
    parse_size,
    run,
    sha256_of,
    timed,
)

SMALL_FILE = 4096

# (metric key, target, "min" = at least / "max" = below)
TARGETS = {
    "write_accepted": (300.0, "min"),
    "write_sealed": (150.0, "min"),
    "read_cold": (150.0, "min"),
    "create_files": (2000.0, "min"),
    "ls_cold": (2.0, "max"),
    "ls_warm": (2.0, "max"),
    "rss_peak": (300.0, "max"),
}


def create_files(directory: Path, count: int) -> float:
    """Create *count* files of 4 KiB each; return elapsed seconds."""
    directory.mkdir()
    payload = os.urandom(SMALL_FILE)
    start = time.perf_counter()
    for i in range(count):
        with open(directory / f"f{i:06d}", "wb") as f:
            f.write(payload)
    return time.perf_counter() - start


@contextmanager
def one_cpu(pid: int):
    """Run this process and every thread of process *pid* on CPU 0 only, then undo it.

    On these VMs a wake-up on the other CPU is expensive, and each small file costs 8 FUSE
    round trips, so how the scheduler spreads the client and the mount decides much of
    the create rate; on one CPU the rate shows what the mount itself can do.
    """
    mine = os.sched_getaffinity(0)
    theirs = os.sched_getaffinity(pid)

    def pin(cpus: set[int]) -> None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(int(tid), cpus)

    pin({0})
    os.sched_setaffinity(0, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        pin(theirs)


def ls_lr(directory: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["ls", "-lR", str(directory)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


# --- the benchmark --------------------------------------------------------------------


def bench(args: argparse.Namespace, work: Path, results: dict, prof: Profiler) -> None:
    size, nfiles = args.size, args.files
    blocks = math.ceil(size / BLOCK_SIZE)
    plain = work / "plain"
    plain.mkdir()
    src = work / "source.bin"
    m = Mount(work)
    results["mount"] = m
    sampler = RssSampler(m.state / "daemon.pid")
    results["sampler"] = sampler
    fl: dict[str, float] = {}
    pl: dict[str, float] = {}
    results["fluidfs"], results["plain"] = fl, pl

    log(f"generating {size / MIB:.0f} MiB of random data")
    want = make_source(src, size)
    results["cold_caches"] = drop_caches()
    if not results["cold_caches"]:
        log("WARNING: cannot write /proc/sys/vm/drop_caches: 'cold' means fluidfs cache only")
    dd_write = ["dd", f"if={src}", "bs=1M", "status=none"]

    # --- plain directory ---------------------------------------------------------
    log("plain: sequential write")
    pl["write_accepted_s"] = timed([*dd_write, f"of={plain / 'f'}"])
    start = time.perf_counter()
    fd = os.open(plain / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    pl["write_sealed_s"] = pl["write_accepted_s"] + time.perf_counter() - start
    drop_caches()
    log("plain: cold read")
    pl["read_cold_s"] = timed(["dd", f"if={plain / 'f'}", "of=/dev/null", "bs=1M", "status=none"])
    log(f"plain: create {nfiles} files")
    pl["create_files_s"] = create_files(plain / "files", nfiles)
    os.sync()
    drop_caches()
    pl["ls_cold_s"] = ls_lr(plain / "files")
    pl["ls_warm_s"] = ls_lr(plain / "files")

    # --- fluidfs -----------------------------------------------------------------
    m.init()
    sampler.start()
    sampler.phase = "write"
    pid = m.mount()
    log(f"fluidfs: mounted (pid {pid}); sequential write")
    with prof.record("write", pid):
        t0 = time.perf_counter()
        run([*dd_write, f"of={m.mnt / 'f'}"])
        t1 = time.perf_counter()
        while not m.sealed(blocks):
            time.sleep(0.05)
        t2 = time.perf_counter()
    sampler.phase = "unmount after write"
    unmount_s = m.unmount()
    t3 = time.perf_counter()
    fl["write_accepted_s"] = t1 - t0
    fl["write_sealed_s"] = t2 - t0
    fl["write_unmounted_s"] = t3 - t0
    fl["unmount_after_write_s"] = unmount_s

    log("fluidfs: cold read")
    shutil.rmtree(m.state / "cache", ignore_errors=True)
    drop_caches()
    sampler.phase = "cold read"
    pid = m.mount()
    with prof.record("read", pid):
        fl["read_cold_s"] = timed(
            ["dd", f"if={m.mnt / 'f'}", "of=/dev/null", "bs=1M", "status=none"]
        )
    sampler.phase = "warm read + sha256"
    start = time.perf_counter()
    got = sha256_of(m.mnt / "f")
    fl["read_warm_sha256_s"] = time.perf_counter() - start
    results["sha256_ok"] = got == want
    if got != want:
        log(f"ERROR: sha256 mismatch: {got} != {want}")

    log(f"fluidfs: create {nfiles} files")
    sampler.phase = "create files"
    with prof.record("create", pid):
        fl["create_files_s"] = create_files(m.mnt / "files", nfiles)
    log(f"fluidfs: create {nfiles} files, client and mount on one CPU")
    with one_cpu(pid):
        fl["create_files_one_cpu_s"] = create_files(m.mnt / "files-one-cpu", nfiles)
    sampler.phase = "unmount after create"
    fl["unmount_after_create_s"] = m.unmount()
    drop_caches()
    sampler.phase = "ls -lR"
    pid = m.mount()
    with prof.record("ls", pid):
        fl["ls_cold_s"] = ls_lr(m.mnt / "files")
        fl["ls_warm_s"] = ls_lr(m.mnt / "files")
    sampler.phase = "final unmount"
    fl["unmount_final_s"] = m.unmount()
    sampler.stop()


# --- report ---------------------------------------------------------------------------


def summarise(args: argparse.Namespace, results: dict, prof: Profiler) -> dict:
    size, nfiles = args.size, args.files
    fl, pl = results.get("fluidfs", {}), results.get("plain", {})
    sampler: RssSampler | None = results.get("sampler")
    rows = []

    def add(key, label, unit, plain_v, fluid_v, target_key=None, higher_is_better=True):
        row = {"metric": key, "label": label, "unit": unit, "plain": plain_v, "fluidfs": fluid_v}
        row["ratio"] = (
            fluid_v / plain_v if plain_v not in (None, 0) and fluid_v is not None else None
        )
        if target_key and fluid_v is not None:
            target, kind = TARGETS[target_key]
            ok = fluid_v >= target if kind == "min" else fluid_v < target
            row["target"] = f"{'>=' if kind == 'min' else '<'}{target:g}"
            row["verdict"] = "PASS" if ok else "SHORT"
        rows.append(row)

    def rate(n, seconds):
        return None if seconds is None else n / seconds

    mb = size / MB
    add(
        "write_accepted",
        "write accepted (dd, no fsync)",
        "MB/s",
        rate(mb, pl.get("write_accepted_s")),
        rate(mb, fl.get("write_accepted_s")),
        "write_accepted",
    )
    add(
        "write_sealed",
        "write sealed+stored (poll)",
        "MB/s",
        rate(mb, pl.get("write_sealed_s")),
        rate(mb, fl.get("write_sealed_s")),
        "write_sealed",
    )
    add(
        "write_unmounted",
        "write + fluidfs unmount",
        "MB/s",
        rate(mb, pl.get("write_sealed_s")),
        rate(mb, fl.get("write_unmounted_s")),
        "write_sealed",
    )
    add(
        "read_cold",
        "cold read (dd)",
        "MB/s",
        rate(mb, pl.get("read_cold_s")),
        rate(mb, fl.get("read_cold_s")),
        "read_cold",
    )
    add(
        "read_warm",
        "warm read + sha256 (python)",
        "MB/s",
        None,
        rate(mb, fl.get("read_warm_sha256_s")),
    )
    add(
        "create_files",
        f"create {nfiles} x 4 KiB files",
        "files/s",
        rate(nfiles, pl.get("create_files_s")),
        rate(nfiles, fl.get("create_files_s")),
        "create_files",
    )
    add(
        "create_files_one_cpu",
        "  same, both on one CPU",
        "files/s",
        None,
        rate(nfiles, fl.get("create_files_one_cpu_s")),
    )
    add(
        "ls_cold",
        "ls -lR cold (after remount)",
        "s",
        pl.get("ls_cold_s"),
        fl.get("ls_cold_s"),
        "ls_cold",
    )
    add("ls_warm", "ls -lR warm", "s", pl.get("ls_warm_s"), fl.get("ls_warm_s"), "ls_warm")
    for key in ("unmount_after_write_s", "unmount_after_create_s", "unmount_final_s"):
        add(key[:-2], key[:-2].replace("_", " "), "s", None, fl.get(key))
    if sampler is not None and sampler.samples:
        peak = {k: v / 1024 for k, v in sampler.peak.items()}
        add("rss_peak", "peak VmRSS of mount", "MiB", None, peak["VmRSS"], "rss_peak")
        add("rss_anon_peak", "peak RssAnon", "MiB", None, peak["RssAnon"])
        add("rss_file_peak", "peak RssFile", "MiB", None, peak["RssFile"])

    print()
    print(
        f"fluidfs bench: size={size / MIB:.0f} MiB files={nfiles} workdir={args.workdir} "
        f"cpus={os.cpu_count()} page-cache-dropped={results.get('cold_caches')} "
        f"sha256-ok={results.get('sha256_ok')}"
    )
    print("MB = 10^6 bytes; ratio = fluidfs/plain (for times, >1 means fluidfs is slower)")
    header = (
        f"{'metric':32} {'unit':>7} {'plain':>10} {'fluidfs':>10} {'ratio':>7} "
        f"{'target':>8} verdict"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(
            f"{r['label']:32} {r['unit']:>7} {fmt(r['plain']):>10} {fmt(r['fluidfs']):>10} "
            f"{ratio:>7} {r.get('target', ''):>8} {r.get('verdict', '')}"
        )
    if sampler is not None and sampler.phase_peak:
        print("\npeak memory of the mount process by phase (MiB): VmRSS / RssAnon / RssFile")
        for phase, vals in sampler.phase_peak.items():
            print(
                f"  {phase:24} {vals['VmRSS'] / 1024:7.1f} / {vals['RssAnon'] / 1024:7.1f}"
                f" / {vals['RssFile'] / 1024:7.1f}"
            )
    prof.print_reports()
    out = {
        "size": size,
        "files": nfiles,
        "cpus": os.cpu_count(),
        "page_cache_dropped": results.get("cold_caches"),
        "sha256_ok": results.get("sha256_ok"),
        "rows": rows,
        "raw_seconds": {"plain": pl, "fluidfs": fl},
        "rss_by_phase_kib": sampler.phase_peak if sampler else {},
        "profile": prof.reports,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None, help="file size (default 1G)")
    parser.add_argument("--files", type=int, default=None, help="4 KiB files (default 10000)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="parent of the scratch dir (default: the system temp dir)",
    )
    parser.add_argument("--quick", action="store_true", help="small run (64M, 500 files)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON")
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy record each phase into this dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 64 * MIB if args.quick else 1 << 30
    if args.files is None:
        args.files = 500 if args.quick else 10000
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluidfs-bench-", dir=parent))
    args.workdir = work
    results: dict = {}
    prof = Profiler(args.profile)
    failed = False
    try:
        bench(args, work, results, prof)
    except BaseException as exc:  # report what we have, then clean up
        failed = True
        log(f"benchmark failed: {exc!r}")
        state_log = work / "state" / "fluidfs.log"
        if state_log.exists():
            tail = state_log.read_text(errors="replace").splitlines()[-20:]
            log("last lines of the fluidfs log:\n" + "\n".join(tail))
    finally:
        sampler = results.get("sampler")
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        mount = results.get("mount")
        if mount is None:
            mount = Mount.__new__(Mount)
            mount.mnt, mount.state = work / "mnt", work / "state"
        try:
            mount.cleanup()
        except Exception as exc:
            failed = True
            log(f"cleanup failed: {exc!r}")
        if not args.keep and not is_mount(work / "mnt"):
            shutil.rmtree(work, ignore_errors=True)
    summarise(args, results, prof)
    if failed or results.get("sha256_ok") is False:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
