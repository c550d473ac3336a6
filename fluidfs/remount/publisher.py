"""Publishing a commit's root record, so that a fresh machine can find the tree.

The root record (peers/rootrecord.py, kind ``"root"``) names the commit node and the
peers that hold our records; its body is ``{"time": ns, "machine": 16 bytes, "host":
str, "commit": a metadata leaf with one entry b"commit" whose content is the commit
node's reference, "peers": RecordClient.listing(), "held_at": where listed peers'
sides are held at providers (peers/sides.py)}``, sealed under the keyfile.

Each root record is written under the lease's fence (peers/lease.py): once a later
writer holds the lease, peers refuse it, and the outcome is ``LEASE_LOST``.

A commit counts as published once ``min(K, partners)`` peers (at least one) stored its
root; only then may older heads go (fs/commit.py ``mark_published``). A commit naming
a block that fewer than K peers hold is not published at all: a fresh machine would
find it and fail to fetch what it names.
"""

from __future__ import annotations

import enum
import logging
import socket
from collections.abc import Callable

from fluidfs.fs.commit import CommitResult, Committer
from fluidfs.fs.metaformat import Entry, encode_leaf
from fluidfs.peers.rootrecord import RecordClient
from fluidfs.remount.leasekeeper import LeaseKeeper

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """How publishing one root record went."""

    PUBLISHED = "published"  # enough peers hold it (or there are no peers to ask)
    WITHHELD = "withheld"  # names blocks too few peers hold: commit again later
    SHORT = "short"  # too few peers stored it: send it again later
    SUPERSEDED = "superseded"  # peers hold a root numbered past ours: commit again
    LEASE_LOST = "lease lost"  # another mount writes now: never published


class RootPublisher:
    """Sends root records and remembers the one still waiting for enough peers."""

    def __init__(
        self,
        records: RecordClient,
        committer: Committer,
        keeper: LeaseKeeper,
        machine: bytes,
        *,
        needed: int,
        partners: Callable[[], int],
        networked: Callable[[], bool],
    ) -> None:
        self.records = records
        self.committer = committer
        self.keeper = keeper
        self.machine = machine
        self.needed = needed  # K: shards needed to rebuild a block
        self.partners = partners  # peers we have agreements with
        self.networked = networked
        self.pending: CommitResult | None = None  # published to too few peers so far
        self.published_to = 0  # peers that stored the latest root
        self.network_seq = 0  # highest root record seq seen on the network

    def seen(self, seq: int) -> None:
        """A root numbered *seq* exists on the network: ours must go past it."""
        self.network_seq = max(self.network_seq, seq)

    async def publish(self, result: CommitResult) -> Outcome:
        """Publish the root record of *result* (see the module docstring)."""
        seq = result.head.seq
        if not self.networked():
            self.pending = None
            await self.committer.mark_published(seq)
            return Outcome.PUBLISHED
        if result.stats.weak_refs:
            # A fresh machine would find this root and fail to fetch what it names: keep
            # the commit here (its snapshot works) and publish a later, complete one.
            log.warning(
                "commit %d names %d blocks held by fewer than %d peers: root not published yet",
                seq,
                result.stats.weak_refs,
                self.needed,
            )
            self.pending = None
            return Outcome.WITHHELD
        if not await self.keeper.before_publish():
            return Outcome.LEASE_LOST
        body = {
            "time": result.head.time_ns,
            "machine": self.machine,
            "host": socket.gethostname(),
            "commit": encode_leaf([Entry(b"commit", content=result.ref)]),
            **self.records.root_listing(),  # peers, held_at
        }
        stored = await self.records.publish("root", seq, body, fence=self.keeper.lease.fence)
        self.published_to = stored
        if self.keeper.lease.fenced():
            # Peers hold records of a later writer: ours are refused, now and later.
            log.error("root %d refused: a later writer holds the lease", seq)
            self.pending = None
            return Outcome.LEASE_LOST
        self.seen(max(seq, self.records.highest.get("root", 0)))
        wanted = max(1, min(self.needed, self.partners()))
        if stored >= wanted:
            self.pending = None
            await self.committer.mark_published(seq)
            return Outcome.PUBLISHED
        if self.network_seq > seq:
            # Peers hold a root numbered past ours (a mount that lost the lease published
            # before it noticed): commit the same tree again under a higher number.
            log.warning("peers hold root %d, past our %d: committing again", self.network_seq,
                        seq)
            self.pending = None
            return Outcome.SUPERSEDED
        log.warning("root %d reached %d peers (want %d); will retry", seq, stored, wanted)
        self.pending = result
        return Outcome.SHORT
