"""The user unit's command lines really mount and unmount (issue 14, "starting at login").

The unit comes from `fluidfs service install --print`; its ExecStart runs as systemd
would run it (the main process, in the foreground), ExecStop as systemd runs it at
logout, and SIGTERM, what systemd sends when ExecStop could not unmount, is tried too.
Only ``--listen``/``--web`` on free ports are added: the default ports are shared here.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
from pathlib import Path

from conftest import FLUIDFS, require_fuse
from mounthelpers import write_file
from peerhelpers import wait_for

from fluidfs import keys
from fluidfs.statedir import StateDir

FREE_PORTS = ["--listen", "127.0.0.1:0", "--web", "127.0.0.1:0", "--no-upnp"]


def exec_lines(text: str, key: str) -> list[list[str]]:
    """The argv systemd makes of each of the unit's *key*= lines (quotes, %% and $$
    undone), in order."""
    return [[w.replace("%%", "%").replace("$$", "$") for w in shlex.split(x[len(key) + 1:])]
            for x in text.splitlines() if x.startswith(key + "=")]


def exec_words(text: str, key: str) -> list[str]:
    """The argv of the unit's one *key*= line."""
    (words,) = exec_lines(text, key)
    return words


def run_start_pre(unit: str) -> None:
    """The unit's ExecStartPre lines, as systemd runs them: a failure stops the start
    unless the line begins with '-'."""
    for words in exec_lines(unit, "ExecStartPre"):
        ignore = words[0].startswith("-")
        result = subprocess.run([words[0].removeprefix("-"), *words[1:]], capture_output=True,
                                text=True, timeout=60)
        assert ignore or result.returncode == 0, (words, result.stdout, result.stderr)


def dead(path: Path) -> bool:
    """The FUSE connection at *path* is gone (ENOTCONN; statfs is never cached)."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def installed_unit(tmp_path: Path) -> tuple[str, Path, Path]:
    """`fluidfs service install --print` for a fresh backup: (unit, mountpoint, state)."""
    mnt, state, key = tmp_path / "my backup", tmp_path / "state", tmp_path / "fluidfs.key"
    keyfile = keys.generate()
    keys.write_keyfile(key, keyfile)
    StateDir(state).mark_new_key(keys.KeyRing(keyfile).peer_id)  # as `fluidfs init` does
    unit = subprocess.run([*FLUIDFS, "service", "install", str(mnt), "--keyfile", str(key),
                           "--state-dir", str(state), "--print"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    return unit, mnt, state


def test_the_units_start_and_stop_lines_mount_and_unmount_cleanly(tmp_path: Path) -> None:
    require_fuse()
    unit, mnt, _state = installed_unit(tmp_path)
    start, stop = exec_words(unit, "ExecStart") + FREE_PORTS, exec_words(unit, "ExecStop")
    log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 - closed below

    def start_node() -> subprocess.Popen:
        run_start_pre(unit)
        node = subprocess.Popen(start, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for(lambda: os.path.ismount(mnt) or node.poll() is not None, 60, "the mount")
        assert os.path.ismount(mnt), (tmp_path / "node.log").read_text()[-3000:]
        return node

    node = None
    try:
        node = start_node()
        data = os.urandom(300_000)
        write_file(mnt / "kept.bin", data)
        stopped = subprocess.run(stop, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not os.path.ismount(mnt)
        assert node.wait(timeout=30) == 0, "the unit's main process must end cleanly"

        node = start_node()  # the next login
        assert (mnt / "kept.bin").read_bytes() == data
        write_file(mnt / "second.txt", b"written before a SIGTERM\n")
        node.send_signal(signal.SIGTERM)  # systemd's stop when ExecStop failed
        assert node.wait(timeout=120) == 0
        assert not os.path.ismount(mnt)

        node = start_node()
        assert (mnt / "second.txt").read_bytes() == b"written before a SIGTERM\n"
        assert subprocess.run(stop, capture_output=True, timeout=120).returncode == 0
        assert node.wait(timeout=30) == 0
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if node is not None and node.poll() is None:
            node.kill()
        log.close()


def test_a_restart_clears_the_dead_mount_a_crash_left_but_never_a_live_one(
        tmp_path: Path) -> None:
    require_fuse()
    unit, mnt, state = installed_unit(tmp_path)
    start = exec_words(unit, "ExecStart") + FREE_PORTS
    clear = exec_lines(unit, "ExecStartPre")[0]
    log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 - closed below

    def start_node() -> subprocess.Popen:
        run_start_pre(unit)
        node = subprocess.Popen(start, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for(lambda: os.path.ismount(mnt) or node.poll() is not None, 60, "the mount")
        assert os.path.ismount(mnt), (tmp_path / "node.log").read_text()[-3000:]
        return node

    node = None
    try:
        node = start_node()
        data = os.urandom(200_000)
        write_file(mnt / "acknowledged.bin", data, fsync=True)
        # A live mount is left alone: the clearing line answers 0 and changes nothing.
        assert subprocess.run(clear, capture_output=True, timeout=60).returncode == 0
        assert (mnt / "acknowledged.bin").read_bytes() == data

        node.kill()  # the crash: the kernel's FUSE connection dies with the process
        node.wait(timeout=30)
        assert dead(mnt), "a killed node leaves a dead mount"
        other = subprocess.run([*clear[:-2], "--state-dir", str(tmp_path / "other")],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and dead(mnt), "another state directory's is left"
        assert "another state directory" in other.stderr

        node = start_node()  # what Restart=on-failure does: ExecStartPre, then ExecStart
        assert (mnt / "acknowledged.bin").read_bytes() == data
        stopped = subprocess.run(exec_words(unit, "ExecStop"), capture_output=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert node.wait(timeout=30) == 0
    finally:
        if os.path.ismount(mnt) or dead(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        if node is not None and node.poll() is None:
            node.kill()
        log.close()
        assert state.exists()
