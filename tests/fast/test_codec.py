"""Sealing and opening blocks: any K shards rebuild, corruption is caught."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluidfs.blocks import merkle
from fluidfs.blocks.codec import BlockCodec, CorruptBlock, NotEnoughShards
from fluidfs.blocks.record import StoredBlock

K, N = 8, 12
CODEC = BlockCodec(dedup_key=os.urandom(32), wrap_key=os.urandom(32), needed=K, total=N)
DATA = os.urandom(300_001)
RECORD, SEALED = CODEC.seal(DATA)
SHARDS = [bytes(s) for s in SEALED]  # the primary shards are views of one buffer


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, N - 1), min_size=K, max_size=N))
def test_any_k_shards_rebuild(subset):
    assert CODEC.open(RECORD, {i: SHARDS[i] for i in subset}) == DATA


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, N - 1), min_size=0, max_size=K - 1))
def test_fewer_than_k_fail(subset):
    with pytest.raises(NotEnoughShards):
        CODEC.open(RECORD, {i: SHARDS[i] for i in subset})


@settings(max_examples=25, deadline=None)
@given(st.binary(min_size=0, max_size=5000))
def test_round_trip_any_size(data):
    record, shards = CODEC.seal(data)
    assert record.size == len(data)
    assert CODEC.open(record, dict(enumerate(shards[N - K :], start=N - K))) == data


def test_corrupt_shard_is_skipped_when_another_is_there():
    shards = {i: SHARDS[i] for i in range(N)}
    bad = bytearray(shards[0])
    bad[7] ^= 1
    shards[0] = bytes(bad)
    assert not CODEC.check_shard(RECORD, 0, shards[0])
    assert CODEC.open(RECORD, shards) == DATA


def test_corruption_everywhere_is_detected():
    with pytest.raises(NotEnoughShards):
        CODEC.open(RECORD, {i: SHARDS[i][:-1] + b"x" for i in range(N)})


def test_unverified_tampering_fails_authentication():
    tampered = {i: SHARDS[i] for i in range(K)}
    tampered[2] = bytes(len(SHARDS[2]))
    with pytest.raises(CorruptBlock):
        CODEC.open(RECORD, tampered, verified=True)


def test_same_plaintext_same_id_different_user_different_id():
    other = BlockCodec(dedup_key=os.urandom(32), wrap_key=os.urandom(32), needed=K, total=N)
    assert CODEC.block_id(DATA) == CODEC.block_id(bytes(DATA))
    assert other.block_id(DATA) != CODEC.block_id(DATA)


def test_shards_do_not_contain_plaintext():
    text = b"secret file contents " * 1000
    _, shards = CODEC.seal(text)
    assert all(b"secret file" not in s for s in shards)


def test_record_encoding_round_trip():
    stored = StoredBlock(RECORD, 3, list(range(N)))
    back = StoredBlock.decode(RECORD.block_id, stored.encode())
    assert back == stored
    assert len(stored.encode()) < 600


def test_concurrent_encode_decode_from_threads():
    """zfec releases the GIL: many threads sealing/opening at once must stay correct."""
    errors: list[str] = []

    def work(seed: int) -> None:
        data = os.urandom(1 << 20) + bytes([seed])
        for _ in range(4):
            record, shards = CODEC.seal(data)
            picked = {i: shards[i] for i in range(seed % 5, seed % 5 + K)}
            if CODEC.open(record, picked) != data:
                errors.append(f"thread {seed}: wrong output")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 200_000), st.data())
def test_merkle_audit_proofs(length, data):
    shard = os.urandom(length)
    root = merkle.shard_id(shard)
    index = data.draw(st.integers(0, merkle.leaf_count(length) - 1))
    leaf = merkle.leaf(shard, index)
    path = merkle.proof(shard, index)
    assert merkle.verify(root, length, index, leaf, path)
    if leaf:
        forged = bytes([leaf[0] ^ 1]) + leaf[1:]
        assert not merkle.verify(root, length, index, forged, path)
    assert not merkle.verify(root, length, index + 1, leaf, path)


def test_reseal_recreates_the_exact_shards():
    assert CODEC.reseal(RECORD, DATA) == SHARDS
    with pytest.raises(CorruptBlock):
        CODEC.reseal(RECORD, DATA[:-1] + b"?")


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, N - 1), min_size=K, max_size=K), st.data())
def test_missing_shards_recreated_from_any_k_without_decrypting(subset, data):
    wanted = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=4, unique=True))
    made = CODEC.recreate(RECORD, {i: SHARDS[i] for i in subset}, wanted)
    assert made == {i: SHARDS[i] for i in wanted}


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, N - 1), min_size=K, max_size=K), st.data())
def test_recreate_from_unverified_shards_never_returns_a_wrong_shard(subset, data):
    wanted = data.draw(st.lists(st.integers(0, N - 1), min_size=1, max_size=4, unique=True))
    bad = data.draw(st.sampled_from(sorted(subset)))
    spoiled = {i: SHARDS[i] for i in subset}
    spoiled[bad] = data.draw(
        st.sampled_from([bytes([SHARDS[bad][0] ^ 1]) + SHARDS[bad][1:], SHARDS[bad][:-1]])
    )
    try:
        made = CODEC.recreate(RECORD, spoiled, wanted)
    except CorruptBlock:
        return
    assert made == {i: SHARDS[i] for i in wanted}


def test_shards_show_a_size_class_not_the_exact_length():
    """A peer sees shard sizes; files of nearby lengths must look the same to it."""
    sizes = {len(CODEC.seal(os.urandom(n))[1][0]) for n in range(100_000, 100_353, 16)}
    assert len(sizes) == 1
    for n in (5_000, 77_777, 1_000_001, 4 * 1024 * 1024):
        data = os.urandom(n)
        record, shards = CODEC.seal(data)
        assert record.size == n
        assert n + 40 <= record.shard_size * K <= 1.12 * n + 40 + K
        assert CODEC.open(record, {i: shards[i] for i in range(3, 11)}) == data


def test_blocks_sealed_at_their_exact_size_still_open_and_reseal():
    """Layout version 1 sized shards for the exact length; such blocks keep working."""
    exact = -(-(len(DATA) + 40) // K)
    assert exact != RECORD.shard_size
    key = CODEC._content_key(RECORD)
    old_shards = CODEC._encode(DATA, RECORD.block_id, key, RECORD.nonce, exact)
    old = dataclasses.replace(
        RECORD, shard_size=exact, shard_ids=tuple(merkle.shard_id(s) for s in old_shards)
    )
    assert CODEC.open(old, {i: old_shards[i] for i in range(4, 12)}) == DATA
    assert CODEC.reseal(old, DATA) == old_shards
    assert CODEC.recreate(old, {i: old_shards[i] for i in range(4, 12)}, [0, 1]) == {
        0: old_shards[0], 1: old_shards[1]}
