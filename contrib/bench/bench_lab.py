"""The lab benchmark of issue 12: upload, restore and an upload limit on home lines.

Run as root from the repository (network namespaces; see contrib/netlab.py):

    .venv/bin/python contrib/bench/bench_lab.py [--size 256M] [--limit 10Mbit]
        [--peer-up 20mbit] [--up 20mbit] [--down 200mbit]

In the network lab (tests/netlab.py) 12 `fluidfs serve` peers each sit on a public host
whose uplink is shaped to PEER_UP (tc token buckets), and the mounts on hosts shaped to
UP/DOWN. Three phases, each printed beside a bound measured with plain TCP in the same
lab run (what the shaped links give without fluidfs):

1. upload: a mount writes SIZE (random bytes, one file); the time until every block is
   on 12 peers, against the link bound 1.5 x SIZE (8-of-12 shards) at the mount's
   measured uplink (goal: >= 85% of the bound);
2. restore: a fresh mount on another host, from the keyfile alone (exported with its
   peers), reads the file; its rate against min(downlink, sum of the peers' uplinks),
   measured as plain TCP from all 12 peers at once into that host (goal: >= 70%);
3. limit: another mount on a third host, with ``--limit-upload LIMIT``, uploads the same
   SIZE; the worst 5 s window of its interface's sent bytes (kernel counters: TCP/IP
   headers, retransmissions, everything) against the limit (goal: at most +5%).

LIMIT defaults to ``10Mbit`` (half the mount's line, so the limit binds): in fluidfs's
rclone-style units a bare ``10M`` is 10 MiB/s, more than a 20 Mbit/s line carries.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lab_repair import measured_tcp_rate, parse_rate, parse_size
from benchlib import BLOCK_SIZE, Profiler
from labnodes import PORT, LabMount, LabPeer, cli
from netlab import Host, Lab
from peerhelpers import status, wait_for

from fluidfs import keys
from fluidfs.cli.argtypes import bandwidth_limit

K, N = 8, 12
MIB = 1 << 20
BLOCK = BLOCK_SIZE  # the default block size
WINDOW = 5.0


def tx_bytes(host: Host) -> int:
    """Bytes sent on *host*'s line (netlink counters of its own namespace; /sys would show
    the namespace that sysfs was mounted in)."""
    shown = json.loads(host.run("ip", "-s", "-j", "link", "show", "dev", host.iface))
    return int(shown[0]["stats64"]["tx"]["bytes"])


def rx_bytes(host: Host) -> int:
    """Bytes received on *host*'s line (as ``tx_bytes``)."""
    shown = json.loads(host.run("ip", "-s", "-j", "link", "show", "dev", host.iface))
    return int(shown[0]["stats64"]["rx"]["bytes"])


class Sampler:
    """(monotonic time, bytes sent) of a host about every 0.2 s, in a thread."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tx_bytes(self.host)))
            self._stop.wait(0.2)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def worst_rate(self, window: float) -> float:
        """The highest rate between two samples between 0.9 x and 1 x *window* apart."""
        best, s, j = 0.0, self.samples, 0
        for i in range(len(s)):
            j = max(j, i)
            while j + 1 < len(s) and s[j + 1][0] - s[i][0] <= window:
                j += 1
            elapsed = s[j][0] - s[i][0]
            if elapsed >= 0.9 * window:
                best = max(best, (s[j][1] - s[i][1]) / elapsed)
        return best


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds *pid* has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def full(state: Path, blocks: int):
    """A predicate: the mount with *state* has every one of at least *blocks* blocks on N
    peers (the file's blocks, plus the metadata's)."""

    def check() -> dict | None:
        s = status(state)
        if (s["blocks"] >= blocks and s["unsealed_bytes"] == 0 and s["under_replicated"] == 0
                and s["redundancy"] == {str(N): s["blocks"]}):
            return s
        return None

    return check


def upload(mnt: LabMount, size: int) -> float:
    """Write *size* random bytes into the mount; seconds until every block is 12/12."""
    data = os.urandom(size)
    started = time.monotonic()
    with open(mnt.path / "data.bin", "wb") as out:
        out.write(data)
    os.sync()
    wait_for(full(mnt.state, -(-size // BLOCK)), 3600, "full redundancy")
    return time.monotonic() - started


def start_mount(root: Path, name: str, host: Host, keyfile: Path, extra: list[str]) -> LabMount:
    mnt = LabMount(root / f"{name}-mnt", root / f"{name}-state", keyfile, extra, host=host)
    mnt.path.mkdir()
    mnt.mount()
    return mnt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 * MIB)
    parser.add_argument("--limit", default="10Mbit", help="--limit-upload of phase 3")
    parser.add_argument("--skip-limit", action="store_true",
                        help="leave out phase 3 (a quicker run for the restore figures)")
    parser.add_argument("--peer-up", type=parse_rate, default=20_000_000)
    parser.add_argument("--up", type=parse_rate, default=20_000_000)
    parser.add_argument("--down", type=parse_rate, default=200_000_000)
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's directory (the nodes' logs and state)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the fresh mount during the read; raw stacks into DIR")
    args = parser.parse_args()
    profiler = Profiler(args.profile)
    limit = bandwidth_limit(args.limit)
    assert limit is not None
    if os.geteuid() != 0:
        print("bench_lab: run as root (network namespaces)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    if args.keep:
        print(f"bench_lab: the nodes' logs and state stay in {root}", flush=True)
    else:  # 12 peers' shards and the mounts' caches: several times SIZE on disk
        atexit.register(shutil.rmtree, root, True)
    quick = ["--audit-interval", "5", "--tolerance", "600", "--donate", "4G"]
    mounts: list[LabMount] = []
    with Lab(root) as lab:
        peers = [LabPeer(lab.public(f"p{i}", args.peer_up, None), root, list(quick)).start()
                 for i in range(N)]
        hosts = [lab.public(name, args.up, args.down) for name in ("m", "r", "l")]
        # transfers of a few seconds each: with less, starting the senders (a process
        # each, in its namespace) and TCP's slow start weigh in and the bound comes out low
        up_rate = measured_tcp_rate([hosts[0]], peers[0].host, 16 * MIB)
        down_rate = measured_tcp_rate([p.host for p in peers], hosts[1], 8 * MIB)
        extra = ["--listen", f"0.0.0.0:{PORT}", *quick]
        for peer in peers:
            extra += ["--peer", peer.addr]
        try:
            keyfile = root / "mount.key"
            keys.write_keyfile(keyfile, keys.generate(shards_total=N, shards_needed=K))
            mnt = start_mount(root, "m", hosts[0], keyfile, extra)
            mounts.append(mnt)
            wait_for(lambda: status(mnt.state)["peers_with_agreements"] == N, 120,
                     "agreements with every peer")
            placed = upload(mnt, args.size)
            synced = cli("sync", "--json", "--state-dir", str(mnt.state), timeout=600)
            assert synced.returncode == 0, synced.stderr
            exported = cli("key", "export", "--with-peers", "--keyfile", str(keyfile),
                           "--state-dir", str(mnt.state))
            assert exported.returncode == 0, exported.stderr
            mnt.unmount()

            restore_key = root / "restore.key"
            restore_key.write_text(exported.stdout)
            began = time.monotonic()
            fresh = start_mount(root, "r", hosts[1], restore_key,
                                ["--listen", f"0.0.0.0:{PORT}", "--restore-wait", "3",
                                 *quick])
            mounts.append(fresh)
            mounted = time.monotonic() - began
            received = rx_bytes(hosts[1])
            pids = [fresh.pid(), *(p.proc.pid for p in peers if p.proc is not None)]
            with profiler.record("read", pids[0]):
                cpu = [cpu_seconds(pid) for pid in pids]
                began = time.monotonic()
                subprocess.run(["cat", str(fresh.path / "data.bin")],
                               stdout=subprocess.DEVNULL, check=True, timeout=3600)
                read = time.monotonic() - began
                cpu = [cpu_seconds(pid) - was for pid, was in zip(pids, cpu, strict=True)]
            fetched = rx_bytes(hosts[1]) - received
            print(f"CPU during the read: the fresh mount {cpu[0]:.1f} s, the {N} peers "
                  f"{sum(cpu[1:]):.1f} s in all, in {read:.1f} s on {os.cpu_count()} cores "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            profiler.print_reports()
            fresh.unmount()

            if args.skip_limit:
                limited = worst = 0.0
                return _report(args, limit, up_rate, down_rate, placed, mounted, read,
                               fetched, limited, worst)
            limited_key = root / "limited.key"
            keys.write_keyfile(limited_key, keys.generate(shards_total=N, shards_needed=K))
            lim = start_mount(root, "l", hosts[2], limited_key,
                              [*extra, "--limit-upload", args.limit])
            mounts.append(lim)
            wait_for(lambda: status(lim.state)["peers_with_agreements"] == N, 120,
                     "agreements with every peer (limited mount)")
            with Sampler(hosts[2]) as sampler:
                limited = upload(lim, args.size)
            worst = sampler.worst_rate(WINDOW)
        finally:
            for made in mounts:
                made.cleanup()
    return _report(args, limit, up_rate, down_rate, placed, mounted, read, fetched, limited,
                   worst)


def _report(args: argparse.Namespace, limit: int, up_rate: float, down_rate: float,
            placed: float, mounted: float, read: float, fetched: int, limited: float,
            worst: float) -> int:
    """Print the figures of a run beside its bounds."""
    bound = 1.5 * args.size / up_rate
    restore_bound = args.size / down_rate
    nominal = min(args.down, N * args.peer_up) / 8
    print(f"lab: {N} peers on {args.peer_up / 1e6:g} Mbit/s uplinks, the mounts on "
          f"{args.up / 1e6:g}/{args.down / 1e6:g} Mbit/s; {args.size / MIB:.0f} MiB; "
          f"measured TCP: {up_rate * 8 / 1e6:.1f} Mbit/s out of the mount, "
          f"{down_rate * 8 / 1e6:.1f} Mbit/s into a host from all {N} peers at once")
    print(f"upload to 12/12: {placed:.1f} s; link bound (1.5 x size at the measured uplink) "
          f"{bound:.1f} s: {bound / placed:.0%} of the bound (goal >= 85%)")
    print(f"restore on a fresh mount: mount {mounted:.1f} s, read {read:.1f} s = "
          f"{args.size / read * 8 / 1e6:.1f} Mbit/s; bound {restore_bound:.1f} s: "
          f"{restore_bound / read:.0%} of the bound (goal >= 70%); "
          f"{args.size / nominal / read:.0%} of the nominal {nominal * 8 / 1e6:g} Mbit/s; "
          f"{fetched / args.size:.2f} bytes received per byte read (1.00: K shards per "
          f"block, more only for late ones; K + 2 at once would be {(K + 2) / K:.2f})")
    if args.skip_limit:
        return 0
    print(f"with --limit-upload {args.limit} ({limit * 8 / 1e6:.1f} Mbit/s): upload to 12/12 "
          f"{limited:.1f} s; worst {WINDOW:g} s window {worst * 8 / 1e6:.2f} Mbit/s = "
          f"{worst / limit - 1:+.1%} against the limit (goal <= +5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
