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
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

Task = Callable[..., Awaitable[Any]]  # started with nursery.start (takes task_status)


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


class FuseSession:
    """One kernel session over one operations object."""

    def __init__(self, ops: pyfuse3.Operations, fsname: str, peer_id: str) -> None:
        self.ops = ops
        self.fsname = fsname
        self.peer_id = peer_id  # for the log
        self.is_open = False

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
                for task in background:
                    await nursery.start(task)
                nursery.start_soon(cancel_on_signals, fuse_scope)
                if on_ready is not None:
                    on_ready()
                with fuse_scope:
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
