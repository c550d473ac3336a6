"""``fluidfs mount`` (in this process or a background one) and ``fluidfs unmount``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from fluidfs import keys as keymod
from fluidfs.cli.common import EXIT_USAGE, fail, state_dir
from fluidfs.cli.firstrun import check_state_dir, load_or_create_keyfile
from fluidfs.cli.prefetch import node_files, read_ahead
from fluidfs.statedir import FSNAME_PREFIX, StateDir, StateError, state_dir_from_fsname
from fluidfs.web.token import read_url


def _check_mountpoint(path: Path) -> None:
    try:
        os.stat(path)
    except FileNotFoundError:
        fail(f"mount point {path} does not exist", EXIT_USAGE)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            fail(f"{path} is a dead mount left by a crash: run 'fluidfs unmount {path}' first")
        fail(f"cannot use mount point {path}: {exc.strerror}", EXIT_USAGE)
    if not path.is_dir():
        fail(f"mount point {path} is not a directory", EXIT_USAGE)
    if os.path.ismount(path):
        if connection_dead(path):
            fail(f"{path} is a dead mount left by a crash: run 'fluidfs unmount {path}' first")
        fail(f"{path} is already a mount point", EXIT_USAGE)
    try:
        if any(os.scandir(path)):
            fail(f"mount point {path} is not empty", EXIT_USAGE)
    except PermissionError:
        fail(f"cannot read mount point {path}", EXIT_USAGE)


def cmd_mount(args: argparse.Namespace) -> None:
    """fluidfs mount: check everything, then mount (in a background process by default)."""
    mountpoint = args.mountpoint.expanduser().absolute()
    _check_mountpoint(mountpoint)
    state = state_dir(args)
    check_state_dir(state)
    if args.block_size < 64 * 1024 or args.block_size > 64 << 20:
        fail("--block-size must be between 64K and 64M", EXIT_USAGE)
    keyring = load_or_create_keyfile(args.keyfile, state)
    if state.is_locked():
        pid = state.running_pid()
        fail(
            f"state directory {state.path} is already in use"
            + (f" by fluidfs pid {pid}" if pid else "")
        )
    if not os.path.exists("/dev/fuse"):
        fail("/dev/fuse is missing: install fuse3 and load the fuse module")
    if args.foreground:
        run_foreground(args, mountpoint, state, keyring)
    else:
        run_background(args, mountpoint, state, keyring)


def import_node() -> None:
    """Import what a node process runs: trio, pyfuse3 and the node's parts.

    Only the process that runs the node loads them; the parent of a background mount
    and `fluidfs unmount` do not wait for them (run_foreground's own imports of these
    names then find them loaded). pyfuse3 first, before anything imports it the plain
    way: fs/fuseimport.py keeps importlib.metadata out of a fresh mount's start."""
    from fluidfs.fs.fuseimport import import_pyfuse3

    import_pyfuse3()
    import trio  # noqa: F401

    from fluidfs.cli import nodeargs  # noqa: F401
    from fluidfs.node import gctune, session  # noqa: F401


def run_foreground(
    args: argparse.Namespace,
    mountpoint: Path,
    state: StateDir,
    keyring: keymod.KeyRing,
    *,
    ready_fd: int | None = None,
) -> None:
    """Run the node in this process until it is unmounted; a background mount's node
    reports "ok", "error: ..." or "wait: ..." lines on *ready_fd*."""
    import_node()
    import trio

    from fluidfs.cli.nodeargs import add_pinned, mount_config, setup_node_process
    from fluidfs.node import gctune
    from fluidfs.node.node import Node
    from fluidfs.node.session import MountError

    setup_node_process(args.log_file)

    def report(message: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            try:
                os.write(ready_fd, message.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass
            ready_fd = None

    try:
        config = mount_config(args, keyring, state)
        node = Node(config)
    except StateError as exc:
        report(f"error: {exc}")
        fail(str(exc))
    add_pinned(node, config.remount.pinned)
    def progress(line: str) -> None:
        """A line for the person mounting: on the parent's stderr through the ready pipe,
        or on ours in the foreground."""
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"wait: {line}\n".encode())
        else:
            print(f"fluidfs: {line}", file=sys.stderr, flush=True)

    gctune.tune()
    try:
        trio.run(
            lambda: node.mount(
                mountpoint,
                allow_other=args.allow_other,
                on_ready=lambda: report("ok"),
                on_progress=progress,
            )
        )
    except MountError as exc:
        report(f"error: {exc}")
        fail(str(exc))
    finally:
        node.close()


def run_background(
    args: argparse.Namespace, mountpoint: Path, state: StateDir, keyring: keymod.KeyRing
) -> None:
    """Start the node as a detached process; return once the mount is usable.

    The node is this process forked, not a new interpreter: the keyfile, the checks and
    the modules loaded so far carry over (a re-exec paid the interpreter's start and
    this command's imports again). Nothing here has started a thread or imported trio,
    so the child starts clean.
    """
    read_fd, write_fd = os.pipe()
    # The child logs through a rotating handler on the same file, which takes over its
    # stdout and stderr; until then (and for a crash at start) they append here.
    log_fd = os.open(state.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_forked(args, mountpoint, state, keyring, write_fd, log_fd)
    os.close(write_fd)
    os.close(log_fd)
    # Idle until the node answers: meanwhile have the kernel read the node's modules
    # from disk ahead of its imports (a cold page cache: prefetch.py).
    read_ahead(node_files())
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.readline().decode().strip()
        while answer.startswith("wait: "):  # the lease countdown, a line a second
            print(f"fluidfs: {answer[len('wait: '):]}", file=sys.stderr, flush=True)
            answer = pipe.readline().decode().strip()
    if answer == "ok":
        print(f"fluidfs: mounted {mountpoint} (pid {pid}, log {state.log})")
        url = None if args.no_web else read_url(state.path)
        if url:
            print(f"fluidfs: status and restore page: {url}")
        return
    code = _exit_code(pid, timeout=30)
    if answer.startswith("error: "):
        fail(answer[len("error: ") :])
    fail(f"the mount process exited early (code {code}); see {state.log}")


def _run_forked(
    args: argparse.Namespace,
    mountpoint: Path,
    state: StateDir,
    keyring: keymod.KeyRing,
    ready_fd: int,
    log_fd: int,
) -> NoReturn:
    """The forked child: detach (a session of its own, no terminal), run the node in the
    foreground reporting on *ready_fd*, and exit without returning into the command."""
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        resolved = argparse.Namespace(**{
            **vars(args),
            "mountpoint": mountpoint,
            "state_dir": state.path,
            "keyfile": args.keyfile.absolute() if args.keyfile is not None else None,
            "foreground": True,
            "log_file": state.log,
        })
        run_foreground(resolved, mountpoint, state, keyring, ready_fd=ready_fd)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _exit_code(pid: int, timeout: float) -> int | None:
    """The exit code of our child *pid* once it exits (None if it runs on past *timeout*)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


# --- unmount --------------------------------------------------------------------------


def _unescape_mountinfo(field: bytes) -> str:
    """Undo the octal escapes (\\040 and friends) of /proc/self/mountinfo."""
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
    return os.fsdecode(raw)


def find_mount_source(mountpoint: Path) -> str | None:
    """The fsname of the FUSE mount at *mountpoint*, from /proc/self/mountinfo."""
    target = str(mountpoint)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, sep, right = line.partition(b" - ")
            if sep and _unescape_mountinfo(left.split()[4]) == target:
                return _unescape_mountinfo(right.split()[1])
    return None


def connection_dead(path: Path) -> bool:
    """Whether *path* is a FUSE mount whose node is gone: the kernel answers ENOTCONN
    ("Transport endpoint is not connected"). A live mount, a plain folder or a missing
    path is not. statfs, because the kernel answers stat of the root from its cache."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def clear_dead_mount(mountpoint: Path, state: StateDir) -> None:
    """`fluidfs unmount --if-dead` (the user unit's ExecStartPre): unmount what a crash of
    this state directory's node left at *mountpoint*, so the unit's restart can mount.

    Only a dead connection is cleared, and only one this state directory mounted (its
    fsname): a live mount, another backup's or another filesystem's mount is left alone
    (then the mount itself refuses, and says why). Nothing can be lost: a dead connection
    reaches no node, and what it acknowledged is in the state directory.
    """
    if not connection_dead(mountpoint):
        return
    source = find_mount_source(mountpoint)
    if source is None or not source.startswith(FSNAME_PREFIX):
        fail(f"{mountpoint} is a dead mount, but not fluidfs's: left alone")
    ours = os.path.realpath(state.path)
    if os.path.realpath(state_dir_from_fsname(source)) != ours:
        fail(f"{mountpoint} is a dead mount of another state directory "
             f"({state_dir_from_fsname(source)}, not {ours}): left alone")
    # A process whose working directory was inside keeps a dead mount busy: detach it
    # then (-z); nothing is served through it anyway.
    for flags in ("-u", "-uz"):
        result = subprocess.run(["fusermount3", flags, str(mountpoint)], capture_output=True,
                                text=True)
        if result.returncode == 0:
            print(f"fluidfs: cleared the dead mount at {mountpoint} left by a crash")
            return
    fail(f"cannot clear the dead mount at {mountpoint}: {result.stderr.strip()}")


def cmd_unmount(args: argparse.Namespace) -> None:
    """fluidfs unmount: unmount, then wait for the node to seal and exit."""
    mountpoint = Path(os.path.realpath(args.mountpoint.expanduser()))
    if args.if_dead:
        # Resolve the parent only: looking into a dead mount fails.
        given = Path(os.path.abspath(args.mountpoint.expanduser()))
        clear_dead_mount(Path(os.path.realpath(given.parent)) / given.name, state_dir(args))
        return
    source = find_mount_source(mountpoint)
    if source is None or not source.startswith(FSNAME_PREFIX):
        fail(f"{mountpoint} is not a fluidfs mount", EXIT_USAGE)
    state = StateDir(state_dir_from_fsname(source))
    pid = state.running_pid()
    result = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"cannot unmount {mountpoint}: {result.stderr.strip() or 'fusermount3 failed'}")
    deadline = time.monotonic() + args.timeout
    while state.is_locked():
        if time.monotonic() > deadline:
            fail(f"unmounted, but fluidfs (pid {pid}) is still flushing; it will finish alone")
        time.sleep(0.05)
    print(f"fluidfs: unmounted {mountpoint}")
