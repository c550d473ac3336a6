"""The node: the one place that wires the parts together and runs them in one trio.run."""

from __future__ import annotations

import logging
import os
import signal
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import trio

from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.cache import BlockCache
from fluidfs.blocks.codec import BlockCodec
from fluidfs.fs.filedata import FileData
from fluidfs.fs.inode import Inode, now_ns
from fluidfs.fs.operations import FluidOperations
from fluidfs.fs.tree import ROOT_INO, Tree
from fluidfs.keys import KeyRing
from fluidfs.statedir import StateDir
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.shards import ShardStore

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 4 * 1024 * 1024
DEFAULT_CACHE_SIZE = 1 << 30
SYNC_INTERVAL = 30.0


class MountError(Exception):
    """The filesystem could not be mounted."""


@dataclass
class NodeConfig:
    """What a node needs to start."""

    keyring: KeyRing
    state: StateDir
    cache_size: int = DEFAULT_CACHE_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    worker_threads: int = 4


class Node:
    """A fluidfs node: metadata, blockstore and filesystem over one state directory."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        keyring = config.keyring
        config.state.lock(keyring.peer_id)
        self.meta = Database(config.state.meta, META_TABLES)
        self.shards = ShardStore(config.state.shards)
        self.limiter = trio.CapacityLimiter(config.worker_threads)
        self.block_size = self._settled_block_size(config.block_size)
        self.codec = BlockCodec(
            dedup_key=keyring.dedup_key,
            wrap_key=keyring.wrap_key,
            needed=keyring.keyfile.shards_needed,
            total=keyring.keyfile.shards_total,
        )
        self.cache = BlockCache(config.state.cache, config.cache_size, lambda _bid: True)
        self.blocks = BlockStore(
            self.meta, self.shards, self.codec, self.cache, keyring.public_key, self.limiter
        )
        self.tree = Tree(self.meta)
        self.data = FileData(
            self.tree, self.blocks, config.state.dirty, self.block_size, self.limiter
        )
        self.ops = FluidOperations(self.tree, self.data, str(config.state.path))
        self._ensure_root()

    def _settled_block_size(self, wanted: int) -> int:
        """The block size is fixed when the state is created; later runs keep it."""
        with self.meta.write() as txn:
            raw = txn.get(b"block_size", db=self.meta["settings"])
            if raw is not None:
                return struct.unpack(">Q", raw)[0]
            txn.put(b"block_size", struct.pack(">Q", wanted), db=self.meta["settings"])
        return wanted

    def _ensure_root(self) -> None:
        if self.tree.get(ROOT_INO) is None:
            t = now_ns()
            root = Inode(
                ROOT_INO,
                stat.S_IFDIR | 0o755,
                os.getuid(),
                os.getgid(),
                nlink=2,
                atime_ns=t,
                mtime_ns=t,
                ctime_ns=t,
            )
            self.tree.save(root)

    async def start(self) -> None:
        """Recover from a crash: adopt dirty blocks, drop orphaned inodes, load the cache."""
        entries = await trio.to_thread.run_sync(self.cache.scan_io)
        self.cache.load(entries)
        recovered = await self.data.recover()
        if recovered:
            log.info("recovered %d unsealed blocks from the last run", recovered)
        for ino in self.tree.orphans():
            await self.data.remove(ino)
            with self.meta.write() as txn:
                self.tree.delete(txn, ino)

    async def stop(self) -> None:
        """Seal everything and flush to disk."""
        with trio.CancelScope(shield=True):
            await self.data.seal_all()
            await trio.to_thread.run_sync(self.meta.sync)
            await trio.to_thread.run_sync(self.shards.sync)

    def close(self) -> None:
        """Close the databases and release the state lock."""
        self.meta.close()
        self.shards.close()
        self.config.state.unlock()

    async def _sync_timer(self) -> None:
        while True:
            await trio.sleep(SYNC_INTERVAL)
            await trio.to_thread.run_sync(self.meta.sync)
            await trio.to_thread.run_sync(self.shards.sync)

    async def mount(
        self,
        mountpoint: Path,
        *,
        allow_other: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        """Mount at *mountpoint* and serve until unmounted or signalled."""
        await self.start()
        options = set(pyfuse3.default_options)
        options |= {"fsname=fluidfs@" + str(self.config.state.path), "subtype=fluidfs"}
        if allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(self.ops, str(mountpoint), options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount at {mountpoint}: {exc}") from None
        log.info("mounted %s (peer %s)", mountpoint, self.config.keyring.peer_id)
        unmounted = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.data.run)
                nursery.start_soon(self._sync_timer)
                nursery.start_soon(self._on_signals, nursery.cancel_scope)
                if on_ready is not None:
                    on_ready()
                await pyfuse3.main()
                unmounted = True  # the kernel ended the session (fusermount3 -u)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    pyfuse3.close(unmount=not unmounted)
                except Exception:
                    log.exception("closing the FUSE session")
                await self.stop()
            log.info("unmounted %s", mountpoint)

    async def _on_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                scope.cancel()
                return
