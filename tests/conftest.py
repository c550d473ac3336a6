"""Shared fixtures: keyfiles, and real FUSE mounts run as `fluidfs` subprocesses."""

from __future__ import annotations

import compileall
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from peerhelpers import peer_cluster  # noqa: F401 - a fixture for every test module

import fluidfs
from fluidfs import keys

FLUIDFS = [sys.executable, "-m", "fluidfs"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile fluidfs to bytecode once, before any test starts a `fluidfs` process.

    The slow layer starts hundreds of node and CLI processes. Where PYTHONDONTWRITEBYTECODE
    is set (as in some CI sandboxes) none of them writes the bytecode it compiles, so each
    one compiled the whole node stack again: about 0.2 s of CPU per process start.
    Python reads bytecode whatever that variable says, so writing it here once is enough.
    """
    compileall.compile_dir(Path(fluidfs.__file__).parent, quiet=2)


def run_cli(
    *args: str, check: bool = False, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    """Run the fluidfs command line; return the completed process (text output)."""
    return subprocess.run(
        [*FLUIDFS, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def require_fuse() -> None:
    """Fail (never skip) with a clear message when FUSE cannot work here."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing: mount tests need FUSE (install fuse3, modprobe fuse)")
    if subprocess.run(["which", "fusermount3"], capture_output=True).returncode != 0:
        pytest.fail("fusermount3 is missing: install the fuse3 package")


def is_mounted(path: Path) -> bool:
    """True if *path* is a mount point in this namespace."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(path: Path) -> None:
    """Unmount, lazily if busy; never raise."""
    if not is_mounted(path):
        return
    if subprocess.run(["fusermount3", "-u", str(path)], capture_output=True).returncode:
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


@dataclass
class Mount:
    """A fluidfs mount driven through the real CLI."""

    path: Path
    state: Path
    keyfile: Path
    extra: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def mount(self, *more: str) -> subprocess.CompletedProcess:
        """Run `fluidfs mount`; assert it succeeded and the mount is usable."""
        result = run_cli(
            "mount",
            str(self.path),
            "--state-dir",
            str(self.state),
            "--keyfile",
            str(self.keyfile),
            *self.extra,
            *more,
        )
        assert result.returncode == 0, result.stderr + self.log()
        assert is_mounted(self.path)
        pid = self.pid()
        if pid:
            self.pids.append(pid)
        return result

    def pid(self) -> int | None:
        """Pid of the running node."""
        try:
            return int((self.state / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def unmount(self) -> None:
        """`fluidfs unmount`, asserting it worked."""
        result = run_cli("unmount", str(self.path))
        assert result.returncode == 0, result.stderr + self.log()
        assert not is_mounted(self.path)

    def kill9(self) -> None:
        """SIGKILL the node (a crash), then clear the dead mount."""
        pid = self.pid()
        assert pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        force_unmount(self.path)

    def log(self) -> str:
        """The node's log, for assertion messages."""
        try:
            return "\n--- node log ---\n" + (self.state / "fluidfs.log").read_text()[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Teardown: unmount and kill whatever is left."""
        force_unmount(self.path)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    """A fresh keyfile (K=8, N=12)."""
    path = tmp_path / "fluidfs.key"
    keys.write_keyfile(path, keys.generate())
    return path


@pytest.fixture
def make_mount(tmp_path: Path, keyfile: Path) -> Iterator:
    """Factory for real mounts; everything is unmounted and killed at teardown."""
    require_fuse()
    made: list[Mount] = []

    def factory(
        name: str = "m", *, key: Path | None = None, extra: list[str] | None = None
    ) -> Mount:
        mnt = Mount(
            tmp_path / f"{name}-mnt", tmp_path / f"{name}-state", key or keyfile, list(extra or [])
        )
        mnt.path.mkdir(exist_ok=True)
        made.append(mnt)
        return mnt

    yield factory
    for mnt in made:
        mnt.cleanup()


@pytest.fixture
def mounted(make_mount) -> Mount:
    """One mounted filesystem with a small block size so tests cross block edges cheaply."""
    mnt = make_mount(extra=["--block-size", "256K"])
    mnt.mount()
    return mnt
