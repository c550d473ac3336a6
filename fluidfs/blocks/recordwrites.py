"""Writes of many tasks that reach the same point together, in one write transaction.

A first sync's metadata nodes end their uploads in waves: a batched ``StoreShard``
answer (blocks/storebatch.py) settles the last shards of several blocks at once, and
each of their upload tasks then records the block's holders. A write transaction each
cost the loop a commit of ``meta.lmdb`` per block; ``JoinedWrites`` runs the writes of
the tasks that arrive in the same round of the loop in one.

The first task to arrive yields once (the others of its round join meanwhile), then
runs every joined write in one transaction on the loop, as each used to run its own.
A write that raises undoes the shared transaction; each write is then run again in a
transaction of its own, so one failure reaches only its task. A write must therefore
keep its effects inside the transaction and return what its task needs. Waiting is
shielded from cancellation, as the single transaction it replaces could not be
cancelled half way: a write that joined is committed (or fails) whatever its task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

from fluidfs.store.db import Database

T = TypeVar("T")
_UNSET: Any = object()

__all__ = ["JoinedWrites"]


class _Joined(Generic[T]):
    __slots__ = ("done", "error", "value", "write")

    def __init__(self, write: Callable[[Any], T]) -> None:
        self.write = write
        self.done = trio.Event()
        self.value: T = _UNSET
        self.error: BaseException | None = None


class JoinedWrites:
    """Runs the writes of tasks arriving in the same loop round in one transaction."""

    def __init__(self, meta: Database) -> None:
        self.meta = meta
        self._joined: list[_Joined[Any]] = []
        self.transactions = 0  # committed shared transactions (tests, benchmarks)
        self.writes = 0  # writes they carried

    async def write(self, write: Callable[[Any], T]) -> T:
        """Run ``write(txn)`` in a write transaction shared with the writes other tasks
        hand in during this round of the loop; its return value, or its exception."""
        entry: _Joined[T] = _Joined(write)
        self._joined.append(entry)
        if len(self._joined) == 1:
            try:
                await trio.lowlevel.cancel_shielded_checkpoint()  # the round's others join
            finally:
                joined, self._joined = self._joined, []
                self._run(joined)
        else:
            with trio.CancelScope(shield=True):
                await entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.value

    def _run(self, joined: list[_Joined[Any]]) -> None:
        try:
            try:
                with self.meta.write() as txn:
                    values = [entry.write(txn) for entry in joined]
            except Exception:  # undone: each again on its own, so it fails alone
                for entry in joined:
                    try:
                        with self.meta.write() as txn:
                            entry.value = entry.write(txn)
                    except Exception as exc:
                        entry.error = exc
                    else:
                        self.transactions += 1
                        self.writes += 1
            else:
                for entry, value in zip(joined, values, strict=True):
                    entry.value = value
                self.transactions += 1
                self.writes += len(joined)
        except BaseException as exc:  # not a write's failure (KeyboardInterrupt)
            for entry in joined:
                if entry.error is None and entry.value is _UNSET:
                    entry.error = exc
            raise
        finally:
            for entry in joined:
                entry.done.set()
