"""Blocks rebuilt from shards lately, kept in memory for the reads that follow.

A reader streaming through a restored file asks for each block in many requests (one
per FUSE read): serving them from the plaintext just rebuilt costs a slice, where the
disk cache costs a worker-thread hop and a file open per request, and writing every
rebuilt block into the disk cache first cost a fifth of a restore's CPU (issue 16).

So a rebuilt block goes into this bounded memory set (``RECENT_BYTES``, least recently
used out), and into the disk cache only when it is rebuilt a second time: a block read
again after it left memory is worth keeping on disk, one read once by a copy or a
restore is not (it would also fill the disk of a fresh machine with a second copy of
what is being restored). The ids rebuilt once are remembered, at most ``SEEN_MAX``.
"""

from __future__ import annotations

from collections import OrderedDict

RECENT_BYTES = 32 << 20  # a sequential reader's block plus the blocks fetched ahead of it
SEEN_MAX = 4096  # ids of blocks rebuilt once (32 bytes each)


class RecentBlocks:
    """Plaintext of recently rebuilt blocks, bounded in bytes; knows what was rebuilt before."""

    def __init__(self, capacity: int = RECENT_BYTES, seen_max: int = SEEN_MAX) -> None:
        self.capacity = capacity
        self.seen_max = seen_max
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.used = 0

    def __contains__(self, block_id: bytes) -> bool:
        return block_id in self._data

    def get(self, block_id: bytes) -> bytes | None:
        """The block's plaintext if it is held (it becomes the most recently used)."""
        data = self._data.get(block_id)
        if data is not None:
            self._data.move_to_end(block_id)
        return data

    def keep(self, block_id: bytes, data: bytes) -> bool:
        """Hold a block just rebuilt; True if it had been rebuilt before (it is being
        read again: worth a copy in the disk cache)."""
        again = block_id in self._seen
        self._seen[block_id] = None
        self._seen.move_to_end(block_id)
        while len(self._seen) > self.seen_max:
            self._seen.popitem(last=False)
        self.forget(block_id)
        if len(data) <= self.capacity:
            self._data[block_id] = data
            self.used += len(data)
            while self.used > self.capacity:
                _, old = self._data.popitem(last=False)
                self.used -= len(old)
        return again

    def forget(self, block_id: bytes) -> None:
        """Drop the block's plaintext (it was deleted)."""
        old = self._data.pop(block_id, None)
        if old is not None:
            self.used -= len(old)
