"""In-process parts for the fast tests: real LMDB, real trio, real sockets on 127.0.0.1.

Nothing here is a mock. ``PeerNode`` is the peer side of a node (its peer list, ledger,
shard store, record store, ``PeerService`` and ``Connections``) serving on a loopback
port from the test's own trio run; ``LocalStore`` is the storage side (block store,
tree, file data) with no network, and ``Metadata`` adds commits and restore on top.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from trio._core import _run as trio_run

from fluidfs import keys
from fluidfs.blocks.blockstore import BlockStore
from fluidfs.blocks.cache import BlockCache
from fluidfs.blocks.codec import BlockCodec
from fluidfs.diskspace import DiskReserve
from fluidfs.fs.commit import Committer
from fluidfs.fs.filedata import FileData
from fluidfs.fs.inode import Inode, now_ns
from fluidfs.fs.metaindex import Holders, MetaIndex
from fluidfs.fs.restore import Restorer
from fluidfs.fs.snapshots import Retention, SnapshotStore
from fluidfs.fs.tree import ROOT_INO, Tree
from fluidfs.net.limits import DEFAULT_LIMITS, NetLimits
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.connections import Connections
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.host import PeerService
from fluidfs.store.accounts import AccountBook
from fluidfs.store.db import META_TABLES, Database
from fluidfs.store.records import RecordStore
from fluidfs.store.shards import ShardStore

MIB = 1024 * 1024


def silent_on(*ops: str) -> type[PeerService]:
    """A real peer service that takes requests for *ops* and never answers them."""

    class Silent(PeerService):
        async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
            if op in ops:
                await trio.sleep_forever()
            return await super().handle(peer_key, op, args)

    return Silent


def _running_trio_job(thread: threading.Thread) -> bool:
    """True if *thread* is one of trio's worker threads and runs a job now: trio names it
    after the job (``trio.to_thread.run_sync``'s thread_name) while it runs, and gives it
    back its default name before it hands the result over. A thread of a ThreadHop
    (blocks/hop.py) counts while its pool has a job not finished."""
    owner = getattr(getattr(thread, "_target", None), "__self__", None)
    if type(owner).__name__ == "ThreadHop":
        return owner.busy > 0
    default = getattr(owner, "_default_name", None)
    return type(owner).__name__ == "WorkerThread" and default is not None \
        and thread.name != default


def busy_threads() -> list[int]:
    """Ids of this process's threads, other than the calling one, that work: running or
    waiting for a CPU (state R), for the disk (state D), or running a trio.to_thread job
    (which may be waiting for the GIL, asleep as far as the kernel tells). Idle threads
    (trio's cached workers between jobs, one waiting for a lock) are left out."""
    me = threading.get_native_id()
    busy = {t.native_id for t in threading.enumerate()
            if t.native_id != me and t.native_id is not None and _running_trio_job(t)}
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me or int(tid) in busy:
            continue
        try:  # (a thread that just ended has no file left)
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("R", "D"):
            busy.add(int(tid))
    return sorted(busy)


def run_delay() -> float:
    """Seconds this process's live threads have sat runnable waiting for a CPU so far (the
    kernel's run delay, /proc/self/task/*/schedstat): a wall-time bound on in-process work
    is taken less what this grew by, so a loaded machine does not decide it. (A thread
    that ended took its count with it: the bound errs on the strict side.)"""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:  # (a thread that just ended has no file left)
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


class ThreadWait:
    """What makes a MockClock's autojump wait for this process's worker threads
    (``thread_aware_clock``): how many jumps it put off, and since when."""

    def __init__(self, clock: trio.testing.MockClock, patience: float) -> None:
        self.jump = clock._autojump  # the clock's own autojump
        self.patience = patience
        self.since: float | None = None  # real time of the first jump put off in a row
        self.held = 0  # jumps put off for busy threads

    def autojump(self) -> None:
        if self._busy():
            now = time.monotonic()
            if self.since is None:
                self.since = now
            if now - self.since < self.patience:
                self.held += 1
                return
        self.since = None
        self.jump()

    def _busy(self) -> bool:
        if busy_threads():
            return True
        # A worker that just finished gives its name back, then needs the GIL (which we
        # hold) to hand its result to the loop: let it, and look at the loop's queue of
        # results from threads (trio's, not public: read defensively).
        time.sleep(0.001)
        runner = getattr(trio_run.GLOBAL_RUN_CONTEXT, "runner", None)
        entries = getattr(runner, "entry_queue", None)
        pending = bool(getattr(entries, "queue", None) or getattr(entries, "idempotent_queue",
                                                                   None))
        return pending or bool(busy_threads())


def thread_aware_clock(threshold: float, patience: float = 30.0) -> trio.testing.MockClock:
    """A MockClock whose autojump waits for this process's worker threads: it jumps only
    once the run has been idle *threshold* real seconds and no other thread is busy.

    A plain autojump clock jumps after that much idleness whatever the threads do, so on
    a loaded machine, where a worker thread can wait longer than that for a CPU, virtual
    time ran past a call's timeout while its answer was still being worked out (a store,
    a record). A thread busy longer than *patience* real seconds no longer holds the
    clock (one that never sleeps would otherwise stop virtual time for good). The clock's
    ``ThreadWait`` is its ``thread_wait`` attribute."""
    clock = trio.testing.MockClock(autojump_threshold=threshold)
    wait = ThreadWait(clock, patience)
    # trio's run loop calls the clock's _autojump once it has been idle for the threshold
    # (MockClock is final: it cannot be subclassed). tests/fast/test_inproc_clock.py
    # fails if a trio release stops calling it.
    clock._autojump = wait.autojump
    clock.thread_wait = wait
    return clock


def slow_jump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the run has been idle 0.2 s of real time with no worker
    thread busy (``thread_aware_clock``): worker threads (sealing, LMDB) and loopback sockets
    finish first, however loaded the machine, so only what waits on purpose (a call
    nobody answers) sees time jump."""
    return thread_aware_clock(threshold=0.2)


class PeerNode:
    """A node's peer side, in this process (``start`` it in a nursery)."""

    def __init__(
        self,
        root: Path,
        keyring: keys.KeyRing | None = None,
        *,
        limits: NetLimits = DEFAULT_LIMITS,
        service: type[PeerService] = PeerService,
        provider: bool = False,
        **service_kw,
    ) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.ended: list[bytes] = []  # peers whose agreement with us ended
        self.keyring = keyring or keys.KeyRing(keys.generate())
        self.db = Database(root / "meta", META_TABLES)
        self.shards = ShardStore(root / "shards")
        self.ledger = Ledger(self.db)
        self.peers = PeerList(self.db, self.key)
        self.records = RecordStore(root / "records")
        self.service = service(
            self.shards,
            self.ledger,
            self.peers,
            donate=1 << 30,
            ratio=1.5,
            limiter=trio.CapacityLimiter(2),
            records=self.records,
            on_end=self.ended.append,
            accounts=AccountBook(self.db) if provider else None,
            **service_kw,
        )
        self.conns = Connections(
            self.keyring.signing_key,
            self.service,
            self.peers,
            limits=limits,
            is_partner=self.service.is_partner,
            store_at=self.ledger.store_at_of,
        )
        self.addr = ""

    @property
    def key(self) -> bytes:
        return self.keyring.public_key

    async def start(self, nursery: trio.Nursery, *, listen: bool = True) -> PeerNode:
        """Run its connections (and, with *listen*, accept peers on a loopback port)."""
        await nursery.start(self.conns.run)
        if listen:
            port = await nursery.start(self.conns.serve, "127.0.0.1", 0)
            self.addr = f"127.0.0.1:{port}"
        return self

    def host_for(self, owner: PeerNode, size: int = 64 * MIB) -> None:
        """Agree to host *owner*'s shards and records (the owner's side: ``use``)."""
        self.ledger.record(owner.key, we_host=size, they_host=size, term=3600)

    def use(self, host: PeerNode, size: int = 64 * MIB) -> None:
        """Know *host* by address and hold an agreement with it (both sides)."""
        host.host_for(self, size)
        self.ledger.record(host.key, we_host=size, they_host=size, term=3600)
        self.peers.add(host.key, host.addr)

    def close(self) -> None:
        self.db.close()
        self.shards.close()


@asynccontextmanager
async def peer_nodes(
    root: Path, count: int, **kw
) -> AsyncIterator[tuple[trio.Nursery, list[PeerNode]]]:
    """*count* listening ``PeerNode``s; all cancelled and closed on exit."""
    made = [PeerNode(root / f"n{i}", **kw) for i in range(count)]
    try:
        async with trio.open_nursery() as nursery:
            for node in made:
                await node.start(nursery)
            yield nursery, made
            nursery.cancel_scope.cancel()
    finally:
        for node in made:
            node.close()


class LocalStore:
    """Block store, tree and file data over one state directory, with no network."""

    def __init__(self, root: Path, keyring: keys.KeyRing, block_size: int = 64 * 1024) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.keyring = keyring
        self.db = Database(root / "meta", META_TABLES)
        self.shards = ShardStore(root / "shards")
        self.limiter = trio.CapacityLimiter(4)
        self.codec = BlockCodec(
            dedup_key=keyring.dedup_key,
            wrap_key=keyring.wrap_key,
            needed=keyring.keyfile.shards_needed,
            total=keyring.keyfile.shards_total,
        )
        self.cache = BlockCache(root / "cache", 1 << 30, lambda _bid: True)
        self.blocks = BlockStore(
            self.db, self.shards, self.codec, self.cache, keyring.public_key, self.limiter
        )
        self.tree = Tree(self.db)
        self.data = FileData(self.tree, self.blocks, root / "dirty", block_size, self.limiter)
        if self.tree.get(ROOT_INO) is None:
            t = now_ns()
            self.tree.save(
                Inode(ROOT_INO, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), nlink=2,
                      atime_ns=t, mtime_ns=t, ctime_ns=t)
            )

    async def recover(self) -> int:
        """The storage side of a node's start after a crash (node.py ``start``): load the
        cache, settle the shard journal, adopt dirty blocks; return how many were adopted."""
        self.cache.load(await trio.to_thread.run_sync(self.cache.scan_io))
        self.blocks.recover_journal()
        return await self.data.recover()

    # --- a few filesystem operations, the way fs/operations.py does them ----------------

    def new_inode(self, parent: int, name: str, mode: int) -> Inode:
        """Create and link an inode (a directory bumps its parent's link count)."""
        t = now_ns()
        with self.db.write() as txn:
            ino = self.tree.new_ino(txn)
            is_dir = stat.S_ISDIR(mode)
            inode = Inode(ino, mode, os.getuid(), os.getgid(), nlink=2 if is_dir else 1,
                          atime_ns=t, mtime_ns=t, ctime_ns=t)
            self.tree.put(txn, inode)
            self.tree.link(txn, parent, name.encode(), ino)
            if is_dir:
                up = self.tree.get(parent)
                up.nlink += 1
                self.tree.put(txn, up)
        return inode

    def mkdir(self, parent: int, name: str) -> int:
        return self.new_inode(parent, name, stat.S_IFDIR | 0o755).ino

    async def write(self, ino: int, offset: int, data: bytes) -> None:
        """Write through FileData and grow the size, as the FUSE write handler does."""
        inode = self.tree.get(ino)
        await self.data.write(inode, offset, data)
        if offset + len(data) > inode.size:
            inode.size = offset + len(data)
            self.tree.save(inode)

    async def create(self, parent: int, name: str, data: bytes = b"") -> int:
        """A regular file holding *data*, sealed."""
        ino = self.new_inode(parent, name, stat.S_IFREG | 0o644).ino
        if data:
            await self.write(ino, 0, data)
            await self.data.seal_inode(ino)
        return ino

    def hard_link(self, ino: int, parent: int, name: str) -> None:
        with self.db.write() as txn:
            inode = self.tree.get(ino)
            inode.nlink += 1
            self.tree.put(txn, inode)
            self.tree.link(txn, parent, name.encode(), ino)

    async def read(self, ino: int) -> bytes:
        inode = self.tree.get(ino)
        return await self.data.read(inode, 0, inode.size)

    def refcount(self, block_id: bytes) -> int:
        """References held on a block (0 once its record is gone)."""
        stored = self.blocks.load(block_id)
        return 0 if stored is None else stored.refcount

    def close(self) -> None:
        self.db.close()
        self.shards.close()


class Metadata:
    """Commits and restore over a ``LocalStore`` (what remount wires, without the node)."""

    CHUNK_KEY = b"k" * 32  # any fixed key: it only decides where directory lists are cut

    def __init__(self, store: LocalStore, machine: bytes = b"m" * 16) -> None:
        self.store = store
        self.peers = PeerList(store.db, store.keyring.public_key)
        self.holders = Holders(store.keyring.public_key, self.peers.key_of, self._index_of)
        self.index = MetaIndex(store.db, store.blocks, self.holders)
        self.committer = Committer(
            store.db, store.tree, store.data, store.blocks, self.index, self.holders,
            self.CHUNK_KEY, machine,
        )
        self.snapshots = SnapshotStore(store.db, store.blocks, self.holders)
        self.restorer = Restorer(store.db, store.tree, store.blocks, self.index)

    def _index_of(self, key: bytes) -> int:
        peer = self.peers.get(key)
        return peer.index if peer is not None else self.peers.add(key).index

    async def commit(self, *, user_changed: bool = True):
        """One commit of the live tree (None when nothing changed)."""
        await self.store.data.seal_all()
        return await self.committer.commit(
            min_seq=0,
            snapshots=self.snapshots,
            retention=Retention(),
            user_changed=user_changed,
            prune=self.committer.index_complete(),
        )


async def until(predicate, timeout: float = 5.0, what: str = "a condition") -> None:
    """Poll *predicate* on the trio clock until it is true; fail after *timeout* seconds."""
    with trio.move_on_after(timeout) as scope:
        while not predicate():
            await trio.sleep(0.005)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def until_on_mock_clock(predicate, timeout: float = 10.0, what: str = "a condition") -> None:
    """``until`` for tests on a MockClock: checkpoints without a timer, so that virtual time
    stands still while we wait (an autojump clock would jump to any timer of ours, and
    other tasks' timeouts with it); *timeout* is in real seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(0)


class ServiceHost:
    """A peer service over real stores in *root*, no network: its ops are called
    directly. With *reserve*, stores and records take their bytes from it as the node's
    do (diskspace.py)."""

    def __init__(self, root: Path, donate: int, reserve: DiskReserve | None = None) -> None:
        self.db = Database(root / "meta", META_TABLES)
        self.shards = ShardStore(root / "shards")
        self.ledger = Ledger(self.db)
        self.self_key = os.urandom(32)
        self.reserve = reserve
        self.limiter = trio.CapacityLimiter(2)  # the service's worker threads
        self.records = RecordStore(root / "records", reserve=reserve)
        self.svc = PeerService(
            self.shards, self.ledger, PeerList(self.db, self.self_key), donate=donate,
            ratio=1.5, limiter=self.limiter, records=self.records,
            on_end=lambda _key: None, reserve=reserve,
        )

    def partner(self, quota: int) -> bytes:
        """A new owner with a live agreement for *quota* bytes."""
        owner = os.urandom(32)
        self.ledger.record(owner, we_host=quota, they_host=quota, term=3600)
        return owner

    def held(self, owner: bytes) -> int:
        """Bytes of the shards actually kept for *owner* (not the usage counter)."""
        return sum(len(self.shards.get(owner, sid)) for sid in self.shards.ids(owner))

    def close(self) -> None:
        self.db.close()
        self.shards.close()


@contextlib.contextmanager
def room_left(data_file: Path, room_bytes: int) -> Iterator[None]:
    """Let this process grow the file *data_file* (an LMDB data file) by about
    *room_bytes*, no more: a file-size limit (RLIMIT_FSIZE) makes its page writes past
    it fail (EFBIG, SIGXFSZ ignored), as ENOSPC does on a full disk, and
    ``diskspace.room`` reads the limit as the room left. A fast test can mount no small
    tmpfs; tests/test_mount_full_disk.py fills a real one."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (data_file.stat().st_size + room_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
