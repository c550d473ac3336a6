"""Emergency repair: blocks whose *reachable* shards run low are repaired at once.

Ordinary repair waits for an agreement to end (its holder failing for the whole
tolerance, a day by default) before that holder's shards stop counting. A block whose
reachable shards — held by a holder whose live agreement is not failing — fall to
K + MARGIN or fewer cannot wait that long: two more silent holders and it is gone. Such
a block is *endangered* and is repaired now, within the repair bandwidth budget and in
order of danger (fewest reachable shards first, ``repair_priority`` of the reachable
count on the wire). Blocks with fewer failing holders keep waiting for the tolerance.

Finding them: the repairer compares the set of failing holders (a walk of the ledger,
one entry per agreement) at each pass; only when a holder *starts* failing (the auditor
or a failed contact sets ``failing_since``) does it scan the block records, in worker
threads, SCAN_BATCH records per read transaction, for endangered blocks holding a shard
on a newly failing holder. Records are never polled otherwise.

Data safety (the order matters):

- The shard on a failing holder is re-created and placed on a reachable peer that holds
  nothing of the block (and is not failing). Until the transaction that records the new
  holder, the record still names the old one, so the old copy still counts and the
  reconciler (which deletes what no record names on a host) leaves it alone.
- In that same transaction the old copy is queued for deletion on the old holder (the
  ``gc`` table, counted: the old holder's usage figure gives those bytes back once it
  confirms). Nothing is queued before the replacement is recorded.
- If the old holder is reachable again by then, its copy counts again: the new copy is
  taken back instead (it was counted when stored, so its bytes come back too).
- A holder that returns later finds its copy deleted by the collector as surplus; its
  agreement is neither ended nor blamed (deleting is not auditing).
"""

from __future__ import annotations

from collections.abc import Set

from fluidfs.blocks.record import StoredBlock
from fluidfs.store.db import SCAN_BATCH, Database, scan_batch

MARGIN = 1  # endangered at K + MARGIN reachable shards or fewer


def is_endangered(stored: StoredBlock, failing: Set[int]) -> bool:
    """True if the block's reachable shards are down to K + MARGIN or fewer."""
    return stored.reachable(failing) <= stored.record.needed + MARGIN


def stale_shards(stored: StoredBlock, failing: Set[int]) -> dict[int, int]:
    """Shard index -> its failing holder, for every shard held by a failing holder."""
    return {index: holder for index, holder in enumerate(stored.holders) if holder in failing}


def endangered_batch(
    meta: Database, failing: frozenset[int], newly: frozenset[int], after: bytes
) -> tuple[list[bytes], bytes | None]:
    """Endangered blocks with a shard on a holder in *newly*, among the SCAN_BATCH records
    after key *after*, and where the next batch starts (None at the end). Runs in a worker
    thread."""
    with meta.read() as txn:
        records, after = scan_batch(txn, meta["blocks"], after, SCAN_BATCH)
    found = []
    for key, raw in records:
        stored = StoredBlock.decode(key, raw)
        if not newly.isdisjoint(stored.holders) and is_endangered(stored, failing):
            found.append(key)
    return found, after
