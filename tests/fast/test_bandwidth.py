"""Bandwidth limits (net/bandwidth.py): the token bucket, its priorities, and the secure
channel and RPC moving frames through it, on trio's MockClock (virtual seconds)."""

from __future__ import annotations

from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing

from fluidfs.net.bandwidth import (
    REPAIR,
    SERVE,
    UPLOAD,
    Bandwidth,
    TokenBucket,
    on_wire,
    repair_priority,
)
from fluidfs.net.channel import accept_channel, connect_channel
from fluidfs.net.messages import OPS, OpSpec
from fluidfs.net.rpc import RpcConnection
from fluidfs.wire.schema import Bytes, Int, Map

A = nacl.signing.SigningKey(b"a" * 32)
B = nacl.signing.SigningKey(b"b" * 32)
KIB, MIB = 1 << 10, 1 << 20


def run(main) -> None:
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def max_in_window(events: list[tuple[float, int]], window: float) -> int:
    """The most bytes of (time, bytes) events inside any *window* seconds."""
    best = inside = end = 0
    for start, n in events:  # in time order: a sliding window
        while end < len(events) and events[end][0] < start + window:
            inside += events[end][1]
            end += 1
        best = max(best, inside)
        inside -= n
    return best


def test_bucket_holds_the_rate_over_every_window() -> None:
    """Senders taking as fast as they can get rate x time, and no 5 s window holds more
    than 5% over the limit (the burst and one chunk of debt are fractions of a second)."""
    rate = 1 * MIB
    events: list[tuple[float, int]] = []

    async def main() -> None:
        bucket = TokenBucket(rate)

        async def sender(size: int, priority: int) -> None:
            while trio.current_time() < 20:
                await bucket.take(size, priority)
                events.append((trio.current_time(), size))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, bucket.chunk, UPLOAD)
            nursery.start_soon(sender, 7 * KIB, SERVE)
            nursery.start_soon(sender, bucket.chunk, repair_priority(9))
        assert bucket.total == sum(n for _t, n in events)

    run(main)
    total = sum(n for _t, n in events)
    assert rate * 20 <= total <= rate * 20 * 1.01
    assert max_in_window(events, 5.0) <= rate * 5 * 1.05


def test_the_limit_counts_what_the_link_carries() -> None:
    """Headers of each TCP segment count: a full 1500-byte frame on the link carries
    1448 bytes of payload (Ethernet, IPv4, TCP with timestamps)."""
    assert on_wire(1448) == 1514
    assert on_wire(1449) == 1449 + 2 * 66
    assert on_wire(100) == 166
    assert on_wire(MIB) / MIB == pytest.approx(1.0456, abs=1e-3)


def test_unlimited_bucket_never_waits_and_counts() -> None:
    async def main() -> None:
        bucket = TokenBucket()
        for _ in range(1000):
            assert await bucket.take(MIB, UPLOAD) == 0.0
        bucket.count(5)
        assert bucket.total == 1000 * MIB + 5
        assert trio.current_time() == 0

    run(main)


def test_answers_to_peers_go_first_then_repair_then_uploads() -> None:
    """With the bucket empty and uploads queued first, a repair and then a peer's
    retrieval arriving later are let through before every queued upload, and repair of
    a block with fewer live shards before one with more."""
    order: list[str] = []

    async def main() -> None:
        bucket = TokenBucket(64 * KIB)
        await bucket.take(MIB)  # deep in debt: everyone waits ~16 s

        async def taker(name: str, priority: int) -> None:
            await bucket.take(bucket.chunk, priority)
            order.append(name)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(taker, f"upload{i}", UPLOAD)
                await trio.sleep(0.1)
            nursery.start_soon(taker, "repair-11-live", repair_priority(11))
            await trio.sleep(0.1)
            nursery.start_soon(taker, "repair-8-live", repair_priority(8))
            await trio.sleep(0.1)
            nursery.start_soon(taker, "retrieval", SERVE)

    run(main)
    assert order == [
        "retrieval", "repair-8-live", "repair-11-live", "upload0", "upload1", "upload2"
    ]
    assert SERVE < REPAIR <= repair_priority(0) < repair_priority(255) < UPLOAD


def test_a_cancelled_wait_takes_nothing_and_others_go_on() -> None:
    async def main() -> None:
        bucket = TokenBucket(100 * KIB)
        await bucket.take(200 * KIB)  # 2 s of debt
        done: list[float] = []

        async def wait_then(priority: int) -> None:
            await bucket.take(50 * KIB, priority)
            done.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.5):
                await bucket.take(MIB, SERVE)  # the head of the queue, given up
            nursery.start_soon(wait_then, UPLOAD)
        # the cancelled megabyte was never taken: the upload went when the debt was paid
        assert done and done[0] == pytest.approx((200 * KIB - bucket.burst) / (100 * KIB))
        assert bucket.waiting == 0

    run(main)


async def channel_pair(bw_a: Bandwidth, bw_b: Bandwidth):
    """Two ends of a secure channel over an in-memory stream (crypto on the loop, so the
    virtual clock never jumps while a worker thread runs)."""
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        got: dict[str, Any] = {}

        async def accept() -> None:
            got["b"] = await accept_channel(right, B, offload_bytes=None, bandwidth=bw_b)

        nursery.start_soon(accept)
        a = await connect_channel(left, A, offload_bytes=None, bandwidth=bw_a)
    return a, got["b"]


def test_channel_sends_at_the_limit_and_lends_priority() -> None:
    """Frames leave at the upload limit; on a second channel sharing the node's budget a
    peer's answer (SERVE) overtakes the uploads queued before it."""
    rate = 256 * KIB
    finished: dict[str, float] = {}

    async def main() -> None:
        bw = Bandwidth.limits(rate, None)
        a1, b1 = await channel_pair(bw, Bandwidth())
        a2, b2 = await channel_pair(bw, Bandwidth())
        start = trio.current_time()

        async def drain(chan) -> None:
            while True:
                await chan.receive()

        async def send(chan, name: str, size: int, priority: int) -> None:
            await chan.send(b"x" * size, priority=priority)
            finished[name] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, b1)
            nursery.start_soon(drain, b2)
            async with trio.open_nursery() as senders:
                for i in range(4):
                    senders.start_soon(send, a1, f"upload{i}", 256 * KIB, UPLOAD)
                await trio.sleep(0.5)
                senders.start_soon(send, a2, "answer", 128 * KIB, SERVE)
            nursery.cancel_scope.cancel()
        assert bw.up.total >= 4 * 256 * KIB + 128 * KIB

    run(main)
    # 1,152 KiB at 256 KiB/s, and segment headers: ~4.7 s in all; the answer after ~1 s
    assert max(finished.values()) == pytest.approx(4.5 * on_wire(MIB) / MIB, abs=0.2)
    assert finished["answer"] < 1.5


def test_channel_receives_at_the_download_limit() -> None:
    rate = 128 * KIB

    async def main() -> None:
        bw = Bandwidth.limits(None, rate)
        a, b = await channel_pair(Bandwidth(), bw)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send, b"y" * 512 * KIB)
            data = await b.receive()
        assert len(data) == 512 * KIB
        # 512 KiB at 128 KiB/s, and the headers of the segments they came in
        assert trio.current_time() == pytest.approx(4.0 * on_wire(MIB) / MIB, abs=0.2)
        assert bw.down.total >= 512 * KIB

    run(main)


OPS_ECHO = {**OPS, "Echo": OpSpec(Map({"x": Int(), "pad": Bytes(max=MIB)}), Map({"x": Int()}))}


class Echo:
    schemas = {"Echo": OPS_ECHO["Echo"].request}

    async def handle(self, peer_key: bytes, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"x": args["x"]}


def test_waiting_for_the_limit_does_not_count_against_a_call_timeout() -> None:
    """Eight calls of 512 KiB each at 256 KiB/s need 16 s on the wire; each has a 5 s
    timeout, which covers the network's time but not the queue for our own limit. Before
    the change the later calls timed out (and would have been sent again)."""

    async def main() -> None:
        bw = Bandwidth.limits(256 * KIB, None)
        a, b = await channel_pair(bw, Bandwidth())
        client = RpcConnection(a, None, ops=OPS_ECHO)
        server = RpcConnection(b, Echo(), ops=OPS_ECHO)
        replies: list[int] = []

        async def one(i: int) -> None:
            reply = await client.call(
                "Echo", {"x": i, "pad": b"p" * (512 * KIB)}, timeout=5.0, priority=UPLOAD
            )
            replies.append(reply["x"])

        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await nursery.start(server.run)
            async with trio.open_nursery() as calls:
                for i in range(8):
                    calls.start_soon(one, i)
            # with the headers of the TCP segments they travel in (on_wire)
            assert trio.current_time() == pytest.approx(16.0 * on_wire(MIB) / MIB, abs=0.5)
            nursery.cancel_scope.cancel()
        assert sorted(replies) == list(range(8))

    run(main)
