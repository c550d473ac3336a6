"""Per-peer queues of small requests, carried off in batches by a few sender tasks.

The machinery that blocks/shardbatch.py (``RetrieveShards``) and blocks/storebatch.py
(``StoreShard`` of many shards) share: a request joins its peer's queue; while fewer
than ``senders`` sender tasks run for that queue one is started, so an idle peer is
asked at once; each sender takes what the queue holds, sends it as one call, and goes
on until the queue is empty. Requests that arrive while calls are in flight thus go
together in the next one (as Nagle's algorithm does). What a batch may hold and how its
answer is read is the subclass's (``send_next``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import trio

from fluidfs.net.errors import RpcError
from fluidfs.peers.connections import PeerUnavailable

Q = TypeVar("Q", bound=Hashable)  # what a queue is keyed by (a peer, or peer and priority)
W = TypeVar("W")  # one waiting request
T = TypeVar("T")

__all__ = ["PeerQueues", "answer_or_error"]

log = logging.getLogger(__name__)


async def answer_or_error(
    op: str, key: bytes, ask: Callable[[], Awaitable[T]]
) -> tuple[T | None, Exception | None]:
    """Run *ask* (one batched *op* call to peer *key* and the reading of its answer):
    (what it returned, None), or (None, why it failed). A peer that cannot be reached or
    answers with an error gives that error; any other failure is the answer's fault and
    becomes ``bad_reply``, logged: a peer's answer must not end the node."""
    try:
        return await ask(), None
    except (PeerUnavailable, RpcError) as exc:
        return None, exc
    except Exception as exc:
        log.exception("%s answer from %s failed", op, key.hex()[:12])
        return None, RpcError("bad_reply", f"{op} answer: {exc}")


class PeerQueues(ABC, Generic[Q, W]):
    """Queues of waiting requests, each drained by at most *senders* tasks at once."""

    def __init__(self, senders: int) -> None:
        self.senders = senders
        self._nursery: trio.Nursery | None = None
        self._pending: dict[Q, deque[W]] = {}
        self._running: Counter[Q] = Counter()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send batches until cancelled; while this is not running, ``running`` is False
        and callers send their requests one by one."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    @property
    def running(self) -> bool:
        """True while ``run`` runs (batches can be sent)."""
        return self._nursery is not None

    def enqueue(self, queue_key: Q, request: W) -> None:
        """Queue *request*; start a sender if fewer than ``senders`` run for its queue."""
        self._pending.setdefault(queue_key, deque()).append(request)
        if self._running[queue_key] < self.senders and self._nursery is not None:
            self._running[queue_key] += 1
            self._nursery.start_soon(self._send, queue_key)

    def queue(self, queue_key: Q) -> deque[W] | None:
        """The requests waiting in *queue_key*'s queue (None if there is none)."""
        return self._pending.get(queue_key)

    @abstractmethod
    async def send_next(self, queue_key: Q) -> bool:
        """Take the next batch from the queue and send it; False if it held none."""

    async def _send(self, queue_key: Q) -> None:
        try:
            while await self.send_next(queue_key):
                pass
        finally:
            self._running[queue_key] -= 1
            if not self._running[queue_key]:
                del self._running[queue_key]
                if not self._pending.get(queue_key, True):
                    del self._pending[queue_key]
