"""Command-line handlers for commits and history: sync, snapshots, forget, key export.

Also the mount options that go with them (``--takeover``, ``--retention``); cli.py
adds those to ``fluidfs mount`` and hands them to the node.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fluidfs import keys as keymod
from fluidfs.cli.main import EXIT_FAIL, EXIT_USAGE, fail
from fluidfs.statedir import StateDir, default_data_dir, default_keyfile

MAX_EXPORTED_PEERS = 16


def _retention(text: str):
    from fluidfs.fs.snapshots import Retention

    try:
        return Retention.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text}")
    return value


# --- mount options -----------------------------------------------------------------------


def add_mount_options(mount: argparse.ArgumentParser) -> None:
    """``fluidfs mount`` options for commits, snapshots and the writer lease."""
    mount.add_argument(
        "--takeover",
        action="store_true",
        help="become the writer even if this keyfile is mounted elsewhere "
        "(that mount turns read-only)",
    )
    mount.add_argument(
        "--new",
        action="store_true",
        help="this keyfile starts a new backup: on a fresh state directory, start empty "
        "without waiting for enough peers to confirm that no backup exists",
    )
    mount.add_argument(
        "--retention",
        type=_retention,
        default=None,
        metavar="RULES",
        help="which snapshots to keep (default all=1d,hourly=7d,daily=90d; "
        "rules: all, hourly, daily, weekly, monthly)",
    )
    mount.add_argument("--commit-quiet", type=_seconds, default=None, help=argparse.SUPPRESS)
    mount.add_argument("--lease-renew", type=_seconds, default=None, help=argparse.SUPPRESS)
    mount.add_argument("--refresh-interval", type=_seconds, default=None, help=argparse.SUPPRESS)
    mount.add_argument("--restore-wait", type=_seconds, default=None, help=argparse.SUPPRESS)


def mount_passthrough(args: argparse.Namespace) -> list[str]:
    """The options above, re-rendered for the background process."""
    argv = []
    if args.takeover:
        argv.append("--takeover")
    if args.new:
        argv.append("--new")
    if args.retention is not None:
        argv += ["--retention", str(args.retention)]
    if args.commit_quiet is not None:
        argv += ["--commit-quiet", str(args.commit_quiet)]
    if args.lease_renew is not None:
        argv += ["--lease-renew", str(args.lease_renew)]
    if args.refresh_interval is not None:
        argv += ["--refresh-interval", str(args.refresh_interval)]
    if args.restore_wait is not None:
        argv += ["--restore-wait", str(args.restore_wait)]
    return argv


def remount_options(args: argparse.Namespace):
    """RemountOptions from ``fluidfs mount`` arguments."""
    from fluidfs.remount.remount import RemountOptions

    options = RemountOptions(
        takeover=args.takeover,
        mountpoint=str(args.mountpoint.expanduser().absolute()),
        new=args.new,
    )
    if args.retention is not None:
        options.retention = args.retention
    if args.commit_quiet is not None:
        options.commit_quiet = args.commit_quiet
    if args.lease_renew is not None:
        options.lease_renew = args.lease_renew
    if args.refresh_interval is not None:
        options.refresh_interval = args.refresh_interval
    if args.restore_wait is not None:
        options.restore_wait = args.restore_wait
    return options


# --- commands ------------------------------------------------------------------------------


def add_commands(commands) -> None:
    """The sync, snapshots, forget and key commands."""
    sync = commands.add_parser(
        "sync", help="commit now; return once everything is stored at full redundancy"
    )
    sync.add_argument("--state-dir", type=Path, default=None)
    sync.add_argument(
        "--timeout", type=float, default=3600.0, help="give up after this many seconds"
    )
    sync.add_argument("--json", action="store_true", help="machine-readable output")

    snaps = commands.add_parser("snapshots", help="list the kept snapshots")
    snaps.add_argument("--state-dir", type=Path, default=None)
    snaps.add_argument("--retention", type=_retention, default=None, metavar="RULES",
                       help="show which snapshots these rules would keep")
    snaps.add_argument("--json", action="store_true", help="machine-readable output")

    forget = commands.add_parser(
        "forget", help="apply the retention rules now (or drop the named snapshots)"
    )
    forget.add_argument("names", nargs="*", metavar="SNAPSHOT", help="snapshots to drop")
    forget.add_argument("--state-dir", type=Path, default=None)
    forget.add_argument("--retention", type=_retention, default=None, metavar="RULES",
                        help="rules to apply instead of the mount's")
    forget.add_argument("--dry-run", action="store_true", help="only say what would go")

    key = commands.add_parser("key", help="keyfile tools (key export)")
    key.add_argument("action", choices=["export"])
    key.add_argument("--keyfile", type=Path, default=None)
    key.add_argument("--state-dir", type=Path, default=None)
    key.add_argument(
        "--with-peers",
        action="store_true",
        help="include the peers this node knows now (as PEERID@HOST:PORT)",
    )


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir((args.state_dir or default_data_dir()).expanduser())


def _control(args: argparse.Namespace, cmd: str, timeout: float = 60.0, **request) -> dict:
    from fluidfs import control

    try:
        return control.call(_state(args).control, cmd, timeout=timeout, **request)
    except control.ControlError as exc:
        fail(str(exc))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_sync(args: argparse.Namespace) -> None:
    """fluidfs sync."""
    if args.timeout <= 0:
        fail("--timeout must be positive", EXIT_USAGE)
    reply = _control(args, "sync", timeout=args.timeout + 60, wait=args.timeout)
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
    what = f"commit {reply['seq']}"
    if reply["snapshot"]:
        what += f" (snapshot {reply['snapshot']})"
    if reply["committed"]:
        what += (
            f": {reply['nodes_written']} new metadata blocks, {_size(reply['bytes_written'])}"
            f" ({_size(reply['shard_bytes'])} of shards)"
        )
    else:
        what += ": no changes since the last commit"
    if not reply["network"]:
        if not args.json:
            print(f"fluidfs: committed {what}")
        print(
            "fluidfs: this node has no peers: the tree and its data are on this machine only",
            file=sys.stderr,
        )
        return
    if reply["full"]:
        if not args.json:
            print(
                f"fluidfs: synced {what}; root record on {reply['root_peers']} peers; "
                "everything at full redundancy"
            )
        return
    problems = []
    if reply["under_replicated"]:
        problems.append(f"{reply['under_replicated']} blocks lack some of their shards")
    if reply["local_only_blocks"]:
        problems.append(f"{reply['local_only_blocks']} blocks are still on this machine only")
    if not reply["published"]:
        problems.append("the root record has not reached enough peers yet")
    if reply["timed_out"]:
        problems.append(f"gave up after {args.timeout:.0f} s")
    fail(f"{what} is not at full redundancy yet: " + "; ".join(problems), EXIT_FAIL)


def cmd_snapshots(args: argparse.Namespace) -> None:
    """fluidfs snapshots."""
    request = {"retention": str(args.retention)} if args.retention is not None else {}
    reply = _control(args, "snapshots", **request)
    if args.json:
        print(json.dumps({"snapshots": reply["snapshots"], "retention": reply["retention"]},
                         indent=2))
        return
    rows = reply["snapshots"]
    if not rows:
        print("no snapshots yet")
        return
    print(f"{'SNAPSHOT':<26} {'COMMIT':>7}  KEPT BY ({reply['retention']})")
    for row in rows:
        print(f"{row['name']:<26} {row['seq']:>7}  {row['kept_by']}")


def cmd_forget(args: argparse.Namespace) -> None:
    """fluidfs forget."""
    request: dict = {"names": args.names, "dry_run": args.dry_run}
    if args.retention is not None:
        request["retention"] = str(args.retention)
    reply = _control(args, "forget", timeout=3600, **request)
    gone = reply["expired"]
    if not gone:
        print("fluidfs: nothing to forget")
        return
    verb = "would forget" if args.dry_run else "forgot"
    print(f"fluidfs: {verb} {_count(len(gone), 'snapshot')}: {', '.join(gone)}")
    if not args.dry_run:
        print(
            f"fluidfs: {reply['kept']} kept; {_count(reply['released_blocks'], 'block')} released"
        )


def cmd_key(args: argparse.Namespace) -> None:
    """fluidfs key export [--with-peers]."""
    path = (args.keyfile or default_keyfile()).absolute()
    try:
        keyfile = keymod.read_keyfile(path)
    except keymod.KeyfileError as exc:
        fail(str(exc))
    if args.with_peers:
        current = _current_peers(args)
        if not current:
            fail("no peer addresses known: mount once (with --peer) or run with --state-dir")
        # One entry per address; an entry that names the peer's id wins over one that does not.
        merged: dict[str, keymod.BootstrapPeer] = {}
        for entry in [*current, *keyfile.bootstrap()]:
            if entry.addr not in merged or merged[entry.addr].key is None:
                merged[entry.addr] = entry
        keyfile = keymod.with_peers(keyfile, list(merged.values())[:MAX_EXPORTED_PEERS])
    sys.stdout.write(keymod.dumps(keyfile))
    print(
        f"fluidfs: keyfile with {len(keyfile.peers)} peer addresses; keep it somewhere safe, "
        "off this machine: it is all that is needed to get the backup back",
        file=sys.stderr,
    )


def _current_peers(args: argparse.Namespace) -> list[keymod.BootstrapPeer]:
    """The peers the node knows (id and address), agreements and trust first."""
    from fluidfs import control

    state = _state(args)
    try:
        rows = control.call(state.control, "peers")["peers"]
    except control.ControlError:
        return _peers_from_state(state)
    ranked = sorted(rows, key=lambda r: (-(r["they_host"] > 0), -r["trust"], -r["last_seen"]))
    found = []
    for row in ranked:
        try:
            found.append(keymod.parse_peer(f"{row['id']}@{row['addr']}"))
        except ValueError:
            continue  # no (usable) address
    return found


def _peers_from_state(state: StateDir) -> list[keymod.BootstrapPeer]:
    """The same, read from a state directory whose node is not running."""
    import lmdb

    from fluidfs.peers.peerlist import Peer

    if not (state.meta / "data.mdb").exists():
        return []
    env = lmdb.open(str(state.meta), max_dbs=32, readonly=True, lock=False)
    try:
        try:
            peers_db = env.open_db(b"peers", create=False)
            agreements_db = env.open_db(b"agreements", create=False)
        except lmdb.NotFoundError:
            return []
        with env.begin() as txn:
            agreed = {bytes(k) for k in txn.cursor(db=agreements_db).iternext(values=False)}
            found = []
            for k, v in txn.cursor(db=peers_db):
                try:
                    decoded = Peer.decode(bytes(k), bytes(v))
                except ValueError:
                    continue  # a row the node itself would skip
                found.append(decoded[0] if isinstance(decoded, tuple) else decoded)
    finally:
        env.close()
    found.sort(key=lambda p: (-(p.key in agreed), -p.trust, -p.last_seen))
    entries = []
    for peer in found:
        try:
            entries.append(keymod.parse_peer(f"{keymod.encode_peer_id(peer.key)}@{peer.addr}"))
        except ValueError:
            continue
    return entries


def print_commit_status(commit: dict) -> None:
    """The commit lines of `fluidfs status`."""
    import time

    if commit["head_seq"]:
        age = max(0, int(time.time() - commit["head_time"]))
        state = "published" if commit["published"] else "not yet on peers"
        line = f"commit {commit['head_seq']}, {age} s ago, {state}"
    else:
        line = "none yet"
    if commit["changes_pending"]:
        line += "; changes waiting for the next commit"
    print(f"committed:   {line}; {_count(commit['snapshots'], 'snapshot')}")
    if not commit["writer"]:
        print(f"writer:      no, this mount is read-only: {commit['last_error']}")
    if commit["lazy_dirs"] or not commit["index_complete"]:
        print(f"restoring:   {commit['lazy_dirs']} directories not fetched yet")


HANDLERS = {
    "sync": cmd_sync,
    "snapshots": cmd_snapshots,
    "forget": cmd_forget,
    "key": cmd_key,
}
