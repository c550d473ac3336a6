"""The command line around a mount: bad input gets one clear line and damages nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, force_unmount, is_mounted, require_fuse, run_cli
from mounthelpers import sh, wait_gone, write_file

from fluidfs import __version__, keys

pytestmark = pytest.mark.mount

PEER_ID = re.compile(r"\b[a-z2-7]{52}\b")


def one_line_error(result, code: int | None = None) -> str:
    """Assert the command failed with exactly one line on stderr (no traceback)."""
    assert result.returncode != 0, f"expected failure, got 0: {result.stdout}"
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return lines[0]


def mount_args(mnt: Mount, *, key: Path | None = None, path: Path | None = None) -> list[str]:
    return [
        "mount",
        str(path or mnt.path),
        "--state-dir",
        str(mnt.state),
        "--keyfile",
        str(key or mnt.keyfile),
        *mnt.extra,
    ]


@pytest.fixture(scope="module")
def populated_state(tmp_path_factory) -> Iterator[Mount]:
    """A state dir holding some data, made once: the refusal tests below each check it
    is still intact after their refusal, so they can take turns with one state."""
    require_fuse()
    root = tmp_path_factory.mktemp("populated")
    keyfile = root / "fluidfs.key"
    keys.write_keyfile(keyfile, keys.generate())
    mnt = Mount(root / "m-mnt", root / "m-state", keyfile, ["--block-size", "256K"])
    mnt.path.mkdir()
    try:
        mnt.mount()
        write_file(mnt.path / "precious", b"do not lose me" * 50_000, fsync=True)
        os.mkdir(mnt.path / "dir")
        (mnt.path / "dir/small").write_bytes(b"small")
        mnt.unmount()
        yield mnt
    finally:
        mnt.cleanup()


# What a refused mount may change in a state directory: its log (a line saying why) and
# LMDB's reader tables.
STATE_NOISE = ("fluidfs.log", "lock.mdb")
_known_good: dict[Path, dict[str, tuple[int, str]]] = {}


def state_files(state: Path) -> dict[str, tuple[int, str]]:
    """Every file of an unmounted state directory but STATE_NOISE: its mode and sha256."""
    found = {}
    for path in sorted(state.rglob("*")):
        if path.is_file() and not path.name.startswith(STATE_NOISE):
            found[str(path.relative_to(state))] = (
                path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture
def populated(populated_state: Mount) -> Iterator[Mount]:
    """The populated state, unmounted; left unmounted for the next test."""
    assert not is_mounted(populated_state.path)
    _known_good[populated_state.state] = state_files(populated_state.state)
    yield populated_state
    if is_mounted(populated_state.path):
        run_cli("unmount", str(populated_state.path))
        force_unmount(populated_state.path)


def assert_untouched(mnt: Mount) -> None:
    """A refused mount changed nothing in the state (which mounted and unmounted cleanly
    before it): every file but its log and LMDB's reader tables is as it was, byte for
    byte. (A real mount to check took a few seconds each: ``assert_intact`` does that
    where the test itself changed the state.)"""
    assert not is_mounted(mnt.path)
    before, now = _known_good[mnt.state], state_files(mnt.state)
    assert now.keys() == before.keys(), sorted(now.keys() ^ before.keys())
    changed = [name for name in now if now[name] != before[name]]
    assert not changed, changed


def assert_intact(mnt: Mount) -> None:
    """The state still mounts with the right key, and the data is all there."""
    assert not is_mounted(mnt.path)
    mnt.mount()
    assert (mnt.path / "precious").read_bytes() == b"do not lose me" * 50_000
    assert (mnt.path / "dir/small").read_bytes() == b"small"
    mnt.unmount()


# --- informational ----------------------------------------------------------------------


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"fluidfs {__version__}"


def test_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("init", "mount", "unmount"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.M), result.stdout
    result = run_cli("mount", "-h")
    assert result.returncode == 0
    for option in ("mountpoint", "--keyfile", "--state-dir", "--cache-size", "--allow-other"):
        assert option in result.stdout
    assert result.stderr == ""


# --- bad arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["--no-such-option"],
        ["mount"],
        ["mount", "/tmp", "--no-such-option"],
        ["mount", "/tmp", "--cache-size", "lots"],
        ["mount", "/tmp", "--cache-size", "-5G"],
        ["mount", "/tmp", "extra-positional"],
        ["init", "--shards", "0"],
        ["init", "--shards", "300"],
        ["init", "--shards", "twelve"],
        ["init", "--shards", "4", "--needed", "5"],
        ["unmount"],
    ],
    ids=lambda argv: " ".join(argv) or "(none)",
)
def test_bad_arguments_exit_2_with_one_line(argv: list[str]) -> None:
    line = one_line_error(run_cli(*argv), 2)
    assert line.startswith("fluidfs")


def test_unmount_of_something_else(tmp_path: Path) -> None:
    one_line_error(run_cli("unmount", str(tmp_path)), 2)
    one_line_error(run_cli("unmount", str(tmp_path / "missing")), 2)


# --- init -------------------------------------------------------------------------------


def test_init_writes_private_keyfile_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "new" / "my.key"
    result = run_cli("init", "--keyfile", str(path))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ids = PEER_ID.findall(result.stdout)
    assert ids, result.stdout
    ring = keys.KeyRing(keys.read_keyfile(path))
    assert ids[0] == ring.peer_id
    assert "WARNING" in result.stdout or "warning" in result.stderr.lower()
    assert "keep" in (result.stdout + result.stderr).lower()
    original = path.read_bytes()

    again = run_cli("init", "--keyfile", str(path))
    line = one_line_error(again)
    assert "exist" in line
    assert path.read_bytes() == original
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    # two inits make two different identities
    other = tmp_path / "other.key"
    assert run_cli("init", "--keyfile", str(other)).returncode == 0
    assert keys.KeyRing(keys.read_keyfile(other)).peer_id != ring.peer_id


def test_init_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a dir")
    one_line_error(run_cli("init", "--keyfile", str(tmp_path / "file" / "key")))


def test_init_keyfile_mounts_with_its_peer_id(tmp_path: Path, make_mount) -> None:
    path = tmp_path / "fresh.key"
    printed = PEER_ID.findall(run_cli("init", "--keyfile", str(path), check=True).stdout)[0]
    mnt = make_mount("fresh", key=path)
    mnt.mount()
    assert printed in (mnt.state / "fluidfs.log").read_text()
    assert (mnt.state / "identity").read_text().strip() == printed


# --- mount refusals ---------------------------------------------------------------------


def test_mount_with_missing_keyfile(populated: Mount, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.key"
    line = one_line_error(run_cli(*mount_args(populated, key=missing)))
    assert "nowhere.key" in line
    assert not missing.exists(), "an explicitly named keyfile must not be invented"
    assert_untouched(populated)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\n",
        b"fluidfs-key-1:\n",
        b"fluidfs-key-1:!!!!not base64!!!!\n",
        b"fluidfs-key-1:oWF2AQ\n",  # CBOR {"v": 1} and nothing else
        b"fluidfs-key-9:AAAA\n",
        b"\xff\xfe\x00binary",
        "TRUNCATE",
    ],
    ids=["empty", "garbage", "prefix-only", "bad-base64", "no-root", "future", "binary", "cut"],
)
def test_mount_with_corrupt_keyfile(populated: Mount, tmp_path: Path, content) -> None:
    bad = tmp_path / "bad.key"
    if content == "TRUNCATE":
        text = populated.keyfile.read_text().strip()
        content = text[: len(text) // 2].encode()
    bad.write_bytes(content)
    os.chmod(bad, 0o600)
    line = one_line_error(run_cli(*mount_args(populated, key=bad)))
    assert "keyfile" in line
    assert not is_mounted(populated.path)
    assert_untouched(populated)


def test_mount_with_keyfile_that_is_a_directory(populated: Mount, tmp_path: Path) -> None:
    one_line_error(run_cli(*mount_args(populated, key=tmp_path)))
    assert_untouched(populated)


def test_mount_with_wrong_keyfile(populated: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other.key"
    keys.write_keyfile(other, keys.generate())
    identity = (populated.state / "identity").read_text()
    logged_before = len((populated.state / "fluidfs.log").read_text())
    line = one_line_error(run_cli(*mount_args(populated, key=other)))
    assert "keyfile" in line or "belongs to" in line
    assert not is_mounted(populated.path)
    assert (populated.state / "identity").read_text() == identity
    log = (populated.state / "fluidfs.log").read_text()[logged_before:]
    assert "Traceback" not in log
    assert_untouched(populated)


@pytest.mark.parametrize("kind", ["missing", "file", "not-empty"])
def test_mount_on_bad_mountpoint(populated: Mount, tmp_path: Path, kind: str) -> None:
    where = tmp_path / f"bad-{kind}"
    if kind == "file":
        where.write_text("I am a file")
    elif kind == "not-empty":
        where.mkdir()
        (where / "something").write_text("already here")
    line = one_line_error(run_cli(*mount_args(populated, path=where)), 2)
    assert str(where) in line
    assert not is_mounted(where)
    if kind == "not-empty":
        assert os.listdir(where) == ["something"]
    assert_untouched(populated)


def test_second_mount_of_the_same_state(populated: Mount, tmp_path: Path) -> None:
    populated.mount()
    pid = populated.pid()
    second = tmp_path / "second-mnt"
    second.mkdir()
    line = one_line_error(run_cli(*mount_args(populated, path=second)))
    assert "in use" in line or "already" in line
    assert not is_mounted(second)
    # the same mount point again
    one_line_error(run_cli(*mount_args(populated)))
    # the first mount is untouched and still works
    assert populated.pid() == pid
    assert (populated.path / "dir/small").read_bytes() == b"small"
    write_file(populated.path / "after", b"written after the refusal", fsync=True)
    populated.unmount()
    assert_intact(populated)
    populated.mount()
    assert (populated.path / "after").read_bytes() == b"written after the refusal"


def test_mount_then_unmount_messages(make_mount) -> None:
    mnt = make_mount()
    result = mnt.mount()
    assert str(mnt.path) in result.stdout
    result = run_cli("unmount", str(mnt.path))
    assert result.returncode == 0
    assert not is_mounted(mnt.path)
    one_line_error(run_cli("unmount", str(mnt.path)), 2)


def test_the_mount_opens_before_the_page_loads_and_prints_its_address(make_mount) -> None:
    """The page's stack (Starlette, Hypercorn: a quarter of a CPU-second to import) loads
    once the mount is open, not beside the lease gate, whose work it held the GIL
    against, with the mount waiting for it (before: the page served first). `fluidfs
    mount` returns once the page's socket is bound and its address published (not once
    its stack serves: tests/fast/test_web.py), and prints that address."""
    mnt = make_mount()
    result = mnt.mount("--web", "127.0.0.1:0")
    assert "status and restore page: http://127.0.0.1:" in result.stdout, result.stdout
    lines = (mnt.state / "fluidfs.log").read_text().splitlines()
    mounted = next(i for i, line in enumerate(lines) if ": mounted " in line)
    page = next(i for i, line in enumerate(lines) if ": web page at " in line)
    assert mounted < page, "\n".join(lines[-20:])
    mnt.unmount()


def test_the_background_node_is_the_command_forked_and_detached(make_mount) -> None:
    """`fluidfs mount` forks its node rather than starting a second interpreter for it
    (that paid Python's start and this command's imports again: before, the node ran
    `python -m fluidfs mount --foreground --ready-fd N ...`). The child is detached as the
    re-exec was: a session of its own, stdin from /dev/null, stdout and stderr in the log."""
    mnt = make_mount()
    mnt.mount()
    pid = mnt.pid()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--foreground" not in argv and b"mount" in argv, argv
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    log = str(mnt.state / "fluidfs.log")
    assert os.readlink(f"/proc/{pid}/fd/1") == log and os.readlink(f"/proc/{pid}/fd/2") == log
    mnt.unmount()


# --- other users ------------------------------------------------------------------------

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fluidfs-public-"))
    os.chmod(path, 0o755)
    yield path
    for entry in path.iterdir():
        if entry.is_dir() and is_mounted(entry):
            sh("fusermount3", "-uz", entry, check=False)
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def _public_mount(public_dir: Path, tmp_path: Path, keyfile: Path, *extra: str) -> Mount:
    mnt = Mount(public_dir / "mnt", tmp_path / "public-state", keyfile, list(extra))
    mnt.path.mkdir()
    return mnt


def test_allow_other_enforces_modes(public_dir: Path, tmp_path: Path, keyfile: Path) -> None:
    mnt = _public_mount(public_dir, tmp_path, keyfile, "--allow-other")
    try:
        mnt.mount()
        write_file(mnt.path / "private", b"root only")
        os.chmod(mnt.path / "private", 0o600)
        write_file(mnt.path / "public", b"for everyone")
        os.chmod(mnt.path / "public", 0o644)
        os.mkdir(mnt.path / "shared", 0o777)
        os.chmod(mnt.path / "shared", 0o777)

        listing = sh(*AS_NOBODY, "ls", mnt.path)
        assert sorted(listing.stdout.split()) == ["private", "public", "shared"]
        denied = sh(*AS_NOBODY, "cat", mnt.path / "private", check=False)
        assert denied.returncode != 0
        assert "permission denied" in denied.stderr.lower()
        assert sh(*AS_NOBODY, "cat", mnt.path / "public").stdout == "for everyone"
        # nobody cannot create in root's 0755 directory, but can in a 0777 one
        refused = sh(*AS_NOBODY, "touch", mnt.path / "intruder", check=False)
        assert refused.returncode != 0 and "permission denied" in refused.stderr.lower()
        sh(*AS_NOBODY, "sh", "-c", f"echo mine > '{mnt.path / 'shared/theirs'}'")
        st = os.stat(mnt.path / "shared/theirs")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        # and cannot change what is not theirs
        chmod = sh(*AS_NOBODY, "chmod", "666", mnt.path / "public", check=False)
        assert chmod.returncode != 0
        assert stat.S_IMODE(os.stat(mnt.path / "public").st_mode) == 0o644
        # root still reads everything
        assert (mnt.path / "private").read_bytes() == b"root only"
        mnt.unmount()
    finally:
        mnt.cleanup()


def test_without_allow_other_other_users_are_shut_out(
    public_dir: Path, tmp_path: Path, keyfile: Path
) -> None:
    mnt = _public_mount(public_dir, tmp_path, keyfile)
    try:
        mnt.mount()
        write_file(mnt.path / "public", b"for everyone")
        denied = sh(*AS_NOBODY, "ls", mnt.path, check=False)
        assert denied.returncode != 0
        assert "permission denied" in denied.stderr.lower()
        mnt.unmount()
    finally:
        mnt.cleanup()


# --- paths with unusual characters ------------------------------------------------------


@pytest.fixture
def custom_mounts() -> Iterator[list[Mount]]:
    """Mounts made by hand (odd paths); unmounted and killed at teardown."""
    made: list[Mount] = []
    yield made
    for mnt in made:
        if os.path.ismount(mnt.path):
            sh("fusermount3", "-uz", mnt.path, check=False)
        mnt.cleanup()


def test_unmount_of_a_non_ascii_mountpoint(tmp_path: Path, keyfile: Path, custom_mounts) -> None:
    mnt = Mount(tmp_path / "Sauvegarde-été", tmp_path / "state", keyfile)
    custom_mounts.append(mnt)
    mnt.path.mkdir()
    mnt.mount()
    (mnt.path / "x").write_bytes(b"x")
    result = run_cli("unmount", str(mnt.path))
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(mnt.path)
    mnt.mount()
    assert (mnt.path / "x").read_bytes() == b"x"


def test_mount_with_a_non_ascii_state_dir(tmp_path: Path, keyfile: Path, custom_mounts) -> None:
    """Either it works, or it is refused with one clear line: never a crash in the log."""
    mnt = Mount(tmp_path / "mnt", tmp_path / "état-sauvegarde", keyfile)
    custom_mounts.append(mnt)
    mnt.path.mkdir()
    result = run_cli(*mount_args(mnt))
    log = mnt.log()
    if result.returncode == 0:
        (mnt.path / "x").write_bytes(b"x")
        mnt.unmount()
        mnt.mount()
        assert (mnt.path / "x").read_bytes() == b"x"
    else:
        one_line_error(result, 2)
    assert "Traceback" not in log, log


@pytest.mark.parametrize("kind", ["a-file", "under-a-file", "uncreatable", "foreign"])
def test_mount_with_unusable_state_dir(tmp_path: Path, keyfile: Path, kind: str) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    (tmp_path / "plain-file").write_text("not a directory")
    state = {
        "a-file": tmp_path / "plain-file",
        "under-a-file": tmp_path / "plain-file" / "state",
        "uncreatable": Path("/proc/fluidfs-no-such-dir/state"),
        "foreign": tmp_path / "foreign",
    }[kind]
    if kind == "foreign":
        state.mkdir()
        (state / "format").write_text("something-else-entirely\n")
    result = run_cli("mount", str(mountpoint), "--state-dir", str(state), "--keyfile", str(keyfile))
    line = one_line_error(result)
    assert str(state) in line or "state" in line
    assert not is_mounted(mountpoint)
    assert (tmp_path / "plain-file").read_text() == "not a directory"
    if kind == "foreign":
        assert (state / "format").read_text() == "something-else-entirely\n"


def test_after_a_crash_the_dead_mount_is_reported_and_unmountable(populated: Mount) -> None:
    """kill -9 leaves a dead FUSE mount ("transport endpoint is not connected") behind.
    Mounting there again must say so in one line (or take it over); `fluidfs unmount`
    must clear it; then the state mounts again with everything fsynced in it."""
    populated.mount()
    write_file(populated.path / "late", b"fsynced before the crash", fsync=True)
    pid = populated.pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    assert is_mounted(populated.path)  # dead, but still in the mount table
    result = run_cli(*mount_args(populated))
    if result.returncode != 0:
        line = one_line_error(result)
        assert str(populated.path) in line
        result = run_cli("unmount", str(populated.path))
        assert result.returncode == 0, result.stderr
        assert not is_mounted(populated.path)
        populated.mount()
    else:
        populated.pids.append(populated.pid())
    assert (populated.path / "late").read_bytes() == b"fsynced before the crash"
    assert (populated.path / "dir/small").read_bytes() == b"small"


def test_unmount_through_the_path_it_was_mounted_with(
    tmp_path: Path, keyfile: Path, custom_mounts
) -> None:
    """A mount point reached through a symlink (e.g. a symlinked home) unmounts by the
    same path the user mounted it with."""
    real = tmp_path / "real-mnt"
    real.mkdir()
    link = tmp_path / "Backup"
    link.symlink_to(real)
    mnt = Mount(real, tmp_path / "state", keyfile)
    custom_mounts.append(mnt)
    result = run_cli("mount", str(link), "--state-dir", str(mnt.state), "--keyfile", str(keyfile))
    assert result.returncode == 0, result.stderr
    mnt.pids.append(mnt.pid())
    assert is_mounted(real)
    (link / "x").write_bytes(b"x")
    result = run_cli("unmount", str(link))
    assert result.returncode == 0, result.stderr
    assert not is_mounted(real)
