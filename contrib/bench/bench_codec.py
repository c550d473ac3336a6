#!/usr/bin/env python3
"""In-process micro-benchmark of the block seal/open path, stage by stage.

Every stage works on 4 MiB blocks of random data and is timed single-threaded
and with several threads running the same stage at once (aggregate MB/s; a
stage that holds the GIL does not scale). Figures are compared with a memcpy
baseline (``bytes(bytearray)``) measured in the same run.

    python contrib/bench/bench_codec.py            # ~1 s per stage and thread count
    python contrib/bench/bench_codec.py --quick    # CI smoke: a few iterations
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
import zfec
from nacl import bindings as sodium

from fluidfs.blocks import merkle
from fluidfs.blocks.codec import XCHACHA, BlockCodec, shard_size_for

MB = 1_000_000
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
    codec = BlockCodec(dedup_key=dedup_key, wrap_key=wrap_key, needed=K, total=N)
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
        (f"merkle shard ids x{N}", BLOCK, merkle_ids, f"hashes {N}/{K}x the block"),
        ("BlockCodec.seal (all)", BLOCK, lambda: codec.seal(plaintext, block_id), "id given"),
        (
            "block_id + seal",
            BLOCK,
            lambda: codec.seal(plaintext),
            "as BlockStore.put",
        ),
        (
            "BlockCodec.open primary",
            BLOCK,
            lambda: codec.open(record, primary),
            "checks 8 shard ids",
        ),
        (
            f"BlockCodec.open {N - K} parity",
            BLOCK,
            lambda: codec.open(record, worst),
            "worst case",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--threads", type=int, default=2, help="parallel thread count")
    parser.add_argument("--quick", action="store_true", help="tiny run for CI smoke")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    seconds, min_iters = (0.0, 2) if args.quick else (args.seconds, 3)

    stages = build_stages()
    rows = []
    base1 = baseN = None
    print(
        f"bench_codec: 4 MiB blocks, K={K} N={N}, cpus={os.cpu_count()}, "
        f"python {sys.version.split()[0]}; MB = 10^6 bytes, per plaintext byte"
    )
    header = (
        f"{'stage':30} {'1 thread MB/s':>14} {'x memcpy':>9} "
        f"{f'{args.threads} threads MB/s':>15} {'scaling':>8} {'ms/block':>9}  note"
    )
    print(header)
    print("-" * len(header))
    for name, nbytes, fn, note in stages:
        one = throughput(fn, nbytes, 1, seconds, min_iters)
        many = throughput(fn, nbytes, args.threads, seconds, min_iters)
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
            "note": note,
        }
        rows.append(row)
        print(
            f"{name:30} {one:14.0f} {one / base1:9.3f} {many:15.0f} "
            f"{many / one:7.2f}x {row['ms_per_block']:9.2f}  {note}"
        )
    if args.json:
        args.json.write_text(json.dumps({"block": BLOCK, "k": K, "n": N, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
