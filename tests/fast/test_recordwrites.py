"""Writes of tasks arriving together share one write transaction (blocks/recordwrites.py);
a write that fails fails alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fluidfs.blocks.recordwrites import JoinedWrites
from fluidfs.store.db import Database


def put(table, key: bytes):
    def write(txn) -> bytes:
        txn.put(key, b"v", db=table)
        return key
    return write


def broken(table):
    def write(txn) -> None:
        txn.put(b"half", b"v", db=table)
        raise ValueError("a bug in one write")
    return write


async def test_writes_arriving_together_commit_in_one_transaction(tmp_path: Path) -> None:
    """Ten tasks writing at once: one commit, each task gets its own write's value."""
    db = Database(tmp_path / "meta", ["t"])
    try:
        joined = JoinedWrites(db)
        got: list[bytes] = []
        before = db.env.info()["last_txnid"]

        async def one(i: int) -> None:
            got.append(await joined.write(put(db["t"], bytes([i]))))

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(one, i)
        assert db.env.info()["last_txnid"] - before == 1
        assert sorted(got) == [bytes([i]) for i in range(10)]
        with db.read() as txn:
            assert all(txn.get(bytes([i]), db=db["t"]) == b"v" for i in range(10))
    finally:
        db.close()


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    """A write that raises undoes the shared transaction: the others are written each in
    its own, the failing one's task gets its exception and leaves nothing behind."""
    db = Database(tmp_path / "meta", ["t"])
    try:
        joined = JoinedWrites(db)
        errors: list[Exception] = []

        async def good(i: int) -> None:
            await joined.write(put(db["t"], bytes([i])))

        async def bad() -> None:
            with pytest.raises(ValueError) as caught:
                await joined.write(broken(db["t"]))
            errors.append(caught.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(good, 1)
            nursery.start_soon(bad)
            nursery.start_soon(good, 2)
        assert len(errors) == 1
        with db.read() as txn:
            assert txn.get(bytes([1]), db=db["t"]) == b"v"
            assert txn.get(bytes([2]), db=db["t"]) == b"v"
            assert txn.get(b"half", db=db["t"]) is None
    finally:
        db.close()
