"""On-disk encoding of a block's record in ``meta.lmdb`` table ``blocks``.

Format versions 1, 2 and 3 (big-endian)::

    u8  version (1, 2 or 3)
    u32 refcount            references from file maps and metadata nodes (fs/metaindex.py)
    u32 size                plaintext bytes
    u32 shard_size          bytes per shard
    u8  needed (K)
    u8  total (N)
    72  wrapped content key
    24 or 32  AEAD nonce (lets the exact shards be recreated from cached plaintext):
            24 bytes in version 1 (an XChaCha20-Poly1305 block, sealed layout 1 or 2),
            32 bytes in version 2 (an AEGIS-256 block, sealed layout 3; codec.py)
            32 bytes in version 3 (AEGIS-256 and ISA-L Cauchy Reed-Solomon, sealed
            layout 4: the version byte names the erasure code, erasure.py)
    N x 32  shard ids (Merkle roots)
    N x u32 holder of each shard: a peer index, 0 = this node, 0xFFFFFFFF = none

A block of sealed layout 1 or 2 is still written as version 1, and one of layout 3 as
version 2, so records read the same by code that knows only those versions (and code
that predates version 3 refuses a layout-4 record rather than misreading it). About 500
bytes per 4 MiB block for N=12: a terabyte needs ~130 MB of records.
"""

from __future__ import annotations

import struct
from collections.abc import Set
from dataclasses import dataclass

from fluidfs.blocks.codec import AEGIS, WRAPPED_KEY_SIZE, XCHACHA, BlockRecord, nonce_size
from fluidfs.blocks.erasure import RS_CAUCHY, ZFEC

# record version -> (nonce bytes, erasure code) (the sealed layout's; see the format above)
_LAYOUTS = {
    1: (nonce_size(XCHACHA), ZFEC),
    2: (nonce_size(AEGIS), ZFEC),
    3: (nonce_size(AEGIS), RS_CAUCHY),
}
_VERSIONS = {layout: version for version, layout in _LAYOUTS.items()}
NO_HOLDER = 0xFFFFFFFF
LOCAL_HOLDER = 0
_HEAD = struct.Struct(">BIIIBB")


@dataclass
class StoredBlock:
    """A block record plus what changes over its life: references and holders."""

    record: BlockRecord
    refcount: int
    holders: list[int]

    def missing(self) -> int:
        """Shards that have no holder yet."""
        return self.holders.count(NO_HOLDER)

    def reachable(self, failing: Set[int]) -> int:
        """Shards with a holder that is not among *failing* (holders failing now)."""
        return sum(1 for h in self.holders if h != NO_HOLDER and h not in failing)

    def encode(self) -> bytes:
        """Serialise to the layout above (the version its nonce's size calls for)."""
        rec = self.record
        return b"".join(
            [
                _HEAD.pack(
                    _VERSIONS[len(rec.nonce), rec.code],
                    self.refcount,
                    rec.size,
                    rec.shard_size,
                    rec.needed,
                    rec.total,
                ),
                rec.wrapped_key,
                rec.nonce,
                *rec.shard_ids,
                struct.pack(f">{rec.total}I", *self.holders),
            ]
        )

    @classmethod
    def decode(cls, block_id: bytes, raw: bytes) -> StoredBlock:
        """Parse a record written by encode()."""
        version, refcount, size, shard_size, needed, total = _HEAD.unpack_from(raw)
        layout = _LAYOUTS.get(version)
        if layout is None:
            raise ValueError(f"unknown block record version {version}")
        nonce_size, code = layout
        pos = _HEAD.size
        wrapped = bytes(raw[pos : pos + WRAPPED_KEY_SIZE])
        pos += WRAPPED_KEY_SIZE
        nonce = bytes(raw[pos : pos + nonce_size])
        pos += nonce_size
        ids = tuple(bytes(raw[pos + 32 * i : pos + 32 * (i + 1)]) for i in range(total))
        pos += 32 * total
        holders = list(struct.unpack_from(f">{total}I", raw, pos))
        record = BlockRecord(block_id, size, shard_size, needed, wrapped, nonce, ids, code)
        return cls(record, refcount, holders)
