"""A first run of `fluidfs serve` on a fresh machine goes like a first run of `fluidfs mount`.

No keyfile, no state: both create the keyfile at the default place, say to keep a copy,
and mark it new for the state directory, so the machine's first mount there starts a new
backup at once instead of waiting for peers to confirm that none exists. Real processes
in a temporary HOME.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import FLUIDFS, Mount, is_mounted, require_fuse, run_cli
from peerhelpers import Peer, wait_for

from fluidfs import keys

pytestmark = [pytest.mark.mount, pytest.mark.network]


def fresh_home(tmp_path: Path) -> dict[str, str]:
    """The environment of a user who has never run fluidfs (defaults under $HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env["HOME"] = str(tmp_path / "home")
    os.mkdir(env["HOME"])
    return env


def test_serve_first_run_makes_the_keyfile_like_mount(tmp_path: Path) -> None:
    require_fuse()
    env = fresh_home(tmp_path)
    home = Path(env["HOME"])
    keyfile = home / ".config/fluidfs/fluidfs.key"
    state = home / ".local/share/fluidfs"
    helper = Peer(tmp_path, "helper").start()
    errors = tmp_path / "serve.err"
    mnt = Mount(tmp_path / "mnt", state, keyfile)
    mnt.path.mkdir()
    try:
        with open(errors, "wb") as err:
            serve = subprocess.Popen(
                [*FLUIDFS, "serve", "--listen", "127.0.0.1:0"],
                env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )
        try:
            wait_for(lambda: (state / "listen").exists() or serve.poll() is not None, 20,
                     "serve to listen")
            assert serve.poll() is None, errors.read_text()
        finally:
            serve.terminate()
            serve.wait(timeout=20)
        said = errors.read_text()
        assert f"created a new keyfile at {keyfile}" in said, said
        assert "keep a copy of it somewhere safe" in said, said
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700

        # This machine's first mount, with the keyfile serve made and a peer that knows no
        # backup of it: it starts a new backup at once, as after a mount-made keyfile.
        result = run_cli("mount", str(mnt.path), "--peer", helper.addr, "--listen",
                         "127.0.0.1:0", "--restore-wait", "3", env=env)
        assert result.returncode == 0, result.stderr + mnt.log()
        mnt.pids.append(mnt.pid())
        assert is_mounted(mnt.path)
        (mnt.path / "first.txt").write_text("new backup\n")
        assert "created a new keyfile" not in result.stderr
        peer_id = keys.KeyRing(keys.read_keyfile(keyfile)).peer_id
        assert (state / "identity").read_text().strip() == peer_id
        mnt.unmount()
    finally:
        mnt.cleanup()
        helper.kill()
