"""Sealing and opening blocks: any K shards rebuild, corruption is caught."""

from __future__ import annotations

import dataclasses
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluidfs.blocks import merkle
from fluidfs.blocks.codec import (
    AEGIS,
    CAUCHY,
    XCHACHA,
    BlockCodec,
    CorruptBlock,
    NotEnoughShards,
    hardware_aes,
    overhead,
    sealed_version,
)
from fluidfs.blocks.erasure import RS_CAUCHY, ZFEC, cauchy_available
from fluidfs.blocks.record import StoredBlock

K, N = 8, 12
CODEC = BlockCodec(dedup_key=os.urandom(32), wrap_key=os.urandom(32), needed=K, total=N)
# The same user's codec sealing layout version 2 (XChaCha20-Poly1305), as every machine
# did before layout 3 and machines without hardware AES still do.
CODEC_V2 = BlockCodec(
    dedup_key=CODEC.dedup_key, wrap_key=CODEC.wrap_key, needed=K, total=N, version=XCHACHA
)
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
        extra = overhead(CODEC.version)
        assert n + extra <= record.shard_size * K <= 1.12 * n + extra + K
        assert CODEC.open(record, {i: shards[i] for i in range(3, 11)}) == data


def test_blocks_sealed_at_their_exact_size_still_open_and_reseal():
    """Layout version 1 sized shards for the exact length; such blocks keep working."""
    record, _ = CODEC_V2.seal(DATA)
    exact = -(-(len(DATA) + 40) // K)
    assert exact != record.shard_size
    old_shards = CODEC.reseal(dataclasses.replace(record, shard_size=exact), DATA)
    old = dataclasses.replace(
        record, shard_size=exact, shard_ids=tuple(merkle.shard_id(s) for s in old_shards)
    )
    assert CODEC.open(old, {i: old_shards[i] for i in range(4, 12)}) == DATA
    assert CODEC.reseal(old, DATA) == old_shards
    assert CODEC.recreate(old, {i: old_shards[i] for i in range(4, 12)}, [0, 1]) == {
        0: old_shards[0], 1: old_shards[1]}


# --- sealed layout versions (2: XChaCha20-Poly1305, 3: AEGIS-256) ---------------------

# Sealed by the code before layout 3 (commit c8249cb) with these keys, K=2 of N=3: the
# record as meta.lmdb kept it (version 1) and the three shards.
OLD_KEYS = {"dedup_key": bytes(range(32)), "wrap_key": bytes(range(32, 64))}
OLD_DATA = b"sealed by layout version 2, before AEGIS-256 " * 2
OLD_RECORD = bytes.fromhex(
    "01000000010000005a000000440203a5ab2c4a9edcd832b66a7e1f362e2667145285f53b10edf93d4c3a81"
    "c9a910a228081830e000177ed8a68e81b91382c479f583d07b64e63578809382249c148ac5d346f7bf85c1"
    "fca1146cc8390264fa61a497e18b818944dee978ad52f6ebd2b14fe3d39f1f8ff938a9cc9c1593961ae25b"
    "e8162652f9b9c879f818cd092e17661140056565442e77e4cfd423ca62c0c0011aea874b94f34c7ab89889"
    "dc90ab47f48d9143a3c40f98a04fc98585bbbe6b061585c6c84df8b2c6dd87a6b386c80000000000000001"
    "00000002"
)
OLD_SHARDS = [
    bytes.fromhex(h)
    for h in (
        "a1146cc8390264fa61a497e18b818944dee978ad52f6ebd2efb710aafb1f5f2b5ce732a10cb95a63bf8c"
        "2727b4c456980ee9be019e38184c5964ac02036daa8602a56982",
        "7a6a8c24993f712fd2e02066b3541564b74e4ea669e6121514d6a5bcb09faa3b10e6f0d4f878e0f6332e"
        "beecc0c21c4418e40cb60735900bb862578bbc2c000000000000",
        "0ae8b10d64784e4d1a2ce4f2fb36ac040cba14bb24d60441047567866d02a80bc4e5ab4bf9263354bad5"
        "08ac5cc8c23d22f3c772b12215c28668470d60efe39706f2bb9b",
    )
]


def test_new_blocks_are_sealed_with_aegis_and_isal_where_the_cpu_has_aes():
    """Layout 4 (AEGIS-256, a 32-byte nonce, ISA-L Cauchy Reed-Solomon) on hardware AES,
    else layout 2."""
    expected = CAUCHY if hardware_aes() and cauchy_available() else XCHACHA
    assert CODEC.version == expected
    assert len(RECORD.nonce) == {CAUCHY: 32, XCHACHA: 24}[expected]
    assert RECORD.code == {CAUCHY: RS_CAUCHY, XCHACHA: ZFEC}[expected]
    assert sealed_version(RECORD) == expected


@pytest.mark.parametrize("version", [XCHACHA, AEGIS, CAUCHY])
def test_every_layout_opens_reseals_and_recreates(version):
    codec = CODEC if version == CODEC.version else CODEC_V2
    if codec.version != version:
        codec = BlockCodec(dedup_key=CODEC.dedup_key, wrap_key=CODEC.wrap_key, needed=K,
                           total=N, version=version)
    data = os.urandom(1_000_003)
    record, shards = codec.seal(data)
    shards = [bytes(s) for s in shards]
    # the other codec of the same user opens it: the record says how it was sealed
    for opener in (CODEC, CODEC_V2):
        assert opener.open(record, {i: shards[i] for i in range(2, 10)}) == data
        assert [bytes(s) for s in opener.reseal(record, data)] == shards
        assert opener.recreate(record, {i: shards[i] for i in range(4, 12)}, [0, 11]) == {
            0: shards[0], 11: shards[11]}
    back = StoredBlock.decode(record.block_id, StoredBlock(record, 1, [0] * N).encode())
    assert back.record == record
    tampered = dict(enumerate(shards))
    tampered[0] = bytes([shards[0][0] ^ 1]) + shards[0][1:]
    with pytest.raises(CorruptBlock):
        CODEC.open(record, tampered, verified=True)


def test_blocks_sealed_before_layout_3_still_open():
    codec = BlockCodec(**OLD_KEYS, needed=2, total=3)
    block_id = codec.block_id(OLD_DATA)
    stored = StoredBlock.decode(block_id, OLD_RECORD)
    assert stored.encode() == OLD_RECORD  # still written as record version 1
    for pair in ((0, 1), (0, 2), (1, 2)):
        assert codec.open(stored.record, {i: OLD_SHARDS[i] for i in pair}) == OLD_DATA
    assert [bytes(s) for s in codec.reseal(stored.record, OLD_DATA)] == OLD_SHARDS


def test_a_record_of_no_known_version_is_refused():
    raw = StoredBlock(RECORD, 1, [0] * N).encode()
    with pytest.raises(ValueError):
        StoredBlock.decode(RECORD.block_id, b"\x04" + raw[1:])


def test_a_record_of_no_sealed_layout_does_not_open():
    for odd in (dataclasses.replace(RECORD, code=2),
                dataclasses.replace(RECORD, code=RS_CAUCHY, nonce=bytes(24))):
        with pytest.raises(CorruptBlock):
            CODEC.open(odd, dict(enumerate(SHARDS)))


# --- sealed layout 4 (AEGIS-256, ISA-L Cauchy Reed-Solomon) --------------------------

# Sealed by layout 4's first code with OLD_KEYS, K=2 of N=3: the record as meta.lmdb keeps
# it (version 3) and the three shards (pinned: a library that codes other parity fails).
V4_DATA = b"sealed by layout version 4, ISA-L Reed-Solomon " * 2
V4_RECORD = bytes.fromhex(
    "03000000010000005e00000050020306493d72dc8d5f776d7fc5d294d78e246ccf4407a87f9c8ab08cc6"
    "ed31ff1e73c99b232de99000f832fe465d81b84b48fefe91660287dc388f50b354a588fec5a8db180b28"
    "6b79701520a409744a91f1dd0cfc0490e171ce12c30c44fe1e6c08fc4106a587425d84a2de9bb7a5c898"
    "eb67db9166da5f413b1673e7e9fa341a52789fc66cc939364ab3e85dd0a35b8072b988d92fec484d2aad"
    "163412a27b1780dfb1a7234e02df00aa2ebc48fdc6d85323f1e348a15a3a9099a6fe2d3e6dec746f6296"
    "12e56aa6c1000000000000000100000002"
)
V4_SHARDS = [
    bytes.fromhex(h)
    for h in (
        "1520a409744a91f1dd0cfc0490e171ce12c30c44fe1e6c08fc4106a587425d848df1a1927a52f3aa02ca"
        "3ec588214acbca5053adbcd6f27a9b2433a08f7fec98a685cb2d3b7825db02d4f59db2051d38",
        "3419fcb5978ef258c3653420ee62503f6c16ed68e7c9531d6b9bc35fae32e564be07d672d65bd6bd6717"
        "4a0e3f1e9d1292855835b3b0c222f832d01d4a9e394c4ea75ffe023e86bf7ade67c8d2b80000",
        "63ec0612bc5f6335a12599e9122b86722d165df12248070fac2c42e95cc40895a200676784eb4e3ed768"
        "d21d5194a5e5e0a064cbc4f0cc2360f72c5b04306183695ade3966dd157ddc20227317e4801c",
    )
]


def test_layout_4_blocks_open_reseal_and_recreate_as_pinned():
    codec = BlockCodec(**OLD_KEYS, needed=2, total=3, version=XCHACHA)  # any layout opens it
    stored = StoredBlock.decode(codec.block_id(V4_DATA), V4_RECORD)
    assert sealed_version(stored.record) == CAUCHY
    assert stored.encode() == V4_RECORD
    for pair in ((0, 1), (0, 2), (1, 2)):
        assert codec.open(stored.record, {i: V4_SHARDS[i] for i in pair}) == V4_DATA
        (lost,) = {0, 1, 2} - set(pair)
        made = codec.recreate(stored.record, {i: V4_SHARDS[i] for i in pair}, [lost])
        assert made == {lost: V4_SHARDS[lost]}
    assert [bytes(s) for s in codec.reseal(stored.record, V4_DATA)] == V4_SHARDS


def test_layout_3_records_are_still_written_as_record_version_2():
    aegis = BlockCodec(dedup_key=CODEC.dedup_key, wrap_key=CODEC.wrap_key, needed=K,
                       total=N, version=AEGIS)
    record, _ = aegis.seal(b"layout 3")
    assert record.code == ZFEC
    assert StoredBlock(record, 1, [0] * N).encode()[0] == 2
    assert StoredBlock(RECORD, 1, [0] * N).encode()[0] == {CAUCHY: 3, XCHACHA: 1}[CODEC.version]


def test_every_lost_shard_of_a_layout_4_block_is_recreated_to_its_id():
    codec = BlockCodec(dedup_key=CODEC.dedup_key, wrap_key=CODEC.wrap_key, needed=K,
                       total=N, version=CAUCHY)
    data = os.urandom(4 * 1024 * 1024 - 5)
    record, sealed = codec.seal(data)
    shards = [bytes(s) for s in sealed]
    for lost in range(N):
        others = [i for i in range(N) if i != lost]
        for good in (others[:K], others[-K:]):
            made = codec.recreate(record, {i: shards[i] for i in good}, [lost])
            assert codec.check_shard(record, lost, made[lost])
    # several at once, primaries among them
    made = codec.recreate(record, {i: shards[i] for i in range(2, 2 + K)}, [0, 1, 10, 11])
    assert made == {i: shards[i] for i in (0, 1, 10, 11)}


@pytest.mark.parametrize("version", [XCHACHA, AEGIS, CAUCHY])
def test_a_shard_changed_only_in_its_padding_does_not_open(version):
    # Readers trust a block that opens without hashing its shards (remote.py), so a
    # change confined to the zero padding, which the AEAD does not cover, must not open.
    codec = BlockCodec(dedup_key=CODEC.dedup_key, wrap_key=CODEC.wrap_key, needed=K,
                       total=N, version=version)
    data = os.urandom(300_001)
    record, shards = codec.seal(data)
    shards = [bytes(s) for s in shards]
    assert record.shard_size * K > record.size + overhead(version)  # there is padding
    last = K - 1
    lied = bytes(shards[last][:-1]) + bytes([shards[last][-1] ^ 1])
    with pytest.raises(CorruptBlock):
        codec.open(record, {**{i: shards[i] for i in range(K)}, last: lied}, verified=True)
    # ... also when the lie is in a parity shard and decoding carries it into the padding
    parity = bytes(shards[K][:-1]) + bytes([shards[K][-1] ^ 1])
    used = {i: shards[i] for i in range(K - 1)} | {K: parity}
    with pytest.raises(CorruptBlock):
        codec.open(record, used, verified=True)
    assert codec.open(record, {i: shards[i] for i in range(K)}, verified=True) == data


def test_the_id_check_is_the_default_and_only_readers_skip_it():
    # A block sealed under an id that is not its plaintext's hash (only the owner's own
    # sealer could make one: the AEAD binds the id under the block's key) is refused by
    # the default open, which ``check --read-data`` uses; readers (remote.py) pass
    # check_id=False and rely on the AEAD, which still refuses any other tampering.
    data = os.urandom(50_000)
    wrong = CODEC.block_id(data[:-1])
    record, shards = CODEC.seal(data, wrong)
    good = {i: bytes(shards[i]) for i in range(K)}
    with pytest.raises(CorruptBlock, match="does not match its id"):
        CODEC.open(record, good, verified=True)
    assert CODEC.open(record, good, verified=True, check_id=False) == data
    tampered = dict(good)
    tampered[0] = bytes([good[0][0] ^ 1]) + good[0][1:]
    with pytest.raises(CorruptBlock):
        CODEC.open(record, tampered, verified=True, check_id=False)
