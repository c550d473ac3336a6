"""Real fluidfs processes inside the network lab (tests/netlab.py).

``LabPeer`` is a ``fluidfs serve`` started in a lab host; ``LabMount`` a ``fluidfs
mount`` whose node runs in a lab host's network namespace (its FUSE mount is visible to
the test: ``nsenter --net`` keeps the mount namespace). Both are driven and inspected
through their control sockets (Unix sockets in the state directory, reachable from any
network namespace). The lab kills whatever still runs in its namespaces at teardown;
``LabMount.cleanup`` (the ``make_mount`` fixture's teardown) unmounts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Mount, is_mounted
from netlab import Host

from fluidfs import keys

FLUIDFS = [sys.executable, "-m", "fluidfs"]
PORT = 7470


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The fluidfs command line, from the test's own namespace (control sockets only)."""
    return subprocess.run([*FLUIDFS, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def start_all(peers: list[LabPeer], timeout: float = 120) -> list[LabPeer]:
    """Start every peer at once and wait until each listens: their start-ups overlap
    instead of queueing one behind the other (as peerhelpers.start_all)."""
    for peer in peers:
        peer.launch()
    for peer in peers:
        peer.wait_listening(timeout)
    return peers


def peers_json(state: Path) -> list[dict]:
    """`fluidfs peers --json` rows of the node with this state dir."""
    result = cli("peers", "--state-dir", str(state), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["peers"]


@dataclass
class LabPeer:
    """One `fluidfs serve` in a lab host, listening on every address at PORT."""

    host: Host
    root: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def state(self) -> Path:
        return self.root / f"{self.name}-state"

    @property
    def keyfile(self) -> Path:
        return self.root / f"{self.name}.key"

    @property
    def peer_id(self) -> str:
        return keys.KeyRing(keys.read_keyfile(self.keyfile)).peer_id

    @property
    def addr(self) -> str:
        """Where others dial it now: its host's address (a public host's)."""
        return f"{self.host.ip}:{PORT}"

    def start(self, timeout: float = 30) -> LabPeer:
        """Start and wait until it listens."""
        return self.launch().wait_listening(timeout)

    def launch(self) -> LabPeer:
        """Start the process without waiting for it."""
        if not self.keyfile.exists():
            keys.write_keyfile(self.keyfile, keys.generate())
        (self.state / "listen").unlink(missing_ok=True)
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = self.host.popen(
            [*FLUIDFS, "serve", "--keyfile", str(self.keyfile), "--state-dir", str(self.state),
             "--listen", f"0.0.0.0:{PORT}", "--donate", "1G", *self.extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return self

    def wait_listening(self, timeout: float = 30) -> LabPeer:
        """Wait until the launched process listens."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not (self.state / "listen").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"peer {self.name} did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def hosted_for(self, peer_id: str) -> int:
        """Bytes it holds for *peer_id*."""
        return sum(r["we_use"] for r in peers_json(self.state) if r["id"] == peer_id)

    def log(self) -> str:
        try:
            return (self.root / f"{self.name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""


@dataclass
class LabMount(Mount):
    """A real mount whose node runs in the network namespace of *host*."""

    host: Host | None = None

    def mount(self, *more: str) -> subprocess.CompletedProcess:
        """`fluidfs mount` inside the host; assert it worked."""
        assert self.host is not None
        result = subprocess.run(
            self.host.argv(*FLUIDFS, "mount", str(self.path), "--state-dir", str(self.state),
                           "--keyfile", str(self.keyfile), *self.extra, *more),
            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr + self.log()
        assert is_mounted(self.path)
        pid = self.pid()
        if pid:
            self.pids.append(pid)
        return result
