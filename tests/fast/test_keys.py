"""Keyfile format and key derivations."""

from __future__ import annotations

import os
import stat

import pytest

from fluidfs import keys


def test_round_trip_and_same_identity_everywhere(tmp_path):
    kf = keys.with_peers(keys.generate(10, 6), ["127.0.0.1:7000"])
    path = tmp_path / "k"
    keys.write_keyfile(path, kf)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = keys.read_keyfile(path)
    assert loaded == kf
    assert path.read_text().startswith("fluidfs-key-1:")
    a, b = keys.KeyRing(kf), keys.KeyRing(loaded)
    assert a.peer_id == b.peer_id and a.wrap_key == b.wrap_key
    assert keys.decode_peer_id(a.peer_id) == a.public_key


def test_purposes_get_distinct_keys():
    ring = keys.KeyRing(keys.generate())
    derived = {ring.metadata_key, ring.wrap_key, ring.dedup_key, bytes(ring.signing_key)}
    assert len(derived) == 4
    assert all(len(k) == 32 for k in derived)


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k"
    keys.write_keyfile(path, keys.generate())
    before = path.read_text()
    with pytest.raises(FileExistsError):
        keys.write_keyfile(path, keys.generate())
    assert path.read_text() == before


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("hello", "not a fluidfs keyfile"),
        ("fluidfs-key-9:AAAA", "newer format"),
        ("fluidfs-key-1:!!!!", "corrupt"),
        ("fluidfs-key-1:oA", "corrupt"),  # CBOR empty map: no version
    ],
)
def test_bad_keyfiles_get_clear_errors(text, why):
    with pytest.raises(keys.KeyfileError, match=why):
        keys.loads(text)


def test_truncated_keyfile_is_corrupt(tmp_path):
    good = keys.dumps(keys.generate())
    with pytest.raises(keys.KeyfileError, match="corrupt"):
        keys.loads(good[: len(good) // 2])


def test_missing_keyfile(tmp_path):
    with pytest.raises(keys.KeyfileError, match="no keyfile"):
        keys.read_keyfile(tmp_path / "nope")


def test_bad_coding_settings():
    with pytest.raises(ValueError):
        keys.generate(4, 8)
