"""Repair rate, verification traffic, and what trust-weighted placement costs.

One run, all on 127.0.0.1, 13 `fluidfs serve` peers and one mount:

1. Placement cost: SIZE written with dd reaches full redundancy with uniform
   placement (``--placement even``, the baseline) and with trust-weighted
   placement (the default), each in a fresh mount; the ratio should be >= 0.9.
2. Repair: with the trust-weighted mount (tolerance 2 s, audits every second),
   the plaintext cache is dropped (so blocks must be rebuilt from K shards), one
   peer holding shards is killed, and the time from the agreement's end to full
   redundancy gives MB/s of rebuilt shards. Target >= 50 MB/s.
3. Verification traffic: bytes of audit answers per audit cycle, scaled to a day
   of hourly cycles per GiB stored.

Usage: python contrib/bench/bench_repair.py [--size 256M] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_network import CpuMeter, ServePeer, start_peers, status_of, wait_status
from benchlib import Mount, Profiler, log, make_source, parse_size, run

BLOCK = 4 * 1024 * 1024


def full(st: dict, blocks: int) -> bool:
    return (
        st["blocks"] == blocks
        and st["unsealed_bytes"] == 0
        and st.get("upload_pending_bytes", 0) == 0
        and st["redundancy"] == {"12": blocks}
    )


def wait(m: Mount, predicate, timeout: float, what: str, poll: float = 0.25) -> dict:
    # status scans every block record: poll slowly so the node is not loaded by it
    return wait_status(m, predicate, timeout, what, poll=poll)


def write_to_full(work: Path, tag: str, src: Path, peers: list[ServePeer], extra: list[str],
                  blocks: int) -> tuple[Mount, float]:
    args = ["--listen", "127.0.0.1:0", "--donate", "64G", *extra]
    for p in peers:
        args += ["--peer", p.addr]
    m = Mount(work, tag, args)
    m.init()
    m.mount()
    wait(m, lambda st: st["peers_with_agreements"] == len(peers), 60, "agreements")
    started = time.monotonic()
    run(["dd", f"if={src}", f"of={m.mnt / 'f'}", "bs=1M", "status=none"])
    wait(m, lambda st: full(st, blocks), 1800, "full redundancy")
    return m, time.monotonic() - started


@contextmanager
def machine_profile(out: Path | None):
    """Sample every CPU (kernel and user stacks) with perf while the block runs."""
    if out is None:
        yield
        return
    perf = subprocess.Popen(["perf", "record", "-a", "-g", "-e", "cpu-clock", "-F", "499",
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="write runs per placement")
    parser.add_argument("--order", default="even,trust", help="placements, in run order")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy record the mount and one peer during repair into this dir")
    parser.add_argument("--repair-bandwidth", default=None,
                        help="the mounts' repair cap (default: the node's, 64M a second)")
    parser.add_argument("--perf", type=Path, default=None,
                        help="`perf record` the whole machine during repair into this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fluidfs-repairbench-"))
    peers = [ServePeer(work, f"p{i:02d}", donate="256G") for i in range(13)]
    mounts: list[Mount] = []
    prof = Profiler(args.profile)
    res: dict = {"size": args.size}
    blocks = math.ceil(args.size / BLOCK)
    try:
        src = work / "src.bin"
        make_source(src, args.size)
        start_peers(peers)
        tuning = ["--audit-interval", "1", "--tolerance", "2"]
        if args.repair_bandwidth:
            tuning += ["--repair-bandwidth", args.repair_bandwidth]
        # Alternate the two placements and keep each one's best run: the peers' stores
        # grow from run to run, so a fixed order would favour the first.
        order = args.order.split(",") * args.rounds
        for round_no, placement in enumerate(order):
            log(f"{placement} placement: writing {args.size >> 20} MiB")
            m, seconds = write_to_full(work, f"{placement}{round_no}", src, peers,
                                       ["--placement", placement, *tuning], blocks)
            mounts.append(m)
            key = f"full_redundancy_{placement}_MBps"
            rate = args.size / seconds / 1e6
            log(f"{placement} placement: full redundancy at {rate:.1f} MB/s")
            res.setdefault(f"rounds_{placement}_MBps", []).append(rate)
            res[key] = max(res.get(key, 0.0), rate)
            if round_no < len(order) - 1:
                m.unmount()
        m = mounts[-1]
        st = status_of(m)
        cycles0, challenged0 = st["audit_cycles"], st["audit_challenges"]
        time.sleep(3)
        st = status_of(m)
        cycles = max(1, st["audit_cycles"] - cycles0)
        per_cycle = (st["audit_challenges"] - challenged0) / cycles
        answer = 64 * 1024 + 8 * 32  # one leaf and its path
        res["audit_bytes_per_cycle"] = per_cycle * answer
        res["audit_MiB_per_GiB_day_hourly"] = (
            per_cycle * answer * 24 / (args.size * 1.5 / 2**30) / 2**20
        )
        log("repair: dropping the cache, killing one holder")
        m.unmount()
        shutil.rmtree(m.state / "cache", ignore_errors=True)
        m.mount()
        wait(m, lambda st: st["peers_with_agreements"] == 13, 60, "agreements after remount")
        victim = next(p for p in peers if p.proc is not None)
        victim.stop()
        # Repair starts the moment the agreement ends, a little before a poll sees it: bytes
        # and seconds are both counted from that poll, so the rate is not inflated.
        ended = wait(m, lambda st: st["peers_with_agreements"] == 12, 120, "agreement to end",
                     poll=0.05)
        started = time.monotonic()
        survivors = [p for p in peers if p.proc is not None and p.proc.poll() is None]
        cpu = CpuMeter({"mount": [m.pid()], "peers": [p.pid for p in survivors]})
        with (
            prof.record("repair-peer", survivors[0].pid),
            prof.record("repair-mount", m.pid()),
            machine_profile(args.perf),
        ):
            final = wait(m, lambda st: full(st, blocks) and st["repair_queue"] == 0, 1800,
                         "repair to finish", poll=0.1)
        seconds = time.monotonic() - started
        used = cpu.stop()
        res["repair_cpu_mount_s"] = used["mount"]
        res["repair_cpu_peers_s"] = used["peers"]
        res["repair_busy_cpus"] = used["machine_busy_cpus"]
        rebuilt = final["repaired_bytes"] - ended["repaired_bytes"]
        res["repair_rebuilt_bytes"] = rebuilt
        res["repair_seconds"] = seconds
        res["repair_MBps"] = rebuilt / seconds / 1e6 if seconds else 0.0
    finally:
        for m in mounts:
            m.cleanup()
        for p in peers:
            p.stop()
        shutil.rmtree(work, ignore_errors=True)
    even = res.get("full_redundancy_even_MBps", math.nan)
    trust = res.get("full_redundancy_trust_MBps", math.nan)
    ratio = trust / even  # nan when --order ran only one of them
    rows = [
        ("full redundancy, even placement (baseline)", even, "MB/s"),
        ("full redundancy, trust-weighted placement", trust, "MB/s"),
        ("  ratio trust/even (target >= 0.90)", ratio, "PASS" if ratio >= 0.9 else "SHORT"),
        ("repair of a dead peer's shards", res["repair_MBps"],
         "MB/s " + ("PASS" if res["repair_MBps"] >= 50 else "SHORT") + " (target >= 50)"),
        ("  rebuilt bytes / seconds", res["repair_rebuilt_bytes"], f"B in "
         f"{res['repair_seconds']:.1f} s"),
        ("  CPU seconds: mount / 12 peers", res["repair_cpu_mount_s"],
         f"s / {res['repair_cpu_peers_s']:.1f} s"),
        ("  busy CPUs, whole machine", res["repair_busy_cpus"], f"of {os.cpu_count()}"),
        ("audit answers per cycle (13 peers)", res["audit_bytes_per_cycle"], "B"),
        ("  hourly cycles, per GiB of shards a day", res["audit_MiB_per_GiB_day_hourly"],
         "MiB (at this data size; constant per peer)"),
    ]
    for name, value, unit in rows:
        print(f"{name:<46} {value:>12,.2f} {unit}")
    prof.print_reports()
    if args.json:
        args.json.write_text(json.dumps(res | {"trust_over_even": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
