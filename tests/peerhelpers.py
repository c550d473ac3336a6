"""Real peer processes on 127.0.0.1 for network tests: `fluidfs serve`, killed by pid."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fluidfs import keys
from fluidfs.blocks import merkle

FLUIDFS = [sys.executable, "-m", "fluidfs"]


@dataclass
class Peer:
    """One `fluidfs serve` process."""

    root: Path
    name: str
    donate: str = "2G"
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    addr: str = ""

    @property
    def state(self) -> Path:
        return self.root / f"{self.name}-state"

    @property
    def keyfile(self) -> Path:
        return self.root / f"{self.name}.key"

    @property
    def public_key(self) -> bytes:
        return keys.KeyRing(keys.read_keyfile(self.keyfile)).public_key

    @property
    def peer_id(self) -> str:
        return keys.encode_peer_id(self.public_key)

    def start(self, port: int = 0, timeout: float = 60) -> Peer:
        """Start (or restart on its old port) and wait until it listens."""
        self.launch(port)
        return self.wait_listening(timeout)

    def launch(self, port: int = 0) -> Peer:
        """Start the process (on its old port when restarted) without waiting for it."""
        if not self.keyfile.exists():
            keys.write_keyfile(self.keyfile, keys.generate())
        if self.addr and not port:
            port = int(self.addr.rsplit(":", 1)[1])
        self._listen_file.unlink(missing_ok=True)
        log = open(self.root / f"{self.name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [*FLUIDFS, "serve", "--keyfile", str(self.keyfile), "--state-dir", str(self.state),
             "--listen", f"127.0.0.1:{port}", "--donate", self.donate, *self.extra],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        return self

    def wait_listening(self, timeout: float = 60) -> Peer:
        """Wait until the launched process listens; record its address."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self._listen_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"peer {self.name} did not start:\n{self.log()}")
            time.sleep(0.05)
        self.addr = self._listen_file.read_text().strip()
        return self

    @property
    def _listen_file(self) -> Path:
        return self.state / "listen"

    def kill(self) -> None:
        """SIGKILL, like a machine that vanished."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def control(self, *args: str) -> dict | str:
        """Run a CLI command against this peer's control socket."""
        result = subprocess.run([*FLUIDFS, *args, "--state-dir", str(self.state)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if "--json" in args else result.stdout

    def hosted_for(self, peer_id: str) -> int:
        """Bytes this peer holds for the peer with *peer_id* (from its control socket)."""
        result = subprocess.run([*FLUIDFS, "peers", "--state-dir", str(self.state), "--json"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        rows = json.loads(result.stdout)["peers"]
        return sum(r["we_use"] for r in rows if r["id"] == peer_id)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / f"{self.name}.log").read_text()[-3000:]
        return ""

    def logged(self, text: str) -> bool:
        """True once *text* appears in the peer's log (its output, or its log file)."""
        for path in (self.root / f"{self.name}.log", self.state / "fluidfs.log"):
            with contextlib.suppress(OSError):
                if text in path.read_text(errors="replace"):
                    return True
        return False


def status(state: Path) -> dict:
    """`fluidfs status --json` of the node with this state dir."""
    result = subprocess.run([*FLUIDFS, "status", "--json", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll until *predicate* returns something truthy; fail with *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_all(peers: list[Peer], timeout: float = 120) -> list[Peer]:
    """Start every peer at once and wait until each listens: their start-ups (mostly
    Python imports) overlap instead of queueing one behind the other."""
    for peer in peers:
        peer.launch()
    for peer in peers:
        peer.wait_listening(timeout)
    return peers


def revive(peers: list[Peer]) -> list[Peer]:
    """*peers* (started with no further options) as first started: one that an earlier
    test killed, or restarted with options of its own (a liar, a short keep period),
    starts again plainly on its own port. For a cluster a module's tests share; the
    start-ups overlap."""
    changed = [p for p in peers if p.extra or p.proc is None or p.proc.poll() is not None]
    for peer in changed:
        peer.kill()
        peer.extra = []
        peer.launch()
    for peer in changed:
        peer.wait_listening()
    return peers


@contextlib.contextmanager
def running_peers(root: Path, count: int, extra: Callable[[int], list[str]] | None = None):
    """*count* started peers named p00, p01, ...; every one is killed on exit. *extra*
    gives the i-th peer's further `fluidfs serve` options (say, faults for a few)."""
    made = [Peer(root, f"p{i:02d}", extra=list(extra(i)) if extra else []) for i in range(count)]
    try:
        start_all(made)
        yield made
    finally:
        for peer in made:
            peer.kill()


def endpoint(peer: Peer) -> tuple[str, int]:
    """(host, port) of a started peer, for ``fluidfs.net.tcp.open_rpc``."""
    host, port = peer.addr.rsplit(":", 1)
    return host, int(port)


def random_shard(size: int) -> dict:
    """A StoreShard item: *size* random bytes under their true shard id."""
    data = os.urandom(size)
    return {"id": merkle.shard_id(data), "data": data}


def peer_rows(state: Path) -> dict[str, dict]:
    """`fluidfs peers --json` of the node with this state dir: its rows by peer id."""
    result = subprocess.run([*FLUIDFS, "peers", "--json", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {row["id"]: row for row in json.loads(result.stdout)["peers"]}


def peer_options(peers: list[Peer], *extra: str) -> list[str]:
    """Mount options for a node listening on 127.0.0.1 with 256 KiB blocks, room to
    donate and every one of *peers* as a peer; *extra* options follow."""
    args = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "24G", *extra]
    for peer in peers:
        args += ["--peer", peer.addr]
    return args


def mount_with_peers(make_mount, peers: list[Peer], *extra: str):
    """Mount a node with *peers* (``peer_options``) and wait for an agreement with each."""
    mnt = make_mount("m", extra=peer_options(peers, *extra))
    mnt.mount()
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == len(peers), 60,
             "agreements with every peer")
    return mnt


@pytest.fixture
def peer_cluster(tmp_path: Path):
    """Factory: ``peer_cluster(count, extra=None)`` starts *count* peers (``running_peers``)
    in this test's temp dir; all are killed at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda count, extra=None: stack.enter_context(running_peers(tmp_path, count, extra))
