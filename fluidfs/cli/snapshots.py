"""Commits and history: ``sync``, ``snapshots`` and ``forget``, asked of the running node."""

from __future__ import annotations

import argparse
import json
import sys

from fluidfs.cli.common import EXIT_FAIL, EXIT_USAGE, counted, fail
from fluidfs.cli.nodecall import call_node


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
    reply = call_node(args, "sync", timeout=args.timeout + 60, wait=args.timeout)
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
    reply = call_node(args, "snapshots", **request)
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
    reply = call_node(args, "forget", timeout=3600, **request)
    gone = reply["expired"]
    if not gone:
        print("fluidfs: nothing to forget")
        return
    verb = "would forget" if args.dry_run else "forgot"
    print(f"fluidfs: {verb} {counted(len(gone), 'snapshot')}: {', '.join(gone)}")
    if not args.dry_run:
        print(
            f"fluidfs: {reply['kept']} kept; {counted(reply['released_blocks'], 'block')} released"
        )
