#!/usr/bin/env python3
"""Network benchmark: fluidfs with real `fluidfs serve` peers on 127.0.0.1, each figure
next to a baseline measured in the same run.

1. shard transfer: StoreShard RPCs of 512 KiB shards (8 in flight) to one `fluidfs serve`
   through the real secure channel + RPC, vs. raw trio TCP between two processes;
2. a file written with dd into a mount with 12 peers, until full redundancy (every block
   sealed and all its shards on peers), vs. the same dd into a local-only mount (until
   sealed) and into a plain directory;
3. cold read of that file back from the peers, vs. the same cold read in the local-only
   mount and in the plain directory;
4. peak memory of the mount process and of the peers (sum) while writing.

    python contrib/bench/bench_network.py                  # 1 GiB, 12 peers
    python contrib/bench/bench_network.py --quick          # 64 MiB
    python contrib/bench/bench_network.py --json out.json --profile /tmp/prof

Needs /dev/fuse, fusermount3 and dd; dropping the page cache needs root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import bench_net
import nacl.signing
import trio
from benchlib import (
    BLOCK_SIZE,
    MB,
    MIB,
    REPO,
    RSS_FIELDS,
    Mount,
    Profiler,
    drop_caches,
    fmt,
    is_mount,
    log,
    make_source,
    parse_size,
    read_rss,
    run,
    run_cleanup,
    sha256_of,
)

from fluidfs import control, keys
from fluidfs.blocks import merkle
from fluidfs.net.channel import DEFAULT_OFFLOAD
from fluidfs.net.tcp import open_rpc
from fluidfs.sysutil import tune_malloc

SHARD = 512 * 1024
PEER_DONATE = "8G"  # per `fluidfs serve` peer of the mounts
MOUNT_DONATE = "64G"  # the mount's agreements: 64G / (2 * 12) each, 12 of them

# (metric key, target, "min" = at least / "max" = below)
TARGETS = {
    "shard_rpc": (400.0, "min"),
    "write_redundant": (100.0, "min"),
    "read_cold_peers": (100.0, "min"),
}


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


# --- `fluidfs serve` peers ------------------------------------------------------------------


class ServePeer:
    """One `fluidfs serve --listen 127.0.0.1:0` process, stopped by its pid."""

    def __init__(self, root: Path, name: str, donate: str = PEER_DONATE) -> None:
        self.root = root
        self.name = name
        self.donate = donate
        self.state = root / f"{name}-state"
        self.keyfile = root / f"{name}.key"
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    @property
    def public_key(self) -> bytes:
        return keys.KeyRing(keys.read_keyfile(self.keyfile)).public_key

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launch(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.keyfile.exists():
            keys.write_keyfile(self.keyfile, keys.generate())
        self.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.state / "listen").unlink(missing_ok=True)
        with open(self.root / f"{self.name}.log", "ab") as logfile:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fluidfs",
                    "serve",
                    "--keyfile",
                    str(self.keyfile),
                    "--state-dir",
                    str(self.state),
                    "--listen",
                    "127.0.0.1:0",
                    "--donate",
                    self.donate,
                ],
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                env=env(),
                cwd=REPO,
            )

    def wait_listening(self, deadline: float) -> None:
        listen = self.state / "listen"
        while not (listen.exists() and listen.read_text().endswith("\n")):  # written whole
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / f"{self.name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"peer {self.name} did not start:\n{tail}")
            time.sleep(0.05)
        self.addr = listen.read_text().strip()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, by pid; wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_peers(peers: list[ServePeer], timeout: float = 60) -> None:
    for p in peers:
        p.launch()
    deadline = time.monotonic() + timeout
    for p in peers:
        p.wait_listening(deadline)


# --- memory sampler -----------------------------------------------------------------------


class NetRssSampler(threading.Thread):
    """Every 50 ms: VmRSS/RssAnon/RssFile of the mount, and their sum over the peers."""

    def __init__(self, pidfile: Path, peer_pids: list[int], interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pidfile = pidfile
        self.peer_pids = peer_pids
        self.interval = interval
        self.mount = dict.fromkeys(RSS_FIELDS, 0)  # KiB, peaks
        self.peers = dict.fromkeys(RSS_FIELDS, 0)  # KiB, peak of the per-sample sum
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                values = read_rss(int(self.pidfile.read_text()))
            except (OSError, ValueError):
                values = None
            if values:
                self.samples += 1
                for k, v in values.items():
                    self.mount[k] = max(self.mount[k], v)
            total = dict.fromkeys(RSS_FIELDS, 0)
            for pid in self.peer_pids:
                for k, v in (read_rss(pid) or {}).items():
                    total[k] += v
            for k, v in total.items():
                self.peers[k] = max(self.peers[k], v)

    def stop(self) -> None:
        self._halt.set()
        self.join()


class CpuMeter:
    """CPU seconds used by some processes, and by the whole machine, between two points."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids  # group name -> pids
        self.start = self._snapshot()

    @classmethod
    def _ticks(cls, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime

    def _snapshot(self) -> dict:
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        idle = cpu[3] + cpu[4]  # idle + iowait
        snap = {"_busy": sum(cpu) - idle, "_total": sum(cpu), "_t": time.perf_counter()}
        for group, pids in self.pids.items():
            snap[group] = sum(self._ticks(pid) for pid in pids)
        return snap

    def stop(self) -> dict:
        """{group: CPU seconds} plus machine_busy_cpus (average busy CPUs, all processes)."""
        end = self._snapshot()
        out = {g: (end[g] - self.start[g]) / self.TICK for g in self.pids}
        total = max(end["_total"] - self.start["_total"], 1)
        out["machine_busy_cpus"] = (end["_busy"] - self.start["_busy"]) / total * os.cpu_count()
        out["seconds"] = end["_t"] - self.start["_t"]
        return out


# --- 1. shard transfer ----------------------------------------------------------------------


def make_shards(total: int) -> tuple[list[bytes], list[bytes]]:
    shards = [os.urandom(SHARD) for _ in range(max(1, total // SHARD))]
    return shards, [merkle.shard_id(s) for s in shards]


async def store_shards(
    addr: str, server_key: bytes, shards: list[bytes], ids: list[bytes], inflight: int
) -> float:
    """ProposeAgreement, then StoreShard every shard with *inflight* calls at once."""
    host, port = addr.rsplit(":", 1)
    identity = nacl.signing.SigningKey.generate()
    async with open_rpc(host, int(port), identity, expected_peer=server_key) as conn:
        ask = 2 * len(shards) * SHARD
        reply = await conn.call("ProposeAgreement", {"offer": ask, "ask": ask, "term": 86400})
        if not reply["accepted"]:
            raise RuntimeError(f"agreement refused: {reply.get('reason')}")
        todo = iter(range(len(shards)))

        async def worker() -> None:
            for i in todo:
                args = {"shards": [{"id": ids[i], "data": shards[i]}]}
                r = await conn.call("StoreShard", args)
                if r["stored"] != [ids[i]]:
                    raise RuntimeError(f"shard not stored: {r['refused']}")

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(inflight):
                nursery.start_soon(worker)
        return time.perf_counter() - t0


def shard_rpc_round(work: Path, n: int, shards, ids, inflight: int) -> float:
    """One round against a fresh `fluidfs serve`; MB/s of shard payload."""
    # A stranger is granted at most donate/16 (docs/protocol.md §5); the donation is only a
    # promise, so a large one costs nothing.
    donate = f"{(40 * len(shards) * SHARD) // MIB + 1024}M"
    peer = ServePeer(work / "shard-server", f"server{n}", donate=donate)
    try:
        start_peers([peer])
        dt = trio.run(store_shards, peer.addr, peer.public_key, shards, ids, inflight)
    finally:
        peer.stop()
        shutil.rmtree(peer.state, ignore_errors=True)
    return len(shards) * SHARD / dt / MB


def bench_shards(args, work: Path, res: dict) -> None:
    log(f"shard transfer: preparing {args.net_size / MIB:.0f} MiB of 512 KiB shards")
    shards, ids = make_shards(args.net_size)
    total = len(shards) * SHARD
    for n in range(args.repeat):
        log(f"shard transfer: round {n + 1}/{args.repeat}: raw TCP, then StoreShard RPC")
        raw, _, _ = bench_net.run_case("raw", total, args.inflight, DEFAULT_OFFLOAD, True)
        rpc = shard_rpc_round(work, n, shards, ids, args.inflight)
        res.setdefault("shard_rounds", []).append({"raw": raw, "rpc": rpc})
        res["shard_raw"] = max(res.get("shard_raw", 0.0), raw)
        res["shard_rpc"] = max(res.get("shard_rpc", 0.0), rpc)


# --- 2.-4. filesystem -----------------------------------------------------------------------


def status_of(m: Mount) -> dict:
    """What `fluidfs status --json` prints (the same control request, without the process)."""
    return control.call(m.state / "control.sock", "status", timeout=30)


def dd_write(src: Path, dst: Path) -> tuple[float, float]:
    """dd bs=1M; return (wall seconds incl. close, dd's own MB/s)."""
    t0 = time.perf_counter()
    p = subprocess.run(
        ["dd", f"if={src}", f"of={dst}", "bs=1M"], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"dd failed: {p.stderr.strip()}")
    m = re.search(r"^(\d+) bytes .* copied, ([\d.,]+) s", p.stderr, re.MULTILINE)
    own = int(m.group(1)) / float(m.group(2).replace(",", ".")) / MB if m else None
    return wall, own


def dd_read(path: Path) -> float:
    t0 = time.perf_counter()
    run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"])
    return time.perf_counter() - t0


def warm(path: Path) -> None:
    """Read *path* once so dd's source comes from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MIB):
            pass


def fully_redundant(st: dict) -> bool:
    """No block under-replicated and no shard without a holder.

    ``under_replicated`` alone counts blocks below the repair threshold, which may allow
    a missing shard; ``upload_pending_bytes`` counts every shard still without a holder.
    """
    return st["under_replicated"] == 0 and st.get("upload_pending_bytes", 0) == 0


def wait_status(m: Mount, done, timeout: float, what: str, poll: float = 0.05) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = status_of(m)
        if done(st):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: {st}")
        time.sleep(poll)


def mount_with_peers(
    work: Path, tag: str, peers: list[ServePeer], cleanup: list, timeout: float = 90
) -> Mount:
    """A listening mount with every peer as a bootstrap peer, once it has agreements with
    all of them (its cleanup is queued on *cleanup*)."""
    extra = ["--listen", "127.0.0.1:0", "--donate", MOUNT_DONATE]
    for p in peers:
        extra += ["--peer", p.addr]
    m = Mount(work, tag, extra)
    cleanup.append(m.cleanup)
    m.init()
    m.mount()
    wait_status(
        m,
        lambda st: st["peers_with_agreements"] >= len(peers),
        timeout,
        f"agreements with {len(peers)} peers",
    )
    return m


def write_phase(args, m: Mount, src: Path, peers: list[ServePeer], prof: Profiler) -> dict:
    """dd into the mount; time until all sealed and (with peers) fully redundant."""
    blocks = math.ceil(args.size / BLOCK_SIZE)
    out: dict = {}
    warm(src)
    sampler = NetRssSampler(m.state / "daemon.pid", [p.pid for p in peers])
    sampler.start()
    cpu = CpuMeter({"mount": [m.pid()], "peers": [p.pid for p in peers]})
    try:
        with ExitStack() as stack:
            if peers:
                stack.enter_context(prof.record("write-mount", m.pid()))
                stack.enter_context(prof.record("write-peer0", peers[0].pid))
            t0 = time.perf_counter()
            out["dd_wall_s"], out["dd_own_mbps"] = dd_write(src, m.mnt / "f")
            sealed = None
            deadline = time.monotonic() + args.timeout
            while True:
                st = status_of(m)
                now = time.perf_counter()
                if sealed is None and st["unsealed_bytes"] == 0 and st["blocks"] == blocks:
                    sealed = now
                if sealed is not None and (not peers or fully_redundant(st)):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out after {args.timeout:.0f} s: {st}")
                time.sleep(0.05)
            out["sealed_s"] = sealed - t0
            out["done_s"] = now - t0
    finally:
        sampler.stop()
    out["cpu"] = cpu.stop()
    out["rss_mount_kib"], out["rss_peers_kib"] = sampler.mount, sampler.peers
    # Confirm with the real command what the polling saw.
    cli = json.loads(
        run(
            [sys.executable, "-m", "fluidfs", "status", "--json", "--state-dir", str(m.state)]
        ).stdout
    )
    out["status"] = {
        k: cli[k]
        for k in (
            "blocks",
            "unsealed_bytes",
            "under_replicated",
            "upload_pending_bytes",
            "redundancy",
            "peers_with_agreements",
            "uploaded_bytes",
            "repaired_bytes",
        )
        if k in cli
    }
    ok = cli["blocks"] == blocks and cli["unsealed_bytes"] == 0
    if peers:
        ok &= cli["under_replicated"] == 0 and cli["redundancy"] == {
            str(cli["shards_total"]): blocks
        }
    if not ok:
        raise RuntimeError(f"fluidfs status after the write is not as expected: {cli}")
    return out


def cold_read_phase(m: Mount, want: str, peers: list[ServePeer], prof: Profiler) -> dict:
    """fluidfs unmount, drop fluidfs's cache and the page cache, remount, dd the file."""
    out = {"unmount_s": m.unmount()}
    shutil.rmtree(m.state / "cache", ignore_errors=True)
    drop_caches()
    pid = m.mount()
    with prof.record("read-mount", pid) if peers else ExitStack():
        out["read_s"] = dd_read(m.mnt / "f")
    t0 = time.perf_counter()
    out["sha256_ok"] = sha256_of(m.mnt / "f") == want
    out["sha256_s"] = time.perf_counter() - t0
    if not out["sha256_ok"]:
        log(f"ERROR: sha256 of {m.mnt / 'f'} differs from the source")
    out["final_unmount_s"] = m.unmount()
    return out


def bench(args, work: Path, res: dict, prof: Profiler, cleanup: list) -> None:
    res["load_before"] = os.getloadavg()
    bench_shards(args, work, res)

    src = work / "source.bin"
    log(f"generating {args.size / MIB:.0f} MiB of random data")
    want = make_source(src, args.size)
    res["cold_caches"] = drop_caches()

    # plain directory
    plain = work / "plain"
    plain.mkdir()
    log("plain: dd write")
    warm(src)
    wall, own = dd_write(src, plain / "f")
    t = time.perf_counter()
    fd = os.open(plain / "f", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    res["plain"] = {
        "dd_wall_s": wall,
        "dd_own_mbps": own,
        "fsync_s": wall + time.perf_counter() - t,
    }
    drop_caches()
    res["plain"]["read_s"] = dd_read(plain / "f")
    (plain / "f").unlink()

    # local-only mount
    local = Mount(work, "local", ["--donate", MOUNT_DONATE])
    cleanup.append(local.cleanup)
    local.init()
    local.mount()
    log("local-only mount: dd write, until sealed")
    res["local"] = write_phase(args, local, src, [], prof)
    log("local-only mount: cold read")
    res["local"].update(cold_read_phase(local, want, [], prof))

    # 12 peers
    peers = [ServePeer(work / "peers", f"peer{i:02d}") for i in range(args.peers)]
    cleanup.append(lambda: [p.stop() for p in peers])
    log(f"starting {args.peers} fluidfs serve peers")
    start_peers(peers)
    net = mount_with_peers(work, "peers", peers, cleanup)
    log(f"mount with {args.peers} peers: dd write, until fully redundant")
    res["peers"] = write_phase(args, net, src, peers, prof)
    log(f"mount with {args.peers} peers: cold read")
    res["peers"].update(cold_read_phase(net, want, peers, prof))
    for p in peers:
        p.stop()
    res["load_after"] = os.getloadavg()


# --- report ---------------------------------------------------------------------------------


def summarise(args, res: dict, prof: Profiler) -> dict:
    mb = args.size / MB
    pl, lo, pe = res.get("plain", {}), res.get("local", {}), res.get("peers", {})
    rows: list[dict] = []

    def rate(d: dict, key: str):
        v = d.get(key)
        return None if v is None else mb / v

    def add(key, label, unit, vs, base, value, target_key=None):
        row = {
            "metric": key,
            "label": label,
            "unit": unit,
            "baseline_is": vs,
            "baseline": base,
            "fluidfs": value,
        }
        row["ratio"] = value / base if base not in (None, 0) and value is not None else None
        if target_key and value is not None:
            target, kind = TARGETS[target_key]
            ok = value >= target if kind == "min" else value < target
            row["target"] = f"{'>=' if kind == 'min' else '<'}{target:g}"
            row["verdict"] = "PASS" if ok else "SHORT"
        rows.append(row)

    n = args.peers
    add(
        "shard_rpc",
        "shard StoreShard RPC, 8 in flight",
        "MB/s",
        "raw TCP",
        res.get("shard_raw"),
        res.get("shard_rpc"),
        "shard_rpc",
    )
    add(
        "write_dd_peers",
        f"write accepted (dd), {n} peers",
        "MB/s",
        "local-only",
        lo.get("dd_own_mbps"),
        pe.get("dd_own_mbps"),
    )
    add(
        "write_dd_local",
        "write accepted (dd), local-only",
        "MB/s",
        "plain dir",
        pl.get("dd_own_mbps"),
        lo.get("dd_own_mbps"),
    )
    add(
        "write_sealed_peers",
        f"write all sealed, {n} peers",
        "MB/s",
        "local-only",
        rate(lo, "sealed_s"),
        rate(pe, "sealed_s"),
    )
    add(
        "write_redundant",
        f"write full redundancy, {n} peers",
        "MB/s",
        "local-only",
        rate(lo, "sealed_s"),
        rate(pe, "done_s"),
        "write_redundant",
    )
    add(
        "write_sealed_local",
        "write all sealed, local-only",
        "MB/s",
        "plain+fsync",
        rate(pl, "fsync_s"),
        rate(lo, "sealed_s"),
    )
    add(
        "read_cold_peers",
        f"cold read (dd), {n} peers",
        "MB/s",
        "local-only",
        rate(lo, "read_s"),
        rate(pe, "read_s"),
        "read_cold_peers",
    )
    add(
        "read_cold_local",
        "cold read (dd), local-only",
        "MB/s",
        "plain dir",
        rate(pl, "read_s"),
        rate(lo, "read_s"),
    )
    add(
        "unmount_after_write",
        "fluidfs unmount after write",
        "s",
        "local-only",
        lo.get("unmount_s"),
        pe.get("unmount_s"),
    )
    cpu_lo, cpu_pe = lo.get("cpu") or {}, pe.get("cpu") or {}
    add(
        "cpu_mount",
        "CPU seconds of mount, write",
        "s",
        "local-only",
        cpu_lo.get("mount"),
        cpu_pe.get("mount"),
    )
    add("cpu_peers", f"CPU seconds, sum of {n} peers", "s", "-", None, cpu_pe.get("peers"))

    def rest(c: dict):  # dd, this script, the kernel's own threads and any other load
        if not c:
            return None
        return c["machine_busy_cpus"] * c["seconds"] - c["mount"] - c.get("peers", 0)

    add("cpu_rest", "CPU seconds, rest of machine", "s", "local-only", rest(cpu_lo), rest(cpu_pe))
    add(
        "cpu_machine",
        "busy CPUs (whole machine), write",
        "CPUs",
        "local-only",
        cpu_lo.get("machine_busy_cpus"),
        cpu_pe.get("machine_busy_cpus"),
    )
    for field in RSS_FIELDS:
        add(
            f"mount_{field}",
            f"peak {field} of mount",
            "MiB",
            "local-only",
            (lo.get("rss_mount_kib") or {}).get(field, 0) / 1024 or None,
            (pe.get("rss_mount_kib") or {}).get(field, 0) / 1024 or None,
        )
    for field in RSS_FIELDS:
        add(
            f"peers_{field}",
            f"peak {field}, sum of {n} peers",
            "MiB",
            "-",
            None,
            (pe.get("rss_peers_kib") or {}).get(field, 0) / 1024 or None,
        )

    sha = [d.get("sha256_ok") for d in (lo, pe) if "sha256_ok" in d]
    sha_ok = all(sha) if sha else None
    load = res.get("load_before"), res.get("load_after")
    print()
    print(
        f"fluidfs network bench: size={args.size / MIB:.0f} MiB peers={n} "
        f"shards={args.net_size / MIB:.0f} MiB x{args.repeat} cpus={os.cpu_count()} "
        f"page-cache-dropped={res.get('cold_caches')} sha256-ok={sha_ok}"
    )
    print(
        "load average before: "
        + (" ".join(f"{x:.2f}" for x in load[0]) if load[0] else "-")
        + "   after: "
        + (" ".join(f"{x:.2f}" for x in load[1]) if load[1] else "-")
    )
    print("MB = 10^6 bytes; ratio = fluidfs/baseline (for times, >1 means fluidfs is slower)")
    header = (
        f"{'metric':36} {'unit':>5} {'baseline is':>12} {'baseline':>9} {'fluidfs':>9} "
        f"{'ratio':>6} {'target':>7} verdict"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(
            f"{r['label']:36} {r['unit']:>5} {r['baseline_is']:>12} {fmt(r['baseline']):>9} "
            f"{fmt(r['fluidfs']):>9} {ratio:>6} {r.get('target', ''):>7} {r.get('verdict', '')}"
        )
    if res.get("shard_rounds"):
        print(
            "\nshard rounds (MB/s raw / rpc): "
            + ", ".join(f"{r['raw']:.0f}/{r['rpc']:.0f}" for r in res["shard_rounds"])
        )
    for name, d in (("local-only", lo), (f"{n} peers", pe)):
        if "dd_wall_s" in d:
            print(
                f"{name}: dd {d['dd_wall_s']:.2f} s (incl. close), sealed at {d['sealed_s']:.2f} s,"
                f" done at {d['done_s']:.2f} s; status {json.dumps(d.get('status'))}"
            )
    prof.print_reports("py-spy, '{}':")
    out = {
        "size": args.size,
        "peers": n,
        "shard_bytes": args.net_size,
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "load_before": load[0],
        "load_after": load[1],
        "page_cache_dropped": res.get("cold_caches"),
        "sha256_ok": sha_ok,
        "rows": rows,
        "shard_rounds": res.get("shard_rounds"),
        "raw": {"plain": pl, "local": lo, "peers": pe},
        "profile": prof.reports,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None, help="file size (default 1G)")
    parser.add_argument("--peers", type=int, default=12, help="serve peers (default 12)")
    parser.add_argument(
        "--net-size", type=parse_size, default=None, help="shard bytes per round (default 512M)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="shard rounds, best kept")
    parser.add_argument("--inflight", type=int, default=8, help="StoreShard calls in flight")
    parser.add_argument("--timeout", type=float, default=1800, help="max wait for redundancy")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the scratch dir")
    parser.add_argument("--quick", action="store_true", help="small run (64M)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON")
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy record the peer phases into this dir"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 64 * MIB if args.quick else 1 << 30
    if args.net_size is None:
        args.net_size = 64 * MIB if args.quick else 512 * MIB
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fluidfs-netbench-", dir=parent))
    args.workdir = work
    tune_malloc()  # like a fluidfs node: the shard client stands in for one
    signal.signal(signal.SIGTERM, _interrupted)  # clean up on SIGTERM as on Ctrl-C
    res: dict = {}
    prof = Profiler(args.profile)
    cleanup: list = []
    failed = False
    try:
        bench(args, work, res, prof, cleanup)
    except BaseException as exc:  # report what we have, then clean up
        failed = True
        log(f"benchmark failed: {exc!r}")
        for name in ("state-peers", "state-local"):
            state_log = work / name / "fluidfs.log"
            if state_log.exists():
                tail = state_log.read_text(errors="replace").splitlines()[-20:]
                log(f"last lines of {state_log}:\n" + "\n".join(tail))
    finally:
        failed |= not run_cleanup(cleanup)
        left = [p for p in ("mnt-local", "mnt-peers") if is_mount(work / p)]
        if not args.keep and not left:
            shutil.rmtree(work, ignore_errors=True)
    summarise(args, res, prof)
    if failed or any(res.get(k, {}).get("sha256_ok") is False for k in ("local", "peers")):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
