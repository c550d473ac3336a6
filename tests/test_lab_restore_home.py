"""Restore in another home (issue 12): a backup made behind one NAT router is restored by a
fresh machine behind another, with nothing but the keyfile.

Every node is a real process in its own network namespace (tests/netlab.py,
tests/labnodes.py); both mounts are real FUSE mounts.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from labnodes import PORT, LabMount, LabPeer, cli, start_all
from netlab import Lab, lab_fixture  # noqa: F401 - the lab fixture
from peerhelpers import status, wait_for

from fluidfs import keys

QUICK = ["--reach-interval", "1", "--audit-interval", "1", "--tolerance", "600"]


@pytest.fixture
def small_keyfile(tmp_path: Path) -> Path:
    """4 shards per block, 2 needed: four peers give full redundancy."""
    path = tmp_path / "small.key"
    keys.write_keyfile(path, keys.generate(shards_total=4, shards_needed=2))
    return path


def write_tree(root: Path) -> None:
    """A small home directory: nested folders, empty and multi-block files, a symlink."""
    (root / "photos" / "2026").mkdir(parents=True)
    (root / "docs" / "empty-dir").mkdir(parents=True)
    (root / "docs" / "notes.txt").write_text("remember the keyfile\n")
    (root / "docs" / "empty.txt").write_bytes(b"")
    (root / "photos" / "2026" / "a.jpg").write_bytes(os.urandom(700_000))
    (root / "photos" / "2026" / "b.jpg").write_bytes(os.urandom(1_300_000))
    (root / "photos" / "latest.jpg").symlink_to("2026/b.jpg")
    for i in range(20):
        (root / "docs" / f"letter-{i:02}.txt").write_text(f"letter {i}\n" * (i * 50 + 1))


def test_a_fresh_mount_in_another_nated_home_restores_the_tree(
    lab: Lab, tmp_path: Path, small_keyfile: Path, make_mount
) -> None:
    """A mount behind a UPnP router backs up a tree to four public peers; a fresh machine
    behind another NAT router, one without UPnP (it can dial out, nobody can dial in),
    mounts from the exported keyfile alone and `diff -r` finds no difference. (The
    second home's machine has never been seen by any peer, under a different public
    address: identity is the keyfile, never the address.)"""
    peers = start_all([LabPeer(lab.public(f"p{i}"), tmp_path, list(QUICK)) for i in range(4)])
    home_a = lab.home("ha", upnp=True)
    home_b = lab.home("hb", upnp=False)
    extra = ["--block-size", "256K", "--listen", f"0.0.0.0:{PORT}", "--donate", "64M", *QUICK]
    for peer in peers:
        extra += ["--peer", peer.addr]
    a = make_mount("a", key=small_keyfile, extra=extra)
    a.__class__ = LabMount
    a.host = home_a.host("pc")
    a.mount()
    wait_for(lambda: status(a.state)["peers_with_agreements"] == 4, 60, "4 agreements")
    source = tmp_path / "source"
    source.mkdir()
    write_tree(source)
    subprocess.run(["cp", "-a", f"{source}/.", str(a.path)], check=True, timeout=60)
    synced = cli("sync", "--json", "--state-dir", str(a.state), timeout=180)
    assert synced.returncode == 0, synced.stderr + a.log()
    wait_for(lambda: (lambda s: s["under_replicated"] == 0 and s["unsealed_bytes"] == 0
                      and set(s["redundancy"]) == {"4"})(status(a.state)),
             90, "every block on 4 peers")
    exported = cli("key", "export", "--with-peers", "--keyfile", str(small_keyfile),
                   "--state-dir", str(a.state))
    assert exported.returncode == 0, exported.stderr
    a.unmount()  # the first home's machine is gone (stolen, broken)

    key_b = tmp_path / "exported.key"
    key_b.write_text(exported.stdout)
    b = make_mount("b", key=key_b, extra=["--listen", f"0.0.0.0:{PORT}", "--donate", "64M",
                                          "--restore-wait", "3", *QUICK])
    b.__class__ = LabMount
    b.host = home_b.host("laptop")
    b.mount()
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(source), str(b.path)],
                          capture_output=True, text=True, timeout=120)
    assert diff.returncode == 0, diff.stdout + diff.stderr + b.log()
    assert (b.path / "photos" / "latest.jpg").readlink() == Path("2026/b.jpg")
