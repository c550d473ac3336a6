#!/usr/bin/env python3
"""In-process micro-benchmark of the block seal/open path, stage by stage.

Every stage works on 4 MiB blocks of random data and is timed single-threaded
and with several threads running the same stage at once (aggregate MB/s; a
stage that holds the GIL does not scale), and as process CPU-seconds per GiB of
plaintext (single thread). Figures are compared with a memcpy baseline
(``bytes(bytearray)``) measured in the same run; sealed layouts 3 (AEGIS-256, zfec) and 4
(AEGIS-256, ISA-L Cauchy Reed-Solomon) are measured side by side. glibc's allocator is
tuned as in the mount (``sysutil.tune_malloc``; without it every fresh 4 MiB buffer
is page-faulted anew, which costs more than ISA-L's coding).

    python contrib/bench/bench_codec.py            # ~1 s per stage and thread count
    python contrib/bench/bench_codec.py --quick    # CI smoke: a few iterations
    python contrib/bench/bench_codec.py --stall    # + the trio loop's stalls while sealing

``--stall`` seals 256 MiB (64 blocks) in two trio worker threads, as the mount does,
once per layout, while a task on the loop sleeps 1 ms at a time: how late it wakes is
how long the loop could not run (pyeclib held the GIL while it encoded, before layout
4's parity went to ISA-L directly, isal.py; zfec and libsodium release it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import blake3
import trio
import zfec
from nacl import bindings as sodium

from fluidfs.blocks import erasure, merkle
from fluidfs.blocks.codec import AEGIS, CAUCHY, XCHACHA, BlockCodec, shard_size_for
from fluidfs.sysutil import tune_malloc

MB = 1_000_000
GIB = 1 << 30
BLOCK = 4 * 1024 * 1024
K, N = 8, 12


def _measure(fn: Callable[[], object], seconds: float, min_iters: int) -> tuple[int, float]:
    """Run *fn* repeatedly for about *seconds*; return (iterations, elapsed)."""
    fn()  # warm up
    count = 0
    start = time.perf_counter()
    while True:
        fn()
        count += 1
        elapsed = time.perf_counter() - start
        if count >= min_iters and elapsed >= seconds:
            return count, elapsed


def cpu_per_gib(fn: Callable[[], object], nbytes: int, seconds: float, min_iters: int) -> float:
    """Process CPU-seconds per GiB of *fn* run alone (the figure a loaded machine keeps)."""
    fn()
    count = 0
    start, cpu = time.perf_counter(), time.process_time()
    while True:
        fn()
        count += 1
        if count >= min_iters and time.perf_counter() - start >= seconds:
            return (time.process_time() - cpu) / (count * nbytes / GIB)


def throughput(
    fn: Callable[[], object], nbytes: int, threads: int, seconds: float, min_iters: int
) -> float:
    """Aggregate MB/s of *threads* threads each running *fn* in a loop."""
    if threads == 1:
        count, elapsed = _measure(fn, seconds, min_iters)
        return count * nbytes / elapsed / MB
    barrier = threading.Barrier(threads + 1)
    results: list[tuple[int, float]] = []

    def worker() -> tuple[int, float]:
        fn()
        barrier.wait()
        return _measure(fn, seconds, min_iters)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(worker) for _ in range(threads)]
        barrier.wait()
        start = time.perf_counter()
        results = [f.result() for f in futures]
        wall = time.perf_counter() - start
    total = sum(count for count, _ in results)
    return total * nbytes / wall / MB


def build_stages() -> list[tuple[str, int, Callable[[], object], str]]:
    """(name, bytes per call, callable, note) for every stage."""
    plaintext = os.urandom(BLOCK)
    scratch = bytearray(plaintext)
    dedup_key, wrap_key, content_key = os.urandom(32), os.urandom(32), os.urandom(32)
    codec = BlockCodec(dedup_key=dedup_key, wrap_key=wrap_key, needed=K, total=N,
                       version=AEGIS)
    codec4 = BlockCodec(dedup_key=dedup_key, wrap_key=wrap_key, needed=K, total=N,
                        version=CAUCHY)
    block_id = codec.block_id(plaintext)
    nonce = os.urandom(24)
    ciphertext = nonce + sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, block_id, nonce, content_key
    )
    aegis_nonce = os.urandom(32)
    aegis_sealed = sodium.crypto_aead_aegis256_encrypt(plaintext, block_id, aegis_nonce,
                                                       content_key)
    piece = shard_size_for(len(plaintext), K, XCHACHA)
    padded = ciphertext + bytes(piece * K - len(ciphertext))
    view = memoryview(padded)
    pieces = tuple(view[i * piece : (i + 1) * piece] for i in range(K))
    encoder = zfec.Encoder(K, N)
    record, shards = codec.seal(plaintext, block_id)
    primary = {i: shards[i] for i in range(K)}
    # Worst case: every parity shard (N-K of them) plus the last K-(N-K) primaries.
    worst = {i: shards[i] for i in range(N - K, N)}
    assert len(worst) == K and sum(1 for i in worst if i >= K) == N - K
    decoder = zfec.Decoder(K, N)
    worst_nums = tuple(sorted(worst))
    worst_blocks = tuple(worst[i] for i in worst_nums)
    assert codec.open(record, primary) == plaintext
    assert codec.open(record, worst) == plaintext
    record4, sealed4 = codec4.seal(plaintext, block_id)
    shards4 = [bytes(s) for s in sealed4]
    primary4 = {i: shards4[i] for i in range(K)}
    worst4 = {i: shards4[i] for i in range(N - K, N)}
    assert codec4.open(record4, worst4) == plaintext
    padded_bytes = bytes(padded)

    def merkle_ids() -> object:
        return [merkle.shard_id(s) for s in shards]

    return [
        ("memcpy bytes(bytearray)", BLOCK, lambda: bytes(scratch), "baseline"),
        (
            "blake3 keyed (block id)",
            BLOCK,
            lambda: blake3.blake3(plaintext, key=dedup_key, max_threads=1).digest(),
            "plaintext",
        ),
        (
            "xchacha20poly1305 encrypt",
            BLOCK,
            lambda: sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
                plaintext, block_id, nonce, content_key
            ),
            "plaintext",
        ),
        (
            "xchacha20poly1305 decrypt",
            BLOCK,
            lambda: sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext[24:], block_id, nonce, content_key
            ),
            "plaintext",
        ),
        (
            "aegis256 encrypt (layout 3)",
            BLOCK,
            lambda: sodium.crypto_aead_aegis256_encrypt(plaintext, block_id, aegis_nonce,
                                                        content_key),
            "plaintext",
        ),
        (
            "aegis256 decrypt (layout 3)",
            BLOCK,
            lambda: sodium.crypto_aead_aegis256_decrypt(aegis_sealed, block_id, aegis_nonce,
                                                        content_key),
            "plaintext",
        ),
        (
            f"zfec encode K={K} N={N}",
            BLOCK,
            lambda: encoder.encode(pieces),
            "per plaintext byte",
        ),
        (
            f"zfec decode {N - K} parity",
            BLOCK,
            lambda: decoder.decode(worst_blocks, worst_nums),
            "per plaintext byte",
        ),
        (
            f"isa-l cauchy encode K={K} N={N}",
            BLOCK,
            lambda: erasure.encode(erasure.RS_CAUCHY, K, N, padded_bytes, piece),
            "ISA-L direct (isal.py)",
        ),
        (
            f"isa-l cauchy decode {N - K} parity",
            BLOCK,
            lambda: erasure.join(erasure.RS_CAUCHY, K, N, record4.shard_size, worst4),
            "pyeclib, holds the GIL",
        ),
        (f"merkle shard ids x{N}", BLOCK, merkle_ids, f"hashes {N}/{K}x the block"),
        ("seal layout 3 (zfec)", BLOCK, lambda: codec.seal(plaintext, block_id), "id given"),
        ("seal layout 4 (isa-l)", BLOCK, lambda: codec4.seal(plaintext, block_id), "id given"),
        (
            "block_id + seal layout 4",
            BLOCK,
            lambda: codec4.seal(plaintext),
            "as BlockStore.put",
        ),
        (
            "open layout 3 primary",
            BLOCK,
            lambda: codec.open(record, primary),
            "checks 8 shard ids",
        ),
        (
            "open layout 4 primary",
            BLOCK,
            lambda: codec4.open(record4, primary4),
            "checks 8 shard ids",
        ),
        (
            f"open layout 3 {N - K} parity",
            BLOCK,
            lambda: codec.open(record, worst),
            "worst case",
        ),
        (
            f"open layout 4 {N - K} parity",
            BLOCK,
            lambda: codec4.open(record4, worst4),
            "worst case",
        ),
        (
            "recreate layout 3, 1 shard",
            BLOCK,
            lambda: codec.recreate(record, worst, [0]),
            "shard 0 from 4 + 4 parity",
        ),
        (
            "recreate layout 4, 1 shard",
            BLOCK,
            lambda: codec4.recreate(record4, worst4, [0]),
            "shard 0 from 4 + 4 parity",
        ),
    ]


def loop_stalls(version: int, blocks: int = 64) -> tuple[float, float, float]:
    """(longest, 99th percentile, mean) seconds the loop woke late while *blocks* 4 MiB
    blocks are sealed in layout *version* by two worker threads."""
    codec = BlockCodec(dedup_key=os.urandom(32), wrap_key=os.urandom(32), needed=K,
                       total=N, version=version)
    data = [os.urandom(BLOCK) for _ in range(4)]
    late: list[float] = []

    async def run() -> None:
        limiter = trio.CapacityLimiter(2)
        done = trio.Event()

        async def ticker() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await trio.sleep(0.001)
                late.append(time.perf_counter() - start - 0.001)

        async def seal(i: int) -> None:
            await trio.to_thread.run_sync(codec.seal, data[i % 4], limiter=limiter)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            async with trio.open_nursery() as sealers:
                for i in range(blocks):
                    sealers.start_soon(seal, i)
            done.set()

    trio.run(run)
    late.sort()
    return late[-1], late[int(len(late) * 0.99)], sum(late) / len(late)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--threads", type=int, default=2, help="parallel thread count")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI smoke")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--stall", action="store_true", help="also time the loop's stalls")
    args = parser.parse_args(argv)
    seconds, min_iters = (0.0, 2) if args.quick else (args.seconds, 3)

    tune_malloc()  # as the mount does (cli/nodeargs.py)
    stages = build_stages()
    rows = []
    base1 = baseN = None
    print(
        f"bench_codec: 4 MiB blocks, K={K} N={N}, cpus={os.cpu_count()}, "
        f"python {sys.version.split()[0]}; MB = 10^6 bytes, per plaintext byte"
    )
    header = (
        f"{'stage':30} {'1 thread MB/s':>14} {'x memcpy':>9} "
        f"{f'{args.threads} threads MB/s':>15} {'scaling':>8} {'ms/block':>9} "
        f"{'CPU-s/GiB':>9}  note"
    )
    print(header)
    print("-" * len(header))
    for name, nbytes, fn, note in stages:
        one = throughput(fn, nbytes, 1, seconds, min_iters)
        many = throughput(fn, nbytes, args.threads, seconds, min_iters)
        cpu = cpu_per_gib(fn, nbytes, seconds, min_iters)
        if base1 is None:
            base1, baseN = one, many
        row = {
            "stage": name,
            "mb_s_1": round(one, 1),
            "mb_s_n": round(many, 1),
            "threads": args.threads,
            "ratio_memcpy_1": round(one / base1, 4),
            "ratio_memcpy_n": round(many / baseN, 4),
            "scaling": round(many / one, 2),
            "ms_per_block": round(nbytes / (one * MB) * 1000, 2),
            "cpu_s_per_gib": round(cpu, 3),
            "note": note,
        }
        rows.append(row)
        print(
            f"{name:30} {one:14.0f} {one / base1:9.3f} {many:15.0f} "
            f"{many / one:7.2f}x {row['ms_per_block']:9.2f} {cpu:9.3f}  {note}"
        )
    stalls = {}
    if args.stall:
        print("\ntrio loop lateness (1 ms sleeps) while 2 threads seal 256 MiB:")
        for name, version in (("layout 3 (zfec)", AEGIS), ("layout 4 (isa-l)", CAUCHY)):
            longest, p99, mean = loop_stalls(version, 8 if args.quick else 64)
            stalls[name] = {"max_ms": round(longest * 1e3, 2), "p99_ms": round(p99 * 1e3, 2),
                            "mean_ms": round(mean * 1e3, 3)}
            print(f"  {name:18} max {longest * 1e3:7.2f} ms  p99 {p99 * 1e3:6.2f} ms  "
                  f"mean {mean * 1e3:6.3f} ms")
    if args.json:
        args.json.write_text(json.dumps({"block": BLOCK, "k": K, "n": N, "rows": rows,
                                         "stalls": stalls}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
