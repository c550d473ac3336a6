#!/usr/bin/env python3
"""Hostile-internet benchmark: an honest mount backs up while strangers attack it.

Twelve real `fluidfs serve` peers on 127.0.0.1 and one mount that listens for peers too.
The same run measures, each figure beside its baseline:

Each round (default 3; the figures are medians) does:

1. baseline: copy a random file (default 256 MiB) into the mount and wait until every
   block is at full redundancy on the peers; peak VmRSS of the mount;
2. attack: the same with another random file of the same size, while a separate attacker
   process holds 200 hostile connections to the mount's peer port and sends the worst
   frames it knows, as fast as it can, without ever reading a reply:
   - 1 MiB requests made of empty CBOR maps (~1 M tiny items),
   - deeply nested arrays, duplicate-key maps and junk that is not CBOR,
   - 8 MiB StoreShard frames without an agreement,
   - bursts of RetrieveShard / ShareNewPeers / Ping it never reads the answers to,
   - and slow connections that open TCP and never finish the handshake.
   Connections the node closes are dialled again with a fresh identity.

Reported: honest throughput under attack as a ratio to the baseline (goal >= 0.8), the
mount's peak VmRSS under attack (goal < 400 MB), and whether the node stayed up. The
attacker runs at nice 10 so that its own CPU use (encrypting its junk) takes less from
the two cores than the node under attack does.

    python contrib/bench/bench_hostile.py                 # 256 MiB, 200 connections
    python contrib/bench/bench_hostile.py --quick         # 32 MiB, 50 connections
    python contrib/bench/bench_hostile.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cbor2
import nacl.signing
import trio
from bench_network import (
    ServePeer,
    fully_redundant,
    mount_with_peers,
    start_peers,
    status_of,
    warm,
)
from benchlib import (
    MB,
    MIB,
    REPO,
    Mount,
    fmt,
    is_mount,
    log,
    make_source,
    parse_size,
    read_rss,
    run_cleanup,
)

from fluidfs.net.errors import NetError
from fluidfs.net.tcp import dial

PEER_DONATE = "8G"
GOAL_RATIO = 0.8
GOAL_RSS_MB = 400


# --- the attacker (runs as its own process: --attack HOST:PORT) ----------------------------


def _frames(crashers: bool = True) -> list[bytes]:
    """The worst frames we know, each an RPC request as raw CBOR (some deliberately broken)."""
    empty_maps = cbor2.dumps(
        {"v": 1, "id": 1, "op": "Ping", "args": {"x": [{} for _ in range(1_000_000)]}}
    )
    small_ints = cbor2.dumps(
        {"v": 1, "id": 2, "op": "DeleteShard", "args": {"ids": [0] * 1_000_000}}
    )
    deep = b"\xa4\x61v\x01\x62id\x03\x62op\x64Ping\x64args" + b"\x81" * 100_000 + b"\x00"
    dup_keys = b"\xa5\x61v\x01\x62id\x04\x62op\x64Ping\x64args\xa0\x61v\x01"
    junk = os.urandom(512 * 1024)
    store = cbor2.dumps(
        {
            "v": 1,
            "id": 5,
            "op": "StoreShard",
            "args": {"shards": [{"id": os.urandom(32), "data": os.urandom(8 * MIB - 4096)}]},
        }
    )
    retrieve = cbor2.dumps({"v": 1, "id": 6, "op": "RetrieveShard", "args": {"id": bytes(32)}})
    share = cbor2.dumps({"v": 1, "id": 7, "op": "ShareNewPeers", "args": {"max": 256}})
    ping = cbor2.dumps({"v": 1, "id": 8, "op": "Ping", "args": {"addr": "x" * 300}})
    frames = [empty_maps, small_ints, deep, dup_keys, junk, store, retrieve, share]
    return [*frames, ping] if crashers else frames


async def _attack_one(host: str, port: int, frames: list[bytes], stats: dict) -> None:
    """One hostile connection: dial with a fresh identity, send junk forever, never read."""
    while True:
        try:
            channel = await dial(host, port, nacl.signing.SigningKey.generate(), timeout=10)
        except (NetError, OSError):
            stats["dial_failed"] += 1
            await trio.sleep(0.2)
            continue
        stats["connected"] += 1
        try:
            while True:
                frame = random.choice(frames)
                if len(frame) > channel.max_message:
                    frame = frame[: channel.max_message]
                await channel.send(frame)
                stats["frames"] += 1
                stats["bytes"] += len(frame)
                if frame[-1:] == b"\x00" and len(frame) < 1024:  # small: send a burst
                    for _ in range(63):
                        await channel.send(frame)
                        stats["frames"] += 1
        except (NetError, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            stats["closed_by_node"] += 1
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(channel._stream)


async def _slow_one(host: str, port: int, stats: dict) -> None:
    """Open TCP and never finish the handshake; reconnect when the node gives up on us."""
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            await trio.sleep(0.5)
            continue
        stats["slow_opened"] += 1
        try:
            await stream.send_all(b"FLFS")  # a HELLO that never ends
            while await stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def _attack(addr: str, connections: int, slow: int, crashers: bool) -> None:
    host, port = addr.rsplit(":", 1)
    frames = _frames(crashers)
    stats = dict.fromkeys(
        ("connected", "dial_failed", "frames", "bytes", "closed_by_node", "slow_opened"), 0
    )

    def report(*_args: object) -> None:
        print(json.dumps(stats), flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, report)
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(_attack_one, host, int(port), frames, stats)
        for _ in range(slow):
            nursery.start_soon(_slow_one, host, int(port), stats)
        await trio.sleep(2)
        print(json.dumps({"started": True, **stats}), flush=True)
        await trio.sleep_forever()


# --- the honest side ------------------------------------------------------------------------


class PeakRss(threading.Thread):
    """Peak VmRSS (KiB) of one pid, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.alive = True
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            values = read_rss(self.pid)
            if values is None:
                self.alive = False
                return
            self.peak = max(self.peak, values.get("VmRSS", 0))

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def backup(m: Mount, src: Path, name: str, timeout: float) -> dict:
    """cp *src* into the mount; seconds until every block is at full redundancy."""
    warm(src)
    sampler = PeakRss(m.pid())
    sampler.start()
    t0 = time.perf_counter()
    try:
        shutil.copyfile(src, m.mnt / name)
        deadline = time.monotonic() + timeout
        while True:
            st = status_of(m)
            if st["unsealed_bytes"] == 0 and fully_redundant(st):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no full redundancy after {timeout:.0f} s: {st}")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
    finally:
        peak = sampler.stop()
    return {
        "seconds": seconds,
        "mbps": src.stat().st_size / seconds / MB,
        "peak_rss_mb": peak * 1024 / MB,
        "node_alive": sampler.alive,
    }


def run_bench(args, work: Path, res: dict, cleanup: list) -> None:
    peers = [ServePeer(work / "peers", f"peer{i:02d}", PEER_DONATE) for i in range(args.peers)]
    cleanup.append(lambda: [p.stop() for p in peers])
    log(f"starting {args.peers} fluidfs serve peers")
    start_peers(peers)
    m = mount_with_peers(work, "hostile", peers, cleanup)
    addr = (m.state / "listen").read_text().strip()
    res["rounds"] = []
    for n in range(args.rounds):
        log(f"round {n + 1}/{args.rounds}")
        res["rounds"].append(one_round(args, m, work, addr, n, cleanup))
    res["node_alive_after"] = Path(f"/proc/{m.pid()}").exists()


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* (and its reaped children) in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def one_round(args, m: Mount, work: Path, addr: str, n: int, cleanup: list) -> dict:
    """A copy with no attacker, then one under attack; both read back and checked."""
    out: dict = {}
    for phase in ("baseline", "attack"):
        src = work / f"source-{n}-{phase}.bin"
        make_source(src, args.size)  # new random data each time: nothing deduplicates
        attacker = None
        if phase == "attack":
            attacker = start_attacker(args, addr)
            cleanup.append(lambda a=attacker: stop_attacker(a))
            out["attacker_started"] = json.loads(attacker.stdout.readline() or "{}")
            attacker_cpu = cpu_seconds(attacker.pid)
        mount_cpu = cpu_seconds(m.pid())
        out[phase] = backup(m, src, src.name, args.timeout)
        out[phase]["mount_cpu_s"] = cpu_seconds(m.pid()) - mount_cpu
        if attacker is not None:
            out["attacker_cpu_s"] = cpu_seconds(attacker.pid) - attacker_cpu
            out["attacker"] = stop_attacker(attacker)
        if (m.mnt / src.name).read_bytes() != src.read_bytes():
            raise RuntimeError(f"{src.name} reads back wrong")
        src.unlink()
    log(f"  {out['baseline']['mbps']:.1f} MB/s alone, {out['attack']['mbps']:.1f} under attack")
    return out


def start_attacker(args, addr: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--attack", addr, "--connections", str(args.connections),
         "--slow", str(args.slow), *(["--no-crashers"] if args.no_crashers else [])],
        stdout=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=lambda: os.nice(10),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def stop_attacker(attacker: subprocess.Popen) -> dict:
    """SIGTERM the attacker; return the counts it prints as it goes."""
    if attacker.poll() is None:
        attacker.send_signal(signal.SIGTERM)
        try:
            attacker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            attacker.kill()
            attacker.wait()
    lines = (attacker.stdout.read() or "").strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def summarise(args, res: dict) -> None:
    rounds = res.get("rounds", [])
    base = statistics.median(r["baseline"]["mbps"] for r in rounds)
    att = statistics.median(r["attack"]["mbps"] for r in rounds)
    ratio = att / base
    peak_base = max(r["baseline"]["peak_rss_mb"] for r in rounds)
    peak_att = max(r["attack"]["peak_rss_mb"] for r in rounds)
    cpu_base = statistics.median(r["baseline"]["mount_cpu_s"] / r["baseline"]["seconds"]
                                 for r in rounds)
    cpu_att = statistics.median(r["attack"]["mount_cpu_s"] / r["attack"]["seconds"]
                                for r in rounds)
    attacker_cores = statistics.median(r["attacker_cpu_s"] / r["attack"]["seconds"]
                                       for r in rounds)
    print(f"\nbench_hostile: {args.size / MIB:.0f} MiB per copy, {args.peers} peers, "
          f"{args.connections} hostile + {args.slow} slow connections, "
          f"median of {len(rounds)} rounds")
    print(f"{'measure':40} {'no attacker':>12} {'under attack':>13} {'ratio':>7}  goal")
    for name, b, a, r, goal in (
        ("backup to full redundancy, MB/s", base, att, ratio, f">= {GOAL_RATIO}"),
        ("mount peak VmRSS (max), MB", peak_base, peak_att, None, f"< {GOAL_RSS_MB}"),
        ("mount CPU, cores busy", cpu_base, cpu_att, cpu_att / cpu_base, ""),
    ):
        print(f"{name:40} {fmt(b):>12} {fmt(a):>13} {fmt(r):>7}  {goal}")
    print("per round, MB/s alone / attacked: "
          + ", ".join(f"{r['baseline']['mbps']:.0f}/{r['attack']['mbps']:.0f}" for r in rounds))
    print(f"the attacker process itself kept {attacker_cores:.2f} of the 2 cores busy "
          f"(at nice 10); its counts, last round: {rounds[-1].get('attacker')}")
    print(f"node alive: {res.get('node_alive_after')}; every copy read back intact")
    verdict = ratio >= GOAL_RATIO and peak_att < GOAL_RSS_MB and res.get("node_alive_after")
    print(f"goals met: {bool(verdict)}")
    if args.json:
        args.json.write_text(json.dumps({"ratio": ratio, **res}, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=None, help="bytes per copy (256M)")
    parser.add_argument("--peers", type=int, default=12)
    parser.add_argument("--connections", type=int, default=None, help="hostile (default 200)")
    parser.add_argument("--slow", type=int, default=20, help="never-handshaking connections")
    parser.add_argument("--rounds", type=int, default=3, help="baseline/attack pairs")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="32 MiB, 50 connections")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--no-crashers", action="store_true",
        help="leave out frames known to crash old nodes (to measure memory on them)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--attack", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.connections is None:
        args.connections = 50 if args.quick else 200
    if args.attack:
        trio.run(_attack, args.attack, args.connections, args.slow, not args.no_crashers)
        return 0
    if args.size is None:
        args.size = 32 * MIB if args.quick else 256 * MIB
    parent = args.workdir or Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="fluidfs-hostile-", dir=parent))
    res: dict = {}
    cleanup: list = []
    failed = False
    try:
        run_bench(args, work, res, cleanup)
    except BaseException as exc:
        failed = True
        log(f"benchmark failed: {exc!r}")
        node_log = work / "state-hostile" / "fluidfs.log"
        if node_log.exists():
            lines = node_log.read_text(errors="replace").splitlines()
            log(f"the mount's log has {len(lines)} lines; the last ones:\n" + "\n".join(lines[-8:]))
    finally:
        failed |= not run_cleanup(cleanup)
        if not args.keep and not is_mount(work / "mnt-hostile"):
            shutil.rmtree(work, ignore_errors=True)
    if res.get("rounds"):
        summarise(args, res)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
