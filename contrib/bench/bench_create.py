"""Small files in bulk (issue 15): create rate through the real mount, beside a baseline.

    /tmp/venv/bin/python contrib/bench/bench_create.py --files 5000
    /tmp/venv/bin/python contrib/bench/bench_create.py --files 5000 --repo /work/main --runs 3
    /tmp/venv/bin/python contrib/bench/bench_create.py --profile /tmp/prof --py-spy PATH

The loop is ``bench_scale.py``'s step 1 (a Python loop writing ``--size`` byte files,
``--per-dir`` to a directory) on a mount with no peers, so it measures the create path
alone: no commit runs (``--commit-quiet 3600``) and no shard leaves the machine. Each run
mounts a fresh state directory with this checkout, then (with ``--repo``) with the other
checkout, alternating, and prints files/s for both and their ratio. ``--profile DIR``
records the mount with ``py-spy record --idle --threads`` during the loop of the first run
of this checkout (``--py-spy`` names the binary). ``--floor`` runs the loop on
``nullfs.py`` too, a pyfuse3 filesystem that does nothing: the round trips' floor.
``--handlers`` measures instead the same requests called on ``Node.ops`` in process
(``create_handlers.py``, no kernel): CPU microseconds per file of the handlers alone,
the figure that moves least with the machine's load, for each checkout alternately.
``--together`` (with ``--repo``) mounts both checkouts at once and runs a loop on each
at the same time, so both see the same load at the same moment, which alternating runs
do not: on a shared machine at load 50-150, alternating runs of the same two checkouts
gave ratios from 0.67x to 1.3x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(repo: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, "-m", "fluidfs", *args], capture_output=True,
                            text=True, env=env, cwd=repo, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"fluidfs {' '.join(args)}: {result.stderr.strip()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process *pid* (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_loop(mnt: Path, files: int, size: int, per_dir: int) -> float:
    """Files per second of the loop."""
    payload = os.urandom(size)
    started = time.perf_counter()
    for i in range(files):
        folder = mnt / f"d{i // per_dir:05d}"
        if i % per_dir == 0:
            folder.mkdir()
        with open(folder / f"f{i:07d}", "wb") as f:
            f.write(payload[: size - 8] + i.to_bytes(8, "big"))
    return files / (time.perf_counter() - started)


def one_run(repo: Path, work: Path, args: argparse.Namespace, profile: Path | None) -> float:
    mnt, pid = mount_fresh(repo, work)
    spy = None
    try:
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            spy = subprocess.Popen(
                [args.py_spy, "record", "--idle", "--threads", "--nonblocking", "-f", "raw",
                 "-o", str(profile / "create.txt"), "--pid", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        cpu0, own0 = cpu_seconds(pid), os.times()
        rate = create_loop(mnt, args.files, args.size, args.per_dir)
        own1 = os.times()
        mount_ms = (cpu_seconds(pid) - cpu0) * 1000 / args.files
        loop_ms = (own1.user + own1.system - own0.user - own0.system) * 1000 / args.files
        log(f"CPU per file: mount {mount_ms:.2f} ms, the creating loop {loop_ms:.2f} ms")
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        try:
            cli(repo, "unmount", str(mnt))
        except RuntimeError as exc:
            log(f"unmount: {exc}")
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            os.kill(pid, signal.SIGKILL)
    return rate


def mount_fresh(repo: Path, work: Path) -> tuple[Path, int]:
    """Init and mount a fresh state directory with *repo*'s code: (mountpoint, pid)."""
    mnt, state, key = work / "mnt", work / "state", work / "key"
    shutil.rmtree(work, ignore_errors=True)
    mnt.mkdir(parents=True)
    cli(repo, "init", "--keyfile", str(key))
    cli(repo, "mount", str(mnt), "--keyfile", str(key), "--state-dir", str(state),
        "--commit-quiet", "3600")
    return mnt, int((state / "daemon.pid").read_text())


LOOP = (
    "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
    "import bench_create as b; "
    "print(b.create_loop(Path(sys.argv[2]), *map(int, sys.argv[3:])))"
)


def together_run(root: Path, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Both checkouts mounted at once, a loop on each at the same time (its own
    process): name -> (files/s, the mount's CPU ms per file)."""
    mounts: dict[str, tuple[Path, Path, int]] = {}
    try:
        for name, repo in (("this", REPO), ("base", args.repo)):
            mounts[name] = (repo, *mount_fresh(repo, root / name))
        cpu0 = {name: cpu_seconds(pid) for name, (_, _, pid) in mounts.items()}
        loops = {
            name: subprocess.Popen(
                [sys.executable, "-c", LOOP, str(HERE), str(mnt), str(args.files),
                 str(args.size), str(args.per_dir)],
                stdout=subprocess.PIPE, text=True)
            for name, (_, mnt, _) in mounts.items()
        }
        rates = {name: float(loop.communicate(timeout=3600)[0]) for name, loop in loops.items()}
        return {
            name: (rates[name], (cpu_seconds(pid) - cpu0[name]) * 1000 / args.files)
            for name, (_, _, pid) in mounts.items()
        }
    finally:
        for repo, mnt, _ in mounts.values():
            try:
                cli(repo, "unmount", str(mnt))
            except RuntimeError as exc:
                log(f"unmount: {exc}")


def together_main(args: argparse.Namespace) -> int:
    """``--together``: both checkouts at once, ``--runs`` times."""
    root = Path(tempfile.mkdtemp(prefix="fluidfs-bench-create-", dir=args.workdir))
    seen: dict[str, list[tuple[float, float]]] = {"this": [], "base": []}
    try:
        for run in range(args.runs):
            for name, figures in together_run(root, args).items():
                seen[name].append(figures)
                log(f"run {run + 1} {name}: {figures[0]:.0f} files/s, "
                    f"mount {figures[1]:.2f} ms of CPU per file")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    this, base = seen["this"], seen["base"]
    ratio = sum(r for r, _ in this) / sum(r for r, _ in base)
    cpu = sum(c for _, c in this) / sum(c for _, c in base)
    print(f"create {args.files} x {args.size} B, both checkouts at once: this checkout "
          f"{min(r for r, _ in this):.0f}-{max(r for r, _ in this):.0f} files/s at "
          f"{min(c for _, c in this):.2f}-{max(c for _, c in this):.2f} ms/file; baseline "
          f"{min(r for r, _ in base):.0f}-{max(r for r, _ in base):.0f} files/s at "
          f"{min(c for _, c in base):.2f}-{max(c for _, c in base):.2f} ms/file; "
          f"ratio {ratio:.2f}x files/s, {cpu:.2f}x CPU per file")
    return 0


def floor_run(work: Path, args: argparse.Namespace) -> float:
    """The same loop on nullfs.py: the FUSE round trips alone."""
    mnt = work / "mnt"
    shutil.rmtree(work, ignore_errors=True)
    mnt.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, str(HERE / "nullfs.py"), str(mnt)])
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("nullfs did not mount")
            time.sleep(0.05)
        cpu0 = cpu_seconds(proc.pid)
        rate = create_loop(mnt, args.files, args.size, args.per_dir)
        per_file = (cpu_seconds(proc.pid) - cpu0) * 1000 / args.files
        log(f"CPU per file: null filesystem {per_file:.2f} ms")
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rate


def handlers_run(repo: Path, files: int) -> float:
    """CPU microseconds per file of the create requests' handlers in process."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    result = subprocess.run([sys.executable, str(HERE / "create_handlers.py"), str(files)],
                            capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"create_handlers.py: {result.stderr.strip()[-2000:]}")
    return float(result.stdout.split()[-1])


def handlers_main(args: argparse.Namespace) -> int:
    """``--handlers``: in process, this checkout against ``--repo`` alternately."""
    spent: dict[str, list[float]] = {"this": [], "base": []}
    for run in range(args.runs):
        checkouts = [("this", REPO)] + ([("base", args.repo)] if args.repo else [])
        if run % 2:
            checkouts.reverse()
        for name, repo in checkouts:
            spent[name].append(handlers_run(repo, args.files))
            log(f"run {run + 1} {name}: {spent[name][-1]:.1f} us of CPU per file")
    this = spent["this"]
    print(f"create handlers in process, {args.files} x {args.size} B: this checkout "
          f"{min(this):.1f}-{max(this):.1f} us/file", end="")
    if spent["base"]:
        base = spent["base"]
        print(f"; baseline {min(base):.1f}-{max(base):.1f} us/file; ratio "
              f"{sum(this) / sum(base):.2f}x", end="")
    print()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--per-dir", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=None, help="baseline checkout")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--floor", action="store_true",
                        help="also run the loop on a null pyfuse3 filesystem (nullfs.py)")
    parser.add_argument("--handlers", action="store_true",
                        help="the handlers in process instead of the mount (create_handlers.py)")
    parser.add_argument("--together", action="store_true",
                        help="mount both checkouts at once and create on both at the same time")
    args = parser.parse_args()
    if args.handlers:
        return handlers_main(args)
    if args.together:
        if args.repo is None:
            parser.error("--together needs --repo")
        return together_main(args)
    root = Path(tempfile.mkdtemp(prefix="fluidfs-bench-create-", dir=args.workdir))
    rates: dict[str, list[float]] = {"this": [], "base": [], "floor": []}
    try:
        for run in range(args.runs):
            checkouts = [("this", REPO)] + ([("base", args.repo)] if args.repo else [])
            if run % 2:
                checkouts.reverse()
            for name, repo in checkouts:
                profile = args.profile if (name == "this" and run == 0) else None
                rate = one_run(repo, root / name, args, profile)
                rates[name].append(rate)
                log(f"run {run + 1} {name}: {rate:.0f} files/s")
            if args.floor:
                rates["floor"].append(floor_run(root / "floor", args))
                log(f"run {run + 1} null filesystem: {rates['floor'][-1]:.0f} files/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    this = rates["this"]
    print(f"create {args.files} x {args.size} B: this checkout {min(this):.0f}-{max(this):.0f}"
          " files/s", end="")
    if rates["base"]:
        base = rates["base"]
        ratio = sum(this) / sum(base)
        print(f"; baseline {min(base):.0f}-{max(base):.0f} files/s; ratio {ratio:.2f}x", end="")
    if rates["floor"]:
        floor = rates["floor"]
        print(f"; null filesystem {min(floor):.0f}-{max(floor):.0f} files/s", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
