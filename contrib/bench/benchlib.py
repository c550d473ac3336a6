"""Helpers shared by the end-to-end benchmarks (bench_fs.py, bench_network.py).

Scripts in this directory import it as ``benchlib`` (their directory is on sys.path when
they are run as ``python contrib/bench/<script>.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MB = 1_000_000
MIB = 1 << 20
BLOCK_SIZE = 8 * MIB  # fluidfs default --block-size (node/config.py DEFAULT_BLOCK_SIZE)


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_cleanup(cleanup: list) -> bool:
    """Run the queued clean-up steps, last queued first, each even if one before failed;
    whether all of them succeeded (a failure is logged)."""
    ok = True
    for step in reversed(cleanup):
        try:
            step()
        except Exception as exc:
            ok = False
            log(f"cleanup failed: {exc!r}")
    return ok


# --- helpers ----------------------------------------------------------------------------


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, **kw)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    run(cmd)
    return time.perf_counter() - start


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def is_mount(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as gone.
    with suppress(OSError), open(f"/proc/{pid}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def fmt(value: float | None) -> str:
    """A figure for the result tables: '-' when missing, no decimals from 100 up."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def make_source(path: Path, size: int) -> str:
    """Write *size* random bytes to *path*; return their sha256."""
    digest = hashlib.sha256()
    chunk = 4 * MIB
    with open(path, "wb") as f:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(MIB):
            digest.update(data)
    return digest.hexdigest()


# --- memory sampler -------------------------------------------------------------------


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def read_rss(pid: int) -> dict[str, int] | None:
    """VmRSS / RssAnon / RssFile of *pid* in KiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in RSS_FIELDS:
            values[key] = int(rest.split()[0])
    return values or None


class RssSampler(threading.Thread):
    """Samples VmRSS / RssAnon / RssFile of the mount process every 50 ms."""

    FIELDS = RSS_FIELDS

    def __init__(self, pidfile: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pidfile = pidfile
        self.interval = interval
        self.phase = "idle"
        self.peak = dict.fromkeys(self.FIELDS, 0)  # KiB, over the whole run
        self.phase_peak: dict[str, dict[str, int]] = {}
        self.samples = 0
        self._halt = threading.Event()

    def _read(self) -> dict[str, int] | None:
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return None
        return read_rss(pid)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            values = self._read()
            if values is None:
                continue
            self.samples += 1
            phase = self.phase_peak.setdefault(self.phase, dict.fromkeys(self.FIELDS, 0))
            for key, value in values.items():
                self.peak[key] = max(self.peak[key], value)
                phase[key] = max(phase[key], value)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# --- profiler -------------------------------------------------------------------------


class Profiler:
    """Runs ``py-spy record`` on the mount process for one phase (optional).

    Samples every thread including idle ones, then classifies: a sample is idle
    when its innermost frame is a known wait (trio's epoll wait, a worker thread
    waiting for a job). The report gives, per phase, how busy the trio thread
    and the worker threads were and the top busy frames of each.
    """

    IDLE = (
        "EpollIOManager.get_events (trio/_core/_io_epoll.py",
        "WorkerThread._work (trio/_core/_thread_cache.py",
    )

    def __init__(self, outdir: Path | None, *, native: bool = False) -> None:
        self.outdir = outdir
        self.options = ("--idle", "--native") if native else ("--idle",)
        self.spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.reports: dict[str, dict] = {}
        if outdir is not None:
            outdir.mkdir(parents=True, exist_ok=True)
            if not os.path.exists(self.spy):
                raise SystemExit("--profile needs py-spy (pip install py-spy)")

    def print_reports(self, heading: str = "py-spy, phase '{}':") -> None:
        """Print each phase's report: how busy each thread role was, and its top frames."""
        for name, report in self.reports.items():
            print("\n" + heading.format(name))
            for role, info in report.items():
                print(
                    f"  {role} ({info['threads']}): busy {info['busy_cpus']:.2f} "
                    "thread-equivalents; top busy frames (% of that busy time):"
                )
                for pct, frame in info["top"]:
                    print(f"    {pct:5.1f}%  {frame}")

    @contextmanager
    def record(self, name: str, pid: int):
        if self.outdir is None:
            yield
            return
        out = self.outdir / f"{name}.txt"
        try:
            with spy_record(self.spy, pid, out, *self.options):
                yield
        finally:
            self.reports[name] = self.analyse(out)

    @classmethod
    def analyse(cls, path: Path, count: int = 8) -> dict:
        """Busy share and top busy leaf frames of the trio thread and of the workers."""
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return {}
        threads: dict[str, dict] = {}
        for line in lines:
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = stack.split(";")
            t = threads.setdefault(frames[0], {"total": 0, "busy": {}, "main": False})
            t["total"] += int(n)
            t["main"] |= any(f.startswith("unrolled_run ") for f in frames)
            leaf = frames[-1]
            if not any(pattern in leaf for pattern in cls.IDLE):
                # Name the leaf with its nearest fluidfs caller for context.
                owner = next(
                    (
                        f
                        for f in reversed(frames[1:-1])
                        if "fluidfs/" in f
                        and "fluidfs/cli/" not in f
                        and "fluidfs/__main__" not in f
                    ),
                    "",
                )
                key = leaf if not owner or "fluidfs/" in leaf else f"{leaf} <- {owner}"
                t["busy"][key] = t["busy"].get(key, 0) + int(n)
        if not threads:
            return {}
        span = max(t["total"] for t in threads.values())  # samples per thread ≈ duration
        report = {}
        for role in ("trio thread", "worker threads"):
            group = [t for t in threads.values() if t["main"] == (role == "trio thread")]
            busy: dict[str, int] = {}
            for t in group:
                for k, v in t["busy"].items():
                    busy[k] = busy.get(k, 0) + v
            total_busy = sum(busy.values())
            ranked = sorted(busy.items(), key=lambda kv: -kv[1])[:count]
            report[role] = {
                "threads": len(group),
                "busy_cpus": total_busy / span,  # 1.0 = one thread busy all the time
                "top": [(100.0 * v / total_busy, k) for k, v in ranked] if total_busy else [],
            }
        return report


# --- the fluidfs mount --------------------------------------------------------------------


@contextmanager
def spy_record(spy: str, pid: int, out: Path, *options: str):
    """``py-spy record`` of *pid* (100 Hz, every thread, *options*) into *out* (raw
    format) while the block runs; its errors go to *out* with the suffix ``.err``."""
    cmd = [spy, "record", "--pid", str(pid), "-r", "100", "--threads", *options]
    with open(out.with_suffix(".err"), "wb") as errors:
        proc = subprocess.Popen(
            [*cmd, "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=errors
        )
    time.sleep(0.5)  # let py-spy attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Mount:
    """Mount / unmount fluidfs through its command line.

    *tag* names a second mount in the same scratch dir (``mnt-TAG``, ``state-TAG``,
    ``fluidfs-TAG.key``); *extra* are more ``fluidfs mount`` options (``--peer`` ...).
    """

    def __init__(self, work: Path, tag: str = "", extra: list[str] | None = None) -> None:
        suffix = f"-{tag}" if tag else ""
        self.mnt = work / f"mnt{suffix}"
        self.state = work / f"state{suffix}"
        self.key = work / f"fluidfs{suffix}.key"
        self.extra = list(extra or [])
        self.py = sys.executable
        self.mnt.mkdir()

    def init(self) -> None:
        run([self.py, "-m", "fluidfs", "init", "--keyfile", str(self.key)])

    def mount(self) -> int:
        cmd = [self.py, "-m", "fluidfs", "mount", str(self.mnt)]
        run([*cmd, "--state-dir", str(self.state), "--keyfile", str(self.key), *self.extra])
        return self.pid()

    def pid(self) -> int:
        return int((self.state / "daemon.pid").read_text())

    def unmount(self) -> float:
        return timed([self.py, "-m", "fluidfs", "unmount", str(self.mnt)])

    def sealed(self, expected_blocks: int) -> bool:
        """No dirty block files left and the blocks table holds *expected_blocks*."""
        import lmdb

        if any(os.scandir(self.state / "dirty")):
            return False
        env = lmdb.open(str(self.state / "meta.lmdb"), readonly=True, lock=False, max_dbs=16)
        try:
            db = env.open_db(b"blocks", create=False)
            with env.begin() as txn:
                return txn.stat(db)["entries"] >= expected_blocks
        finally:
            env.close()

    def cleanup(self) -> None:
        """Unmount whatever is left and kill the node if it still runs."""
        if is_mount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
        if is_mount(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        try:
            pid = self.pid()
        except (OSError, ValueError):
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if not pid_alive(pid):
                return
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
