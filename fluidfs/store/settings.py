"""What a state directory settles once: its block size, machine id and origin.

Table ``settings`` of meta.lmdb (format version 1):

- ``b"block_size"`` → u64 big-endian: the size files are cut into. Fixed when the
  state is created; a fresh state that restores a backup takes the backup's.
- ``b"machine_id"`` → 16 random bytes, made the first time the state is used: the
  writer lease and the root records say which machine wrote them.
- ``b"origin"`` → how a fresh state directory settled its tree: ``b"new"`` (started
  empty: a quorum of peers said there is no backup, ``--new``, or the keyfile was made
  for it; a later mount of the still-empty state skips the quorum) or ``b"restored"``
  (adopted a root record). See remount/gate.py.
- ``b"provider"`` → CBOR ``{"v": 1, "id": bytes(32), "addr": str}``: the storage provider this
  node's side was last held at (``mount --provider``), so a mount with another provider
  knows where to fetch what the previous one holds (peers/handover.py).
"""

from __future__ import annotations

import os
import struct

import cbor2

from fluidfs.store.db import Database
from fluidfs.wire.schema import Bytes, Map, OneOf, Str, validate

_U64 = struct.Struct(">Q")
BLOCK_SIZE_KEY = b"block_size"
MACHINE_KEY = b"machine_id"
ORIGIN_KEY = b"origin"
ORIGIN_NEW = b"new"
ORIGIN_RESTORED = b"restored"
PROVIDER_KEY = b"provider"
PROVIDER_SCHEMA = Map({"v": OneOf(1), "id": Bytes(min=32, max=32), "addr": Str(min=1, max=300)})


class StateSettings:
    """The ``settings`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._table = db["settings"]

    def _get(self, key: bytes) -> bytes | None:
        with self.db.read() as txn:
            raw = txn.get(key, db=self._table)
        return None if raw is None else bytes(raw)

    def _put(self, key: bytes, value: bytes) -> None:
        with self.db.write() as txn:
            txn.put(key, value, db=self._table)

    def settle_block_size(self, wanted: int) -> int:
        """The block size: *wanted* on a new state, the one it was created with after."""
        with self.db.write() as txn:
            raw = txn.get(BLOCK_SIZE_KEY, db=self._table)
            if raw is not None:
                return _U64.unpack(raw)[0]
            txn.put(BLOCK_SIZE_KEY, _U64.pack(wanted), db=self._table)
        return wanted

    def set_block_size(self, size: int) -> None:
        """Record the block size of a restored backup."""
        self._put(BLOCK_SIZE_KEY, _U64.pack(size))

    def machine_id(self) -> bytes:
        """This state directory's machine id (made on first use)."""
        with self.db.write() as txn:
            raw = txn.get(MACHINE_KEY, db=self._table)
            if raw is None:
                raw = os.urandom(16)
                txn.put(MACHINE_KEY, raw, db=self._table)
        return bytes(raw)

    def origin(self) -> bytes | None:
        """``ORIGIN_NEW``, ``ORIGIN_RESTORED`` or None (never settled)."""
        return self._get(ORIGIN_KEY)

    def set_origin(self, origin: bytes) -> None:
        """Record how the tree was settled."""
        self._put(ORIGIN_KEY, origin)

    def provider(self) -> tuple[bytes, str] | None:
        """The provider our side was last held at, as (id, address), or None."""
        raw = self._get(PROVIDER_KEY)
        if raw is None:
            return None
        body = validate(PROVIDER_SCHEMA, cbor2.loads(raw))
        return body["id"], body["addr"]

    def set_provider(self, where: tuple[bytes, str] | None) -> None:
        """Record the provider our side is held at now (None: no provider)."""
        if where is None:
            with self.db.write() as txn:
                txn.delete(PROVIDER_KEY, db=self._table)
            return
        self._put(PROVIDER_KEY, cbor2.dumps({"v": 1, "id": where[0], "addr": where[1]}))
