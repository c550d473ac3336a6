"""The fresh-machine ``find`` alone, again, on a tree ``bench_scale.py --keep`` built.

    /tmp/venv/bin/python contrib/bench/bench_scale.py --files 100000 --keep --workdir /tmp/w
    /tmp/venv/bin/python contrib/bench/bench_find_again.py /tmp/w/fluidfs-bench-scale-XXXX \\
        --repos /path/to/main . --rounds 2

Building a 100,000-file tree takes minutes; timing a change to the walk needs only the
last step. This restarts the kept peers (``fluidfs serve`` on the ports they had, so the
exported keyfile ``b.key`` still names them), then for each round and each checkout in
``--repos`` (alternating, so load drifts hit both alike) mounts a new state directory
with only ``b.key``, times ``find MNT | wc -l`` with the CPU the mount and the peers
spend meanwhile and the mount's RetrieveShard(s) calls, and unmounts. ``--profile DIR``
records the mount with ``py-spy record --idle`` during each find and prints how busy
its threads were and their top frames (benchlib's ``Profiler``; ``--native`` adds C
frames: LMDB, pyfuse3, the garbage collector; ``--profile-peer`` records the first
peer as well). The FUSE requests the mount answered
during the find are counted by operation (``fluidfs status --json``). The peers and
mounts it starts are stopped at the end (by pid).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scale import REPO, Cli, find_calls, timed_find  # noqa: E402
from benchlib import Profiler, log  # noqa: E402


class KeptPeers:
    """The kept tree's peers, restarted on the addresses they listened on."""

    def __init__(self, cli: Cli, work: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        i = 0
        while (work / f"peer{i}.key").exists():
            state = work / f"peer{i}"
            addr = (state / "listen").read_text().strip()
            (state / "listen").unlink()
            logf = open(work / f"peer{i}.log", "ab")  # noqa: SIM115 - lives with the process
            self.procs.append(cli.popen(
                ["serve", "--keyfile", str(work / f"peer{i}.key"), "--state-dir", str(state),
                 "--listen", addr, "--donate", "8G"], logf))
            i += 1
        for i in range(len(self.procs)):
            listen = work / f"peer{i}" / "listen"
            deadline = time.monotonic() + 60
            while not listen.exists():
                if time.monotonic() > deadline or self.procs[i].poll() is not None:
                    raise RuntimeError(f"peer {i} did not start (see peer{i}.log)")
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)


def system_seconds(pid: int) -> float:
    """System (kernel) CPU seconds of process *pid* so far: a FUSE reply's kernel work
    (readdirplus makes an inode and a dentry per entry) is charged to the mount here."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def status(cli: Cli, state: Path) -> dict:
    """The mount's ``fluidfs status --json``."""
    return json.loads(cli("status", "--json", "--state-dir", str(state)).stdout)


def find_once(cli: Cli, work: Path, state: Path, peers: KeptPeers, profiler: Profiler,
              name: str, peer_profiler: Profiler | None = None) -> dict:
    """Mount *state* (new) with ``b.key``, time the find, unmount; the figures."""
    mnt = work / "again-mnt"
    mnt.mkdir(exist_ok=True)
    cli("mount", str(mnt), "--keyfile", str(work / "b.key"), "--state-dir", str(state),
        "--listen", "127.0.0.1:0")
    pid = int((state / "daemon.pid").read_text())
    try:
        before, sys_before = status(cli, state), system_seconds(pid)
        with profiler.record(name, pid), contextlib.ExitStack() as spies:
            if peer_profiler is not None:
                spies.enter_context(peer_profiler.record(f"{name}-peer", peers.procs[0].pid))
            fig = timed_find(mnt, pid, peers)
        fig["find_mount_sys_s"] = system_seconds(pid) - sys_before
        after = status(cli, state)
        calls = before.get("retrieve_requests"), after.get("retrieve_requests")
        if calls[0] is not None and calls[1] is not None:
            fig["find_retrieve_calls"] = calls[1]["calls"] - calls[0]["calls"]
            fig["find_retrieve_shards"] = calls[1]["shards"] - calls[0]["shards"]
        fuse = before.get("fuse_requests"), after.get("fuse_requests")
        if fuse[0] is not None and fuse[1] is not None:
            fig["find_fuse_requests"] = {
                op: n - fuse[0].get(op, 0) for op, n in sorted(fuse[1].items())
                if n - fuse[0].get(op, 0)}
    finally:
        cli("unmount", str(mnt))
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path, help="a bench_scale.py --keep directory")
    parser.add_argument("--repos", type=Path, nargs="+", default=[REPO],
                        help="checkouts whose fluidfs mounts (alternating each round)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None,
                        help="directory for a py-spy raw profile of each find")
    parser.add_argument("--native", action="store_true",
                        help="with --profile: C frames too (py-spy --native)")
    parser.add_argument("--profile-peer", action="store_true",
                        help="with --profile: record the first peer too")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work.resolve()
    meta = json.loads((work / "tree.json").read_text()) if (work / "tree.json").exists() else {}
    profiler = Profiler(args.profile, native=args.native)
    peer_profiler = Profiler(args.profile, native=args.native) if args.profile_peer else None
    peers = KeptPeers(Cli(args.repos[0]), work)
    figs: list[dict] = []
    try:
        for r in range(args.rounds):
            for i, repo in enumerate(args.repos):
                state = work / f"again-{time.time_ns()}"
                log(f"round {r + 1}: find with {repo}")
                fig = {"repo": str(repo), "round": r + 1,
                       **find_once(Cli(repo), work, state, peers, profiler, f"find-r{r + 1}-{i}",
                                   peer_profiler)}
                figs.append(fig)
                shutil.rmtree(state, ignore_errors=True)
    finally:
        peers.stop()
    dirs = meta.get("dirs")
    for fig in figs:
        per_dir = f" per dir: mount {fig['find_mount_cpu_s'] * 1000 / dirs:.1f} ms, peers " \
                  f"{fig['find_peers_cpu_s'] * 1000 / dirs:.1f} ms" if dirs else ""
        print(f"round {fig['round']} {fig['repo']}: find {fig['find_s']:.2f} s, counted "
              f"{fig['find_count']:,}; mount CPU {fig['find_mount_cpu_s']:.2f} s "
              f"(system {fig['find_mount_sys_s']:.2f}), peers' CPU "
              f"{fig['find_peers_cpu_s']:.2f} s{per_dir}")
        if find_calls(fig):
            print(f"  {find_calls(fig)}")
        if fig.get("find_fuse_requests"):
            print("  FUSE requests: " + ", ".join(
                f"{op} {n:,}" for op, n in fig["find_fuse_requests"].items()))
    profiler.print_reports("py-spy of the mount, {}:")
    if peer_profiler is not None:
        peer_profiler.print_reports("py-spy of the first peer, {}:")
    if args.json:
        args.json.write_text(json.dumps(figs, indent=2))
    counts = {fig["find_count"] for fig in figs}
    return 0 if len(counts) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
