"""Shard ids stay the Merkle roots they were: hashing leaves from a scratch copy
(merkle.py, issue 16) must not change one bit of them."""

from __future__ import annotations

import hashlib
import os

import blake3
import pytest

from fluidfs.blocks import merkle

L = merkle.LEAF_SIZE

# Shard ids computed by the leaf-by-leaf code before the scratch copy (format version 1).
GOLDEN = {
    0: "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
    1: "9c4af9461a9002f15f59b41368f45bff543cf64ac22f3e0c595635c6b9e2ea5d",
    65536: "b772c1babb36b70bec7dd37996390da3f70d53924bf4a56eb917b59cc783b795",
    65537: "3bff1a3ec0dfc9bb5eb1f6b4db5db5041eb439a06c47083b84489d4ae077e6f3",
    300000: "ac0c708e4b72d09cbcb81fbda077d8d14a7b9767b1cba18df505688c879cda44",
    1048600: "275a164e0090bf0f716a4dabd100fe7cf1a7f19b3418bf54d4ac9628d212da22",
}


@pytest.mark.parametrize("length", sorted(GOLDEN))
def test_shard_ids_are_the_golden_ones(length):
    data = hashlib.shake_256(b"fluidfs merkle golden").digest(length) if length else b""
    assert merkle.shard_id(data).hex() == GOLDEN[length]


def _leaf_by_definition(leaf: bytes) -> bytes:
    return blake3.blake3(b"\x00" + leaf).digest()


@pytest.mark.parametrize("length", [1, L - 1, L, L + 1, 2 * L - 1, 2 * L, 2 * L + 1, 9 * L + 3])
def test_every_leaf_hash_is_blake3_of_zero_then_the_leaf(length):
    """Around every leaf boundary, from bytes and from a view at an odd offset (a
    primary shard is a view into its sealed block)."""
    raw = os.urandom(length + 3)
    for data in (raw[:length], memoryview(raw)[3:]):
        want = [_leaf_by_definition(bytes(data[i : i + L])) for i in range(0, length, L)]
        assert merkle._leaf_hashes(data) == want
        assert merkle.shard_id(data) == merkle._root(want)


def test_proofs_still_verify_against_the_ids():
    data = os.urandom(5 * L + 17)
    root = merkle.shard_id(data)
    for index in range(merkle.leaf_count(len(data))):
        path = merkle.proof(data, index)
        assert merkle.verify(root, len(data), index, merkle.leaf(data, index), path)
