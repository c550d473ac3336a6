"""The FUSE session: open it once the node may mount, serve it, close it, unmount on signals.

The order of a mount (``FuseSession.run``): the node's services first (peers answer),
then ``prepare`` (the lease gate: the writer lease and, on a fresh state, the restored
tree are settled before the mount is usable), then the kernel session, then the
background tasks that need a mounted tree; on unmount (``fusermount3 -u``, SIGINT or
SIGTERM) the session closes and ``stop`` seals and commits what is left. A mount that
``prepare`` refuses or the kernel rejects raises MountError after ``abandon`` (giving
the lease back) and ``stop``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from fluidfs.node.fuseloop import FastTrio, fast_session_loop

log = logging.getLogger(__name__)

Task = Callable[..., Awaitable[Any]]  # started with nursery.start (takes task_status)

# The kernel's read-ahead for the mount, in KiB (issue 16). A FUSE mount's backing device
# starts at 128 KiB, which cuts a sequential read into 256 KiB requests, each a round trip
# through pyfuse3 and the read handler; from 512 KiB on the kernel asks in requests of
# max_pages (1 MiB here), a quarter of the requests for the same bytes. A whole default
# block lets it ask for the next MiB of a block while one is being answered. The FUSE
# protocol can only lower it (FUSE_INIT's max_readahead), so it is raised through sysfs
# once the session is initialised: root only; elsewhere it stays as the kernel set it.
READ_AHEAD_KIB = 4096
SYSFS_BDI = Path("/sys/class/bdi")
MOUNTINFO = Path("/proc/self/mountinfo")


class MountError(Exception):
    """The filesystem could not be mounted."""


def fuse_options(fsname: str, *, allow_other: bool) -> set[str]:
    """Mount options: pyfuse3's defaults, our fsname and subtype, maybe allow_other."""
    options = set(pyfuse3.default_options)
    options |= {"fsname=" + fsname, "subtype=fluidfs"}
    if allow_other:
        options.add("allow_other")
    return options


async def cancel_on_signals(scope: trio.CancelScope) -> None:
    """Cancel *scope* at the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            scope.cancel()
            return


def _unescape_mountinfo(field: str) -> str:
    """A mountinfo path field as the path it names (spaces, tabs, newlines and
    backslashes are written as octal escapes)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def fuse_device(mountpoint: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """``major:minor`` of the fluidfs FUSE mount on top at *mountpoint* (None if there is
    none: a session that did not mount, or someone else's filesystem on top of ours)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            try:
                fstype = fields[fields.index("-") + 1]
            except (ValueError, IndexError):
                continue
            if _unescape_mountinfo(fields[4]) == target:
                found = fields[2] if fstype == "fuse.fluidfs" else None  # the last is on top
    return found


def raise_read_ahead(
    mountpoint: Path,
    kib: int = READ_AHEAD_KIB,
    *,
    bdi: Path = SYSFS_BDI,
    mountinfo: Path = MOUNTINFO,
) -> int | None:
    """Raise the kernel's read-ahead of the FUSE mount at *mountpoint* to *kib* (see
    READ_AHEAD_KIB); return the read-ahead now in force, or None if it could not be read
    or set (not root, no sysfs, not mounted). Blocking: the ``stat`` of the mountpoint
    returns only once the kernel has the session's FUSE_INIT answer (an earlier write
    would be lowered again by it), so call it from a worker thread while the session
    serves."""
    try:
        os.stat(mountpoint)
        device = fuse_device(mountpoint, mountinfo)
        if device is None:
            return None
        path = bdi / device / "read_ahead_kb"
        current = int(path.read_text())
        if current >= kib:
            return current
        path.write_text(f"{kib}\n")
        return int(path.read_text())
    except (OSError, ValueError) as exc:
        log.debug("read-ahead of %s left as it was: %s", mountpoint, exc)
        return None


async def tune_read_ahead(mountpoint: Path) -> None:
    """``raise_read_ahead`` in a worker thread (abandoned if the session ends first)."""
    kib = await trio.to_thread.run_sync(raise_read_ahead, mountpoint, abandon_on_cancel=True)
    if kib is not None:
        log.info("kernel read-ahead of the mount: %d KiB", kib)


class FuseSession:
    """One kernel session over one operations object."""

    def __init__(self, ops: pyfuse3.Operations, fsname: str, peer_id: str) -> None:
        self.ops = ops
        self.fsname = fsname
        self.peer_id = peer_id  # for the log
        self.is_open = False
        self.loop = FastTrio()  # pyfuse3's trio while serving (node/fuseloop.py), its counts

    def open(self, mountpoint: Path, options: set[str]) -> None:
        """Open the kernel session (MountError if the kernel refuses)."""
        try:
            pyfuse3.init(self.ops, str(mountpoint), options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount at {mountpoint}: {exc}") from None
        self.is_open = True

    def close(self, *, unmount: bool) -> None:
        """Close the session (and unmount, unless the kernel already did)."""
        if self.is_open:
            self.is_open = False
            try:
                pyfuse3.close(unmount=unmount)
            except Exception:
                log.exception("closing the FUSE session")

    async def run(
        self,
        mountpoint: Path,
        *,
        allow_other: bool,
        services: Task,
        prepare: Callable[[], Awaitable[None]],
        abandon: Callable[[], Awaitable[None]],
        background: Sequence[Task],
        stop: Callable[[], Awaitable[None]],
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Mount at *mountpoint* and serve until unmounted or signalled (see the docstring)."""
        options = fuse_options(self.fsname, allow_other=allow_other)
        fuse_scope = trio.CancelScope()
        refused: MountError | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(services)
                try:
                    await prepare()
                    self.open(mountpoint, options)
                except MountError as exc:
                    refused = exc
                    await abandon()
                    nursery.cancel_scope.cancel()
                    return  # raised below, outside the nursery (no exception group)
                log.info("mounted %s (peer %s)", mountpoint, self.peer_id)
                nursery.start_soon(tune_read_ahead, mountpoint)
                for task in background:
                    await nursery.start(task)
                nursery.start_soon(cancel_on_signals, fuse_scope)
                if on_ready is not None:
                    on_ready()
                with fuse_scope, fast_session_loop(self.loop):
                    await pyfuse3.main()
                # The kernel ended the session (fusermount3 -u) or a signal came.
                self.close(unmount=fuse_scope.cancel_called)
                await stop()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self.close(unmount=True)
                await stop()
            if refused is not None:
                raise refused
            log.info("unmounted %s", mountpoint)
