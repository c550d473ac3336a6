"""`fluidfs key export` records that the keyfile was exported (keysaved.py), but only in a
state directory that belongs to that keyfile."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluidfs import keys, keysaved
from fluidfs.cli.main import main
from fluidfs.statedir import StateDir


def make_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    path = tmp_path / f"{name}.key"
    keys.write_keyfile(path, keys.generate())
    return path, keys.KeyRing(keys.read_keyfile(path)).peer_id


def own_state(tmp_path: Path, peer_id: str) -> StateDir:
    """A state directory a mount of *peer_id* made (identity recorded), not running."""
    state = StateDir(tmp_path / f"state-{peer_id[:6]}")
    state.lock(peer_id)
    state.unlock()
    return state


def test_key_export_marks_the_keyfile_saved_in_its_own_state(tmp_path, capsys) -> None:
    keyfile, peer_id = make_key(tmp_path, "mine")
    state = own_state(tmp_path, peer_id)
    assert keysaved.saved_at(state.path) is None

    main(["key", "export", "--keyfile", str(keyfile), "--state-dir", str(state.path)])

    assert keys.loads(capsys.readouterr().out).root == keys.read_keyfile(keyfile).root
    assert keysaved.saved_at(state.path) is not None


def test_key_export_after_init_marks_the_state_init_named(tmp_path, capsys) -> None:
    keyfile, peer_id = make_key(tmp_path, "fresh")
    state = StateDir(tmp_path / "state")
    state.mark_new_key(peer_id)  # what `fluidfs init --state-dir` leaves

    main(["key", "export", "--keyfile", str(keyfile), "--state-dir", str(state.path)])

    assert keysaved.saved_at(state.path) is not None


def test_key_export_leaves_another_keys_state_alone(tmp_path, capsys) -> None:
    keyfile, _ = make_key(tmp_path, "mine")
    _, other_id = make_key(tmp_path, "other")
    other = own_state(tmp_path, other_id)

    main(["key", "export", "--keyfile", str(keyfile), "--state-dir", str(other.path)])

    assert capsys.readouterr().out
    assert keysaved.saved_at(other.path) is None, "another backup's warning was silenced"
    missing = tmp_path / "nowhere"
    main(["key", "export", "--keyfile", str(keyfile), "--state-dir", str(missing)])
    assert not missing.exists()


def test_a_failed_export_marks_nothing(tmp_path, monkeypatch) -> None:
    keyfile, peer_id = make_key(tmp_path, "mine")
    state = own_state(tmp_path, peer_id)

    class Closed:
        def write(self, _text: str) -> int:
            raise BrokenPipeError("the reader went away")

        def flush(self) -> None:
            raise BrokenPipeError("the reader went away")

    monkeypatch.setattr("sys.stdout", Closed())
    with pytest.raises(BrokenPipeError):
        main(["key", "export", "--keyfile", str(keyfile), "--state-dir", str(state.path)])
    assert keysaved.saved_at(state.path) is None
