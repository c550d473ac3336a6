"""The ``fluidfs`` command line."""

from __future__ import annotations

import argparse
import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from fluidfs import __version__
from fluidfs import keys as keymod
from fluidfs.statedir import (
    FSNAME_PREFIX,
    StateDir,
    StateError,
    default_data_dir,
    default_keyfile,
    state_dir_from_fsname,
)
from fluidfs.sysutil import tune_malloc

EXIT_USAGE = 2
EXIT_FAIL = 1

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse '512M', '2G', '1GiB', '4096' into bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _shard_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be between 1 and 256: {value}")
    return value


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    """Print one line to stderr and exit."""
    print(f"fluidfs: {message}", file=sys.stderr)
    sys.exit(code)


def _address(text: str) -> str:
    from fluidfs.peers.connections import split_addr

    try:
        split_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _peer_entry(text: str) -> str:
    try:
        keymod.parse_peer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _trust_policy(text: str):
    from fluidfs.peers.trust import parse_policy

    try:
        return parse_policy(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _net_limits(text: str):
    """--net-limits K=V,...: network limits (fluidfs/net/limits.py); tests shrink timeouts."""
    from fluidfs.net.limits import parse_limits

    try:
        return parse_limits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _peer_options(parser: argparse.ArgumentParser, *, listen_default: str | None) -> None:
    parser.add_argument(
        "--listen",
        type=_address,
        default=listen_default,
        help="HOST:PORT where peers reach this node"
        + (f" (default {listen_default})" if listen_default else ""),
    )
    parser.add_argument(
        "--donate",
        type=parse_size,
        default="16G",
        help="space this node offers to peers (default 16G)",
    )
    parser.add_argument(
        "--peer",
        type=_peer_entry,
        action="append",
        default=[],
        metavar="[PEERID@]HOST:PORT",
        help="a peer to start from (repeatable); with PEERID, only that peer is accepted there",
    )
    parser.add_argument("--ratio", type=float, default=1.5, help=argparse.SUPPRESS)
    parser.add_argument("--term", type=int, default=24 * 3600, help=argparse.SUPPRESS)
    # Verification and repair knobs (seconds); tests shrink a day to seconds.
    parser.add_argument("--audit-interval", type=float, default=3600.0, help=argparse.SUPPRESS)
    parser.add_argument("--tolerance", type=float, default=24 * 3600.0, help=argparse.SUPPRESS)
    parser.add_argument("--keep-shards", type=float, default=24 * 3600.0, help=argparse.SUPPRESS)
    parser.add_argument("--repair-threshold", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--placement", choices=["trust", "even"], default="trust", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--trust", type=_trust_policy, default="", metavar="K=V,...",
        help="trust model parameters, e.g. rise=1.05,fall=0.7,referral_share=0.1 "
        "(see docs/decisions.md)",
    )
    parser.add_argument(
        "--repair-bandwidth", type=parse_size, default="64M", help=argparse.SUPPRESS
    )


def build_parser() -> Parser:
    """The argument parser for every command."""
    parser = Parser(prog="fluidfs", description="Peer-to-peer encrypted backup filesystem.")
    parser.add_argument("--version", action="version", version=f"fluidfs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True

    init = commands.add_parser("init", help="make a new keyfile")
    init.add_argument("--keyfile", type=Path, default=None, help="where to write it")
    init.add_argument("--shards", type=_shard_count, default=12, help="shards per block (N)")
    init.add_argument("--needed", type=_shard_count, default=8, help="shards to rebuild (K)")
    init.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the state directory this keyfile's first mount will use: that mount starts a "
        "new backup without asking peers (default: the default one, for the default keyfile)",
    )

    mount = commands.add_parser("mount", help="mount the backup folder")
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument("--keyfile", type=Path, default=None)
    mount.add_argument("--state-dir", type=Path, default=None)
    mount.add_argument(
        "--cache-size", type=parse_size, default="1G", help="plaintext cache bound (default 1G)"
    )
    mount.add_argument("--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other local users use the mount (modes are enforced)",
    )
    mount.add_argument("--block-size", type=parse_size, default="4M", help=argparse.SUPPRESS)
    mount.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    mount.add_argument("--log-file", type=Path, default=None, help=argparse.SUPPRESS)
    _peer_options(mount, listen_default=None)
    from fluidfs.cli import remount as cli_remount

    cli_remount.add_mount_options(mount)

    serve = commands.add_parser("serve", help="run a peer that donates space (no mount)")
    serve.add_argument("--keyfile", type=Path, default=None)
    serve.add_argument("--state-dir", type=Path, default=None)
    serve.add_argument(
        "--log-file", type=Path, default=None, help="log here, rotated (default: stderr)"
    )
    _peer_options(serve, listen_default="0.0.0.0:7470")
    serve.add_argument("--fault-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    serve.add_argument("--lie-on-retrieve", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--net-limits", type=_net_limits, default=None, help=argparse.SUPPRESS)

    testnet = commands.add_parser("testnet", help="run a local network of peers to try fluidfs")
    testnet.add_argument("--peers", type=_shard_count, default=12, help="how many (default 12)")
    testnet.add_argument("--base-port", type=int, default=7471, help="first port (default 7471)")
    testnet.add_argument("--dir", type=Path, default=None, help="where their state lives")
    testnet.add_argument("--donate", type=parse_size, default="2G", help="space per peer")

    ident = commands.add_parser("id", help="print this node's peer id")
    ident.add_argument("--keyfile", type=Path, default=None)

    peers = commands.add_parser("peers", help="list peers, or add one (peers add HOST:PORT)")
    peers.add_argument("action", nargs="?", choices=["list", "add"], default="list")
    peers.add_argument("addr", nargs="?", type=_address, help="HOST:PORT (with add)")
    peers.add_argument("--state-dir", type=Path, default=None)
    peers.add_argument("--json", action="store_true", help="machine-readable output")

    check = commands.add_parser("check", help="is every file recoverable, and how safely?")
    check.add_argument(
        "--read-data", action="store_true", help="rebuild and verify every block from its shards"
    )
    check.add_argument("--state-dir", type=Path, default=None)

    status = commands.add_parser("status", help="what the running node is doing")
    status.add_argument("--state-dir", type=Path, default=None)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    cli_remount.add_commands(commands)

    unmount = commands.add_parser("unmount", help="flush and unmount")
    unmount.add_argument("mountpoint", type=Path)
    unmount.add_argument("--timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fluidfs`` command."""
    args = build_parser().parse_args(argv)
    from fluidfs.cli import network as cli_network
    from fluidfs.cli import remount as cli_remount

    handlers = {
        "init": cmd_init,
        "mount": cmd_mount,
        "unmount": cmd_unmount,
        "serve": cli_network.cmd_serve,
        "id": cli_network.cmd_id,
        "peers": cli_network.cmd_peers,
        "status": cli_network.cmd_status,
        "testnet": cli_network.cmd_testnet,
        "check": cli_network.cmd_check,
        **cli_remount.HANDLERS,
    }
    try:
        handlers[args.command](args)
    except KeyboardInterrupt:
        sys.exit(130)


# --- init -----------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    """fluidfs init: make a new keyfile."""
    if args.needed > args.shards:
        fail(f"--needed ({args.needed}) cannot exceed --shards ({args.shards})", EXIT_USAGE)
    path = (args.keyfile or default_keyfile()).absolute()
    if path.exists():
        fail(f"{path} already exists; refusing to overwrite a keyfile")
    keyfile = keymod.generate(args.shards, args.needed)
    try:
        keymod.write_keyfile(path, keyfile)
    except OSError as exc:
        fail(f"cannot write keyfile {path}: {exc}")
    ring = keymod.KeyRing(keyfile)
    state_path = args.state_dir or (default_data_dir() if args.keyfile is None else None)
    if state_path is not None:
        try:
            StateDir(state_path.expanduser()).mark_new_key(ring.peer_id)
        except OSError as exc:
            fail(f"cannot use state directory {state_path}: {exc}")
    print(f"keyfile: {path}")
    print(f"peer id: {ring.peer_id}")
    print(f"coding:  {args.shards} shards per block, any {args.needed} rebuild it")
    print("WARNING: this keyfile is the only way to get your data back. Keep a copy somewhere")
    print("         safe, off this machine. If it is lost, the backup is lost with it.")


def load_or_create_keyfile(path: Path | None, state: StateDir | None = None) -> keymod.KeyRing:
    """Read the keyfile; create one at the default place if none was named or exists.

    A keyfile created here is new for *state*: its first mount there starts a new
    backup without asking peers whether one exists (statedir.py, ``new-key``).
    """
    explicit = path is not None
    path = (path or default_keyfile()).absolute()
    if not path.exists() and not explicit:
        created = keymod.generate()
        keymod.write_keyfile(path, created)
        if state is not None:
            state.mark_new_key(keymod.KeyRing(created).peer_id)
        print(f"fluidfs: created a new keyfile at {path}", file=sys.stderr)
        print(
            "fluidfs: keep a copy of it somewhere safe: without it the backup cannot be recovered",
            file=sys.stderr,
        )
    try:
        return keymod.KeyRing(keymod.read_keyfile(path))
    except keymod.KeyfileError as exc:
        fail(str(exc))


# --- mount ----------------------------------------------------------------------------


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
        fail(f"{path} is already a mount point", EXIT_USAGE)
    try:
        if any(os.scandir(path)):
            fail(f"mount point {path} is not empty", EXIT_USAGE)
    except PermissionError:
        fail(f"cannot read mount point {path}", EXIT_USAGE)


def _check_state_dir(state: StateDir) -> None:
    """Create the state directory if needed; one clear line if it cannot be used."""
    try:
        state.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        fail(f"state directory {state.path} is not a directory", EXIT_USAGE)
    except OSError as exc:
        fail(f"cannot create state directory {state.path}: {exc.strerror}", EXIT_USAGE)
    if not state.path.is_dir():
        fail(f"state directory {state.path} is not a directory", EXIT_USAGE)
    if not os.access(state.path, os.W_OK | os.X_OK):
        fail(f"state directory {state.path} is not writable", EXIT_USAGE)
    if state.foreign():
        fail(f"{state.path} holds state of an unknown format")
    try:
        loose = state.make_private()
    except OSError as exc:
        fail(f"cannot make state directory {state.path} private: {exc.strerror}", EXIT_USAGE)
    if loose is not None:
        print(
            f"fluidfs: warning: state directory {state.path} was mode {loose:04o} "
            "(other users could read it): now 0700",
            file=sys.stderr,
        )


def cmd_mount(args: argparse.Namespace) -> None:
    """fluidfs mount: check everything, then mount (in a background process by default)."""
    mountpoint = args.mountpoint.expanduser().absolute()
    _check_mountpoint(mountpoint)
    state = StateDir((args.state_dir or default_data_dir()).expanduser())
    _check_state_dir(state)
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
        run_background(args, mountpoint, state)


def setup_node_process(log_file: Path | None = None) -> None:
    """Logging, file-mode and allocator settings for a process that runs a node.

    Everything the node creates (LMDB files, cache, log, control socket) is for its
    owner only: umask 077 from the start, so no file is ever briefly readable by others.
    The log is rate-limited per cause and, in a file, rotated (logsetup.py).
    """
    from fluidfs.node import logsetup

    os.umask(0o077)
    logsetup.configure(log_file)
    tune_malloc()


def bootstrap_entries(args: argparse.Namespace, keyring: keymod.KeyRing):
    """The --peer entries and the keyfile's, parsed, without repeats."""
    entries = [keymod.parse_peer(p) for p in args.peer] + keyring.keyfile.bootstrap()
    return list({str(e): e for e in entries}.values())


def add_pinned(node, entries) -> None:
    """Bootstrap entries naming a peer id become known peers, dialled only as that peer.

    They are not dialled as bare addresses (that would let whoever answers there in):
    the node's reconnect, discovery and remount dial known peers with the identity
    they must prove (peers/connections.py, ``Connections.get``).
    """
    pinned = [e for e in entries if e.key is not None and e.key != node.peers.self_key]
    for entry in pinned:
        known = node.peers.get(entry.key)
        if known is None or not known.addr:
            node.peers.add(entry.key, entry.addr)
    if pinned:
        node.blocks.use_network(node.remote)


def run_foreground(
    args: argparse.Namespace, mountpoint: Path, state: StateDir, keyring: keymod.KeyRing
) -> None:
    """Run the node in this process until it is unmounted."""
    import trio

    from fluidfs.node.node import MountError, Node

    setup_node_process(args.log_file)
    ready_fd = args.ready_fd

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
        config = node_config(args, keyring, state)
        node = Node(config)
    except StateError as exc:
        report(f"error: {exc}")
        fail(str(exc))
    add_pinned(node, config.remount.pinned)
    try:
        trio.run(
            lambda: node.mount(
                mountpoint, allow_other=args.allow_other, on_ready=lambda: report("ok")
            )
        )
    except MountError as exc:
        report(f"error: {exc}")
        fail(str(exc))
    finally:
        node.close()


def node_config(args: argparse.Namespace, keyring: keymod.KeyRing, state: StateDir):
    """NodeConfig from command-line arguments."""
    from fluidfs.blocks.audit import AuditPolicy
    from fluidfs.blocks.repair import RepairPolicy
    from fluidfs.node.node import NodeConfig
    from fluidfs.peers.lifecycle import LifecyclePolicy

    entries = bootstrap_entries(args, keyring)
    config = NodeConfig(
        keyring,
        state,
        listen=args.listen,
        donate=args.donate,
        bootstrap=[e.addr for e in entries if e.key is None],
        ratio=args.ratio,
        term=args.term,
        stores_data=args.command == "mount",
        fault_rate=getattr(args, "fault_rate", 0.0),
        lie_on_retrieve=getattr(args, "lie_on_retrieve", False),
        net_limits=getattr(args, "net_limits", None) or _net_limits(""),
        audit=AuditPolicy(interval=args.audit_interval),
        lifecycle=LifecyclePolicy(
            tolerance=args.tolerance,
            keep=args.keep_shards,
            tick=min(60.0, max(0.5, args.tolerance / 4)),
        ),
        repair=RepairPolicy(bandwidth=args.repair_bandwidth),
        repair_threshold=args.repair_threshold,
        even_placement=args.placement == "even",
        trust=args.trust,
    )
    if hasattr(args, "cache_size"):
        config.cache_size = args.cache_size
        config.block_size = args.block_size
        from fluidfs.cli import remount as cli_remount

        config.remount = cli_remount.remount_options(args)
        config.remount.pinned = [e for e in entries if e.key is not None]
    return config


def _passthrough(args: argparse.Namespace) -> list[str]:
    """Peer options, re-rendered for the background process."""
    argv = [
        "--donate",
        str(args.donate),
        "--ratio",
        str(args.ratio),
        "--term",
        str(args.term),
        "--audit-interval",
        str(args.audit_interval),
        "--tolerance",
        str(args.tolerance),
        "--keep-shards",
        str(args.keep_shards),
        "--repair-bandwidth",
        str(args.repair_bandwidth),
        "--placement",
        args.placement,
        "--trust",
        ",".join(f"{k}={v}" for k, v in vars(args.trust).items()),
    ]
    if args.repair_threshold is not None:
        argv += ["--repair-threshold", str(args.repair_threshold)]
    if args.listen:
        argv += ["--listen", args.listen]
    for addr in args.peer:
        argv += ["--peer", addr]
    return argv


def run_background(args: argparse.Namespace, mountpoint: Path, state: StateDir) -> None:
    """Start the node as a detached process; return once the mount is usable."""
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable,
        "-m",
        "fluidfs",
        "mount",
        str(mountpoint),
        "--foreground",
        "--state-dir",
        str(state.path),
        "--cache-size",
        str(args.cache_size),
        "--block-size",
        str(args.block_size),
        "--ready-fd",
        str(write_fd),
        "--log-file",
        str(state.log),
        *_passthrough(args),
    ]
    from fluidfs.cli import remount as cli_remount

    argv += cli_remount.mount_passthrough(args)
    if args.keyfile is not None:
        argv += ["--keyfile", str(args.keyfile.absolute())]
    if args.allow_other:
        argv.append("--allow-other")
    # The child logs through a rotating handler on the same file, which takes over its
    # stdout and stderr; until then (and for a crash at start) they append here.
    fd = os.open(state.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as logfile:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.readline().decode().strip()
    if answer == "ok":
        print(f"fluidfs: mounted {mountpoint} (pid {child.pid}, log {state.log})")
        return
    child.wait(timeout=30)
    if answer.startswith("error: "):
        fail(answer[len("error: ") :])
    fail(f"the mount process exited early (code {child.returncode}); see {state.log}")


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


def cmd_unmount(args: argparse.Namespace) -> None:
    """fluidfs unmount: unmount, then wait for the node to seal and exit."""
    mountpoint = Path(os.path.realpath(args.mountpoint.expanduser()))
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
