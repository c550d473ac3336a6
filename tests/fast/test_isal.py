"""ISA-L called directly (blocks/isal.py) gives pyeclib's Cauchy parity, or steps aside."""

from __future__ import annotations

import ctypes.util
import itertools
import logging
import os
import random

import pytest

from fluidfs.blocks import erasure, isal
from fluidfs.blocks.erasure import RS_CAUCHY


def test_pyeclibs_bundled_libisal_loads():
    """pyeclib's wheel bundles libisal: wherever fluidfs installs, the direct path runs."""
    assert isal.available()


@pytest.mark.parametrize(("k", "n"), [(4, 12), (6, 12), (1, 2), (2, 3), (10, 16), (8, 12)])
@pytest.mark.parametrize("piece", [1, 2, 3, 15, 31, 32, 33, 63, 64, 65, 127, 4095, 65537])
def test_parity_equals_pyeclibs(k, n, piece):
    """Every size, odd ones and those around ISA-L's 16/32/64-byte SIMD strides too."""
    data = os.urandom(k * piece)
    ours = isal.parity(k, n, data, piece, erasure._pyeclib_parity)
    assert ours is not None
    assert [bytes(s) for s in ours] == erasure._pyeclib_parity(k, n, data, piece)


def test_a_whole_block_equals_pyeclibs():
    """A 4 MiB block sealed 4 of 12 (the bench's shape), read from a memoryview."""
    k, n, piece = 4, 12, 1_048_600
    data = bytearray(os.urandom(k * piece))
    shards = erasure.encode(RS_CAUCHY, k, n, memoryview(data), piece)
    assert [bytes(s) for s in shards[k:]] == erasure._pyeclib_parity(k, n, bytes(data), piece)


def test_no_shard_is_a_copy_of_the_sealed_bytes():
    """The primaries are views of the sealed buffer itself (pyeclib copied them into its
    fragments): with ISA-L called directly nothing is copied but the parity written."""
    k, n, piece = 4, 12, 1000
    sealed = os.urandom(k * piece)
    shards = erasure.encode(RS_CAUCHY, k, n, sealed, piece)
    assert all(s.obj is sealed for s in shards[:k])
    assert all(s.readonly for s in shards)


def test_a_library_without_isal_is_refused():
    """A missing file, or a library lacking ISA-L's symbols, leaves ISA-L unavailable."""
    libc = ctypes.util.find_library("c")
    assert libc is not None
    assert isal.load(["/nonexistent/libisal.so.2", libc]) is None


def test_without_libisal_erasure_codes_through_pyeclib(monkeypatch):
    """The fallback: no usable libisal, and encode still gives the same shards."""
    k, n, piece = 4, 12, 777
    data = os.urandom(k * piece)
    direct = [bytes(s) for s in erasure.encode(RS_CAUCHY, k, n, data, piece)]
    monkeypatch.setattr(isal, "_library", lambda: isal.load(["/nonexistent/libisal.so"]))
    assert isal.parity(k, n, data, piece, erasure._pyeclib_parity) is None
    through_pyeclib = erasure.encode(RS_CAUCHY, k, n, data, piece)
    assert [bytes(s) for s in through_pyeclib] == direct
    assert all(s.obj is not data for s in through_pyeclib[:k])  # pyeclib's fragments


def test_a_library_that_disagrees_with_pyeclib_is_not_used(monkeypatch, caplog):
    """Checked on first use per K, N: if pyeclib's parity differs, ISA-L steps aside for
    that K, N (and stays aside) rather than seal shards repair could not recreate."""
    monkeypatch.setattr(isal, "_tables", {})

    def wrong(k: int, n: int, sealed: bytes, piece: int) -> list[bytes]:
        return [bytes(piece)] * (n - k)

    data = os.urandom(3 * 50)
    with caplog.at_level(logging.WARNING, logger="fluidfs.blocks.isal"):
        assert isal.parity(3, 5, data, 50, wrong) is None
    assert "differs" in caplog.text
    assert isal.parity(3, 5, data, 50, erasure._pyeclib_parity) is None  # decided once


def _pyeclib_join(k: int, n: int, piece: int, good: dict[int, bytes]) -> bytes:
    """pyeclib's decoding of K shards (behind liberasurecode's headers)."""
    headers = erasure._headers(k, n, piece)
    return erasure._driver(k, n).decode([headers[i] + good[i] for i in sorted(good)])


def test_decoding_equals_pyeclibs_for_every_choice_of_4_of_12():
    """All 495 sets of 4 shards out of 12 (the bench's shape) decode to the data, as
    pyeclib decodes them, at a size off ISA-L's SIMD strides."""
    k, n, piece = 4, 12, 1001
    data = os.urandom(k * piece)
    shards = [bytes(s) for s in erasure.encode(RS_CAUCHY, k, n, data, piece)]
    for subset in itertools.combinations(range(n), k):
        good = {i: shards[i] for i in subset}
        ours = isal.join(k, n, piece, good, erasure._pyeclib_parity)
        assert ours == data, subset
        if subset[0] >= 4 or subset in ((0, 5, 6, 11), (1, 2, 3, 4)):
            assert ours == _pyeclib_join(k, n, piece, good), subset


@pytest.mark.parametrize(("k", "n"), [(1, 2), (2, 3), (6, 12), (8, 12), (10, 16)])
@pytest.mark.parametrize("piece", [1, 33, 4097])
def test_decoding_and_recovering_equal_pyeclibs_on_random_erasures(k, n, piece):
    rng = random.Random(f"{k} {n} {piece}")
    data = os.urandom(k * piece)
    shards = [bytes(s) for s in erasure.encode(RS_CAUCHY, k, n, data, piece)]
    for _ in range(20):
        subset = rng.sample(range(n), k)
        good = {i: shards[i] for i in subset}
        assert isal.join(k, n, piece, good, erasure._pyeclib_parity) == data
        assert _pyeclib_join(k, n, piece, good) == data
        lost = [i for i in range(n) if i not in good]
        wanted = rng.sample(lost, rng.randint(1, len(lost)))
        made = isal.recover(k, n, piece, good, wanted, erasure._pyeclib_parity)
        assert made is not None
        assert [bytes(s) for s in made] == [shards[i] for i in wanted]


def test_a_whole_block_decodes_from_parity_alone_without_copying_the_shards():
    """4 MiB sealed 4 of 12, its first four parity shards given as views: the data comes
    back, and only the missing pieces are computed (the present one is copied once)."""
    k, n, piece = 4, 12, 1_048_600
    data = os.urandom(k * piece)
    shards = erasure.encode(RS_CAUCHY, k, n, data, piece)
    good = {2: shards[2], 4: shards[4], 7: shards[7], 11: shards[11]}
    assert erasure.join(RS_CAUCHY, k, n, piece, good) == data
    made = erasure.make(RS_CAUCHY, k, n, piece, good, [0, 5, 9])
    assert {i: bytes(s) for i, s in made.items()} == {i: bytes(shards[i]) for i in (0, 5, 9)}


def test_without_libisal_erasure_decodes_through_pyeclib(monkeypatch):
    k, n, piece = 4, 12, 777
    data = os.urandom(k * piece)
    shards = [bytes(s) for s in erasure.encode(RS_CAUCHY, k, n, data, piece)]
    good = {i: shards[i] for i in (1, 6, 8, 10)}
    monkeypatch.setattr(isal, "_library", lambda: isal.load(["/nonexistent/libisal.so"]))
    assert isal.join(k, n, piece, good, erasure._pyeclib_parity) is None
    assert isal.recover(k, n, piece, good, [0], erasure._pyeclib_parity) is None
    assert erasure.join(RS_CAUCHY, k, n, piece, good) == data
    made = erasure.make(RS_CAUCHY, k, n, piece, good, [0, 11])
    assert {i: bytes(s) for i, s in made.items()} == {0: shards[0], 11: shards[11]}

