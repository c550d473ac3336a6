"""The erasure codes: layout 4's parity is ISA-L's Cauchy Reed-Solomon, bit for bit."""

from __future__ import annotations

import hashlib
import os

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluidfs.blocks import erasure
from fluidfs.blocks.erasure import RS_CAUCHY, ZFEC, ErasureError


def _gf_mul(a: int, b: int) -> int:
    """Product in GF(2^8) with ISA-L's polynomial x^8 + x^4 + x^3 + x^2 + 1."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return r


_INVERSE = {a: next(x for x in range(1, 256) if _gf_mul(a, x) == 1) for a in range(1, 256)}


def _cauchy_parity(pieces: list[bytes], n: int) -> list[bytes]:
    """Parity shards by the math alone: row i of the code is 1 / (i xor j), j < K."""
    k = len(pieces)
    out = []
    for i in range(k, n):
        parity = bytearray(len(pieces[0]))
        for j, piece in enumerate(pieces):
            factor = _INVERSE[i ^ j]
            for b, byte in enumerate(piece):
                parity[b] ^= _gf_mul(factor, byte)
        out.append(bytes(parity))
    return out


def test_this_machine_codes_layout_4():
    """pyeclib is a dependency: its ISA-L backend must load wherever fluidfs installs."""
    assert erasure.cauchy_available()


@pytest.mark.parametrize(("k", "n", "piece"), [(8, 12, 33), (2, 3, 5), (10, 16, 7), (1, 2, 9)])
def test_parity_is_the_cauchy_code_by_the_math(k, n, piece):
    """Shard ids pin parity bytes for ever: they must be the code's math, not one
    library version's (a library that changed it would make every repair fail)."""
    data = os.urandom(k * piece)
    shards = erasure.encode(RS_CAUCHY, k, n, data, piece)
    pieces = [data[i * piece : (i + 1) * piece] for i in range(k)]
    assert [bytes(s) for s in shards[:k]] == pieces
    assert [bytes(s) for s in shards[k:]] == _cauchy_parity(pieces, n)


def test_parity_golden():
    data = blake3.blake3(b"layout 4 golden").digest(length=8 * 1000)
    shards = erasure.encode(RS_CAUCHY, 8, 12, data, 1000)
    assert [hashlib.sha256(s).hexdigest()[:32] for s in shards[8:]] == [
        "0d28d997ff7eadc080ce322bb4dd6a4b",
        "973f16e73db4d369701c99452560c23c",
        "9008c2b5d14adc20ca74a5685745b6c8",
        "f6da935ee6c72d08d0dc892a83778926",
    ]
    small = erasure.encode(RS_CAUCHY, 4, 7, bytes(range(24)), 6)
    assert [bytes(s).hex() for s in small[4:]] == ["f1d194b42404", "e3c35575b797", "4969c4e47656"]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(erasure.CODES), st.sets(st.integers(0, 11), min_size=8, max_size=8),
       st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True),
       st.integers(1, 300))
def test_any_k_shards_give_back_the_data_and_any_lost_shard(code, subset, wanted, piece):
    data = os.urandom(8 * piece)
    shards = [bytes(s) for s in erasure.encode(code, 8, 12, data, piece)]
    good = {i: shards[i] for i in subset}
    assert erasure.join(code, 8, 12, piece, good) == data
    made = erasure.make(code, 8, 12, piece, good, wanted)
    assert {i: bytes(s) for i, s in made.items()} == {i: shards[i] for i in wanted}


def test_no_parity_needs_no_library():
    data = os.urandom(40)
    shards = erasure.encode(RS_CAUCHY, 4, 4, data, 10)
    assert erasure.join(RS_CAUCHY, 4, 4, 10, dict(enumerate(shards))) == data


@pytest.mark.parametrize("code", erasure.CODES)
def test_shards_of_the_wrong_size_or_number_are_refused_not_fed_to_the_library(code):
    """liberasurecode aborts the process on some malformed input: nothing reaches it
    unchecked (a repair fed by a lying peer must fail as an error, never a crash)."""
    shards = [bytes(s) for s in erasure.encode(code, 8, 12, os.urandom(800), 100)]
    good = {i: shards[i] for i in range(4, 12)}
    for spoiled in (
        {**good, 4: shards[4][:-1]},
        {**good, 4: shards[4] + b"x"},
        {**good, 4: b""},
        {i: good[i] for i in range(4, 11)},
        {**good, 12: shards[0]},
        {**{i: good[i] for i in range(5, 12)}, -1: shards[0]},
    ):
        with pytest.raises(ErasureError):
            erasure.join(code, 8, 12, 100, spoiled)
        with pytest.raises(ErasureError):
            erasure.make(code, 8, 12, 100, spoiled, [0])
    with pytest.raises(ErasureError):
        erasure.make(code, 8, 12, 100, good, [12])
    with pytest.raises(ErasureError):
        erasure.encode(code, 8, 12, os.urandom(801), 100)
    with pytest.raises(ErasureError):  # K above N, as a lying capability could say
        erasure.make(code, 13, 12, 100, {i: shards[0] for i in range(13)}, [0])


def test_an_unknown_code_is_refused():
    with pytest.raises(ErasureError):
        erasure.encode(7, 2, 3, bytes(4), 2)
    assert ZFEC != RS_CAUCHY
