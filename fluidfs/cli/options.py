"""The options table: every argument of every command, declared once.

Each ``Option`` names its flags, its argparse keywords, the commands that take it (with
the keywords that differ there: a default, a help text). main.py builds each command's
parser from this table, in table order. A background ``fluidfs mount`` forks, handing the
parsed arguments over as they are (cli/mount.py): nothing writes them back as a command
line any more. ``render`` and ``example`` are still accepted, unused, so that options
other branches add with them keep importing (docs/decisions.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluidfs.cli.argtypes import (
    RATE_HELP,
    bandwidth_limit,
    bandwidth_text,
    lifetime,
    listen_address,
    net_limits,
    parse_size,
    peer_entry,
    peer_target,
    relay_count,
    relay_limit,
    relay_limit_text,
    retention,
    seconds,
    shard_count,
    trust_policy,
    trust_text,
)

HIDDEN = argparse.SUPPRESS  # test and benchmark knobs: parsed, not shown in --help
DAY = 24 * 3600


@dataclass(frozen=True)
class Option:
    """One argument: flags, argparse keywords, the commands that take it, its re-rendering."""

    flags: tuple[str, ...]  # ("--donate",), or ("mountpoint",) for a positional
    settings: Mapping[str, Any]  # add_argument keywords, the same for every command
    commands: Mapping[str, Mapping[str, Any]]  # command -> keywords that differ there
    render: Callable[[Any], str] = str  # value -> text that parses back to it
    example: str | None = None  # a non-default value (the round-trip test uses it)

    @property
    def positional(self) -> bool:
        """True for an argument without a flag (``mountpoint``)."""
        return not self.flags[0].startswith("-")

    def keywords(self, command: str) -> dict[str, Any]:
        """The add_argument keywords of this option in *command*."""
        return {**self.settings, **self.commands[command]}


def on(*commands: str, **different: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The commands that take an option: *commands* as declared, *different* with changes."""
    return {**{name: {} for name in commands}, **different}


def option(
    *flags: str,
    commands: Mapping[str, Mapping[str, Any]],
    render: Callable[[Any], str] = str,
    example: str | None = None,
    **settings: Any,
) -> Option:
    """An ``Option``, written like add_argument."""
    return Option(flags, settings, commands, render, example)


NODE = ("mount", "serve")  # the commands that run a node
STATE = ("mount", "serve", "peers", "invite", "check", "status", "sync", "snapshots", "forget",
         "key", "provider")
RETENTION_HELP = (
    "which snapshots to keep (default all=1d,hourly=7d,daily=90d; "
    "rules: all, hourly, daily, weekly, monthly)"
)

# Table order is help order in every command (positionals first).
OPTIONS: list[Option] = [
    # --- positionals --------------------------------------------------------------------
    option(
        "action",
        commands=on(
            peers={"nargs": "?", "choices": ["list", "add"], "default": "list"},
            key={"choices": ["export"]},
            service={"choices": ["install"]},
            provider={"choices": ["add", "invite", "list", "remove", "join"]},
        ),
    ),
    option("mountpoint", type=Path, example="/mnt/backup", commands=on(
        "mount", "unmount",
        service={"nargs": "?", "default": None, "help": "the folder (default ~/Backup)"})),
    option("customer", nargs="?", metavar="CUSTOMER_ID|CODE",
           help="the customer's peer id (add, remove), or the invitation code (join)",
           commands=on("provider")),
    option("--quota", type=parse_size, default=None, help="space the customer may reserve",
           commands=on("provider"), example="200G"),
    option("--at", type=listen_address, default=None, metavar="HOST:PORT",
           help="where customers reach this provider (invite; default: where it listens)",
           commands=on("provider"), example="backup.example.org:7470"),
    option("--expires", type=lifetime, default=7 * 86400.0, metavar="DURATION",
           help="how long an invitation code stays valid (invite; default 7d)",
           commands=on("provider"), example="2d"),
    option("addr", nargs="?", type=peer_target,
           help="[PEERID@]HOST:PORT, or a friend's invite code from `fluidfs invite` "
           "(with add; with a PEERID or a code, only that peer is met)",
           commands=on("peers")),
    option("names", nargs="*", metavar="SNAPSHOT", help="snapshots to drop",
           commands=on("forget")),
    # --- keyfile and state --------------------------------------------------------------
    option(
        "--keyfile", type=Path, default=None,
        commands=on("mount", "serve", "id", "key", "service",
                    init={"help": "where to write it"},
                    provider={"help": "this node's keyfile (the provider's for invite, "
                              "the customer's for join)"}),
        example="/tmp/other.key",
    ),
    option("--shards", type=shard_count, default=12, help="shards per block (N)",
           commands=on("init")),
    option("--needed", type=shard_count, default=8, help="shards to rebuild (K)",
           commands=on("init")),
    option("--read-data", action="store_true",
           help="fetch and verify every shard copy of every block (exit 3 if one is bad)",
           commands=on("check")),
    option(
        "--state-dir", type=Path, default=None,
        commands=on(*STATE, "service", unmount={
            "help": "with --if-dead: the state directory whose mount may be cleared "
            "(default: the default one)"}, init={
            "help": "the state directory this keyfile's first mount will use: that mount "
            "starts a new backup without asking peers (default: the default one, for the "
            "default keyfile)"
        }),
        example="/tmp/state",
    ),
    # --- the mount process ----------------------------------------------------------------
    option("--cache-size", type=parse_size, default="1G",
           help="plaintext cache bound (default 1G)", commands=on("mount"), example="3G"),
    option("--foreground", action="store_true", help="stay in the foreground",
           commands=on("mount")),
    option("--allow-other", action="store_true",
           help="let other local users use the mount (modes are enforced)",
           commands=on("mount")),
    option("--block-size", type=parse_size, default="8M", help=HIDDEN, commands=on("mount"),
           example="256K"),
    option(
        "--log-file", type=Path, default=None,
        commands=on(mount={"help": HIDDEN}, serve={"help": "log here, rotated (default: stderr)"}),
        example="/tmp/fluidfs.log",
    ),
    # --- testnet --------------------------------------------------------------------------
    option("--peers", type=shard_count, default=12, help="how many (default 12)",
           commands=on("testnet")),
    option("--base-port", type=int, default=7471, help="first port (default 7471)",
           commands=on("testnet")),
    option("--dir", type=Path, default=None, help="where their state lives",
           commands=on("testnet")),
    # --- the peer network -----------------------------------------------------------------
    option(
        "--listen", type=listen_address,
        commands=on(
            mount={"default": None, "help": "HOST:PORT where peers reach this node"},
            serve={"default": "0.0.0.0:7470",
                   "help": "HOST:PORT where peers reach this node (default 0.0.0.0:7470)"},
        ),
        example="127.0.0.1:0",
    ),
    option(
        "--donate", type=parse_size, default="16G",
        help="space this node offers to peers (default 16G)",
        commands=on(*NODE, testnet={"default": "2G", "help": "space per peer"}),
        example="5G",
    ),
    option(
        "--peer", type=peer_entry, action="append", default=[],
        metavar="[PEERID@]HOST:PORT",
        help="a peer to start from (repeatable); with PEERID, only that peer is accepted there",
        commands=on(*NODE), example="127.0.0.1:7471",
    ),
    option("--limit-upload", type=bandwidth_limit, default=None, metavar="RATE",
           help=f"bytes per second sent to all peers, at most: {RATE_HELP}",
           commands=on(*NODE), render=bandwidth_text,
           example="512K"),
    option("--limit-download", type=bandwidth_limit, default=None, metavar="RATE",
           help=f"bytes per second read from all peers, at most: {RATE_HELP}",
           commands=on(*NODE), render=bandwidth_text,
           example="20Mbit"),
    # Storage providers (docs/federation.md).
    option("--provider", action="store_true", commands=on("serve"),
           help="be a storage provider for the customers admitted with `fluidfs provider`"),
    option("--provider", type=peer_entry, default=None, metavar="PEERID@HOST:PORT",
           dest="use_provider", commands=on("mount"),
           help="a storage provider that holds this node's side of its agreements",
           example="aaaqeayeaudaocajbifqydiob4ibceqtcqkrmfyydenbwha5dypq@127.0.0.1:7471"),
    option("--provider-repairs", action="store_true", commands=on("mount"),
           help="let the --provider audit and repair this node's blocks while it is away "
                "(it learns shard ids and holders, never a key or a byte of plaintext)"),
    option("--ratio", type=float, default=1.5, help=HIDDEN, commands=on(*NODE), example="2.5"),
    option("--term", type=int, default=DAY, help=HIDDEN, commands=on(*NODE), example="60"),
    # Verification and repair knobs (seconds); tests shrink a day to seconds.
    option("--audit-interval", type=float, default=3600.0, help=HIDDEN, commands=on(*NODE),
           example="0.5"),
    # Bytes of whole shards each audit cycle fetches and verifies (0: none, for tests).
    option("--audit-fetch-budget", type=int, default=1 << 20, help=HIDDEN,
           commands=on(*NODE), example="0"),
    option("--reach-interval", type=float, default=60.0, help=HIDDEN, commands=on(*NODE),
           example="1"),
    option("--no-upnp", action="store_true", commands=on(*NODE),
           help="never ask the router to forward a port (UPnP) to this node"),
    option("--relay", action="store_true", commands=on("serve"),
           help="relay for peers nobody can dial (give this node a public address)"),
    option("--relay-max-peers", type=relay_count, default=None, metavar="N",
           commands=on("serve"),
           help="with --relay: peers registered at once, at most (default 64)",
           example="16"),
    option("--relay-max-connections", type=relay_count, default=None, metavar="N",
           commands=on("serve"),
           help="with --relay: connections relayed at once, at most (default 128; "
                "8 to any one peer, or fewer if this is lower)",
           example="32"),
    option("--relay-limit", type=relay_limit, default=None, metavar="RATE",
           commands=on("serve"), render=relay_limit_text,
           help="with --relay: bytes per second each way of one relayed connection "
                "(default 1M; a bare number is KiB/s, K/M/G are KiB/MiB/GiB per second, "
                "bits as 20Mbit, off for no limit)",
           example="20Mbit"),
    option("--relay-via", type=peer_entry, action="append", default=[],
           metavar="[PEERID@]HOST:PORT", commands=on(*NODE),
           help="keep a registration at this relay so peers reach this node through it "
                "when they cannot dial it (repeatable, two at most; with PEERID, only "
                "that node is taken for the relay)",
           example="198.51.100.7:7470"),
    option("--tolerance", type=float, default=float(DAY), help=HIDDEN, commands=on(*NODE),
           example="3"),
    option("--keep-shards", type=float, default=float(DAY), help=HIDDEN, commands=on(*NODE),
           example="4"),
    option("--repair-threshold", type=int, default=None, help=HIDDEN, commands=on(*NODE),
           example="10"),
    option("--placement", choices=["trust", "even"], default="trust", help=HIDDEN,
           commands=on(*NODE), example="even"),
    option(
        "--trust", type=trust_policy, default="", metavar="K=V,...",
        help="trust model parameters, e.g. rise=1.05,fall=0.7,referral_share=0.1 "
        "(see docs/decisions.md)",
        commands=on(*NODE), render=trust_text, example="rise=1.2,vetting_checks=3",
    ),
    option("--repair-bandwidth", type=parse_size, default="64M", help=HIDDEN,
           commands=on(*NODE), example="1M"),
    # Test-only misbehaviour of a peer service (service/faults.py).
    option("--fault-rate", type=float, default=0.0, help=HIDDEN, commands=on("serve")),
    option("--lie-on-retrieve", action="store_true", help=HIDDEN, commands=on("serve")),
    option("--net-limits", type=net_limits, default=None, help=HIDDEN, commands=on("serve")),
    # --- commits, snapshots and the writer lease ------------------------------------------
    option(
        "--takeover", action="store_true",
        help="become the writer even if this keyfile is mounted elsewhere "
        "(that mount turns read-only)",
        commands=on("mount"),
    ),
    option(
        "--new", action="store_true",
        help="this keyfile starts a new backup: on a fresh state directory, start empty "
        "without waiting for enough peers to confirm that no backup exists",
        commands=on("mount"),
    ),
    option(
        "--retention", type=retention, default=None, metavar="RULES",
        commands=on(
            mount={"help": RETENTION_HELP},
            snapshots={"help": "show which snapshots these rules would keep"},
            forget={"help": "rules to apply instead of the mount's"},
        ),
        example="all=2d,weekly=30d",
    ),
    option("--commit-quiet", type=seconds, default=None, help=HIDDEN, commands=on("mount"),
           example="0.5"),
    option("--commit-max-delay", type=seconds, default=None, help=HIDDEN,
           commands=on("mount"), example="600"),
    option("--lease-renew", type=seconds, default=None, help=HIDDEN, commands=on("mount"),
           example="2"),
    option("--refresh-interval", type=seconds, default=None, help=HIDDEN, commands=on("mount"),
           example="1.5"),
    option("--restore-wait", type=seconds, default=None, help=HIDDEN, commands=on("mount"),
           example="5"),
    # --- the status and restore page (fluidfs/web/, docs/web.md) --------------------------
    option("--web", type=listen_address, default="127.0.0.1:8470", metavar="HOST:PORT",
           help="serve the status and restore page here (default 127.0.0.1:8470)",
           commands=on("mount"), example="127.0.0.1:0"),
    option("--no-web", action="store_true", help="no status and restore page",
           commands=on("mount")),
    option("--web-refresh", type=seconds, default=5.0, help=HIDDEN, commands=on("mount"),
           example="0.5"),
    option("--if-dead", action="store_true",
           help="only clear a mount of this state directory whose node is gone "
           "(the folder answers 'Transport endpoint is not connected'); a live mount, "
           "or none, is left alone (the user unit's ExecStartPre)", commands=on("unmount")),
    option("--print", action="store_true", dest="print_unit",
           help="print the unit instead of writing it", commands=on("service")),
    # --- output and waiting ---------------------------------------------------------------
    option(
        "--timeout", type=float,
        commands=on(
            sync={"default": 3600.0, "help": "give up after this many seconds"},
            unmount={"default": 600.0, "help": HIDDEN},
        ),
    ),
    option("--json", action="store_true", help="machine-readable output",
           commands=on("peers", "invite", "status", "sync", "snapshots", "provider",
                       "check")),
    option("--dry-run", action="store_true", help="only say what would go",
           commands=on("forget")),
    option("--with-peers", action="store_true",
           help="include the peers this node knows now (as PEERID@HOST:PORT)",
           commands=on("key")),
]


def options_of(command: str) -> list[Option]:
    """The options *command* takes, in table order."""
    return [o for o in OPTIONS if command in o.commands]


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Give *parser* the arguments of *command*."""
    for o in options_of(command):
        parser.add_argument(*o.flags, **o.keywords(command))


def dest(o: Option) -> str:
    """The Namespace attribute an option fills (argparse's rule for its dest)."""
    if "dest" in o.settings:
        return o.settings["dest"]
    return o.flags[0].lstrip("-").replace("-", "_")
