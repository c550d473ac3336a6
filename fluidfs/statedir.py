"""The state directory: where one node keeps everything local, and its lock.

Layout (version 1)::

    <state>/format        "fluidfs-state-1"
    <state>/identity      the peer id this state belongs to
    <state>/lock          flock()ed by the running node
    <state>/daemon.pid    pid of the running node
    <state>/meta.lmdb/    metadata (see fs/tree.py, blocks/record.py)
    <state>/shards.lmdb/  hosted shards (see store/shards.py)
    <state>/cache/        plaintext block cache (see blocks/cache.py)
    <state>/dirty/        blocks written but not yet sealed (see fs/filedata.py)
    <state>/conflicts/    writes of a replaced mount on their way into the live tree's
                          .fluidfs-conflicts/ (remount/conflicts.py; gone once there)
    <state>/records/      peers' root and lease records we keep for them (store/records.py)
    <state>/fluidfs.log   the node's log when it runs in the background (rotated:
                          fluidfs.log.1 … .3, see logsetup.py)
    <state>/control.sock  the node's control socket (control.py)
    <state>/new-key       the peer id of a keyfile made for this state directory (by the
                          mount that created the keyfile, or `fluidfs init`): its first
                          mount starts a new backup without asking peers (remount.py)

The directory is private: it holds plaintext (the cache, unsealed blocks) and the
tree's metadata. Every start forces its mode to 0700, with a warning when it was
looser.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "fluidfs-state-1"
FSNAME_PREFIX = "fluidfs@"
PRIVATE = 0o700


def fsname_for(state: Path) -> str:
    """The mount's source name: names the state directory, escaped to plain ASCII.

    FUSE options must be ASCII without commas, so the path is percent-encoded;
    `fluidfs unmount` reads it back from /proc/self/mountinfo.
    """
    return FSNAME_PREFIX + urllib.parse.quote(os.fsencode(state), safe="/-_.~+")


def state_dir_from_fsname(source: str) -> Path:
    """Inverse of fsname_for."""
    return Path(os.fsdecode(urllib.parse.unquote_to_bytes(source[len(FSNAME_PREFIX) :])))


class StateError(Exception):
    """The state directory cannot be used (locked, foreign, or unreadable)."""


def default_config_dir() -> Path:
    """$XDG_CONFIG_HOME/fluidfs, i.e. ~/.config/fluidfs by default."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fluidfs"


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/fluidfs, i.e. ~/.local/share/fluidfs by default."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fluidfs"


def default_keyfile() -> Path:
    """Where the keyfile lives unless --keyfile says otherwise."""
    return default_config_dir() / "fluidfs.key"


class StateDir:
    """A node's state directory, locked for as long as this object holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path.absolute()
        self._lock_fd: int | None = None

    @property
    def meta(self) -> Path:
        """LMDB environment for metadata."""
        return self.path / "meta.lmdb"

    @property
    def shards(self) -> Path:
        """LMDB environment for hosted shards."""
        return self.path / "shards.lmdb"

    @property
    def cache(self) -> Path:
        """Plaintext cache directory."""
        return self.path / "cache"

    @property
    def dirty(self) -> Path:
        """Unsealed block files."""
        return self.path / "dirty"

    @property
    def log(self) -> Path:
        """Log file of a backgrounded node."""
        return self.path / "fluidfs.log"

    @property
    def control(self) -> Path:
        """The node's local control socket."""
        return self.path / "control.sock"

    @property
    def new_key(self) -> Path:
        """Marker: the peer id of a keyfile created for this state directory."""
        return self.path / "new-key"

    def foreign(self) -> bool:
        """True if the directory holds something else's state (a format we do not know)."""
        try:
            return (self.path / "format").read_text().strip() != FORMAT
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError):
            return True

    def make_private(self) -> int | None:
        """Force the directory's mode to 0700; return the old mode if it was looser."""
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        if mode == PRIVATE:
            return None
        os.chmod(self.path, PRIVATE)
        return mode if mode & 0o077 else None

    def mark_new_key(self, peer_id: str) -> None:
        """Record that the keyfile of *peer_id* was just made for this state directory."""
        self.path.mkdir(parents=True, exist_ok=True, mode=PRIVATE)
        self.publish("new-key", peer_id + "\n")

    def identity(self) -> str | None:
        """The peer id this state belongs to (recorded by its first lock), if any."""
        try:
            return (self.path / "identity").read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def made_for(self, peer_id: str) -> bool:
        """True if the keyfile of *peer_id* was created for this state directory."""
        try:
            return self.new_key.read_text(encoding="ascii").strip() == peer_id
        except (OSError, UnicodeDecodeError):
            return False

    def lock(self, peer_id: str) -> None:
        """Take the lock and check (or record) which identity this state belongs to."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=PRIVATE)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.path}: {exc}") from None
        if self.foreign():
            raise StateError(f"{self.path} holds state of an unknown format")
        try:
            loose = self.make_private()
        except OSError as exc:
            raise StateError(f"cannot make state directory {self.path} private: {exc}") from None
        if loose is not None:
            log.warning(
                "state directory %s was mode %04o (other users could read it): now 0700",
                self.path,
                loose,
            )
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.running_pid()
            who = f" (pid {pid})" if pid else ""
            raise StateError(
                f"state directory {self.path} is in use by another fluidfs{who}"
            ) from None
        self._lock_fd = fd
        fmt = self.path / "format"
        ident = self.path / "identity"
        if fmt.exists():
            if fmt.read_text().strip() != FORMAT:
                self.unlock()
                raise StateError(f"{self.path} holds state of an unknown format")
            recorded = ident.read_text().strip() if ident.exists() else peer_id
            if recorded != peer_id:
                self.unlock()
                raise StateError(
                    f"state directory {self.path} belongs to peer {recorded[:16]}…, "
                    f"not to this keyfile's peer {peer_id[:16]}… (wrong keyfile?)"
                )
        else:
            ident.write_text(peer_id + "\n")
            fmt.write_text(FORMAT + "\n")
        (self.path / "daemon.pid").write_text(f"{os.getpid()}\n")

    def publish(self, name: str, text: str) -> None:
        """Write a small file atomically (readers never see it half written)."""
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

    def is_locked(self) -> bool:
        """True if some process holds the lock now."""
        try:
            fd = os.open(self.path / "lock", os.O_RDWR)
        except OSError:  # no lock file (or no usable directory): nobody holds it
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def running_pid(self) -> int | None:
        """Pid recorded by the node that holds (or held) the lock."""
        try:
            return int((self.path / "daemon.pid").read_text())
        except (OSError, ValueError):
            return None

    def unlock(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
