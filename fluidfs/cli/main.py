"""The ``fluidfs`` command: the parser, built from the options table, and the dispatch.

Each command lives in the module of its family (``COMMANDS``); only the chosen one is
imported, so ``fluidfs --help`` or a usage error does not load trio, pyfuse3 or the node.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import NoReturn

from fluidfs import __version__
from fluidfs.cli.common import EXIT_USAGE
from fluidfs.cli.options import add_options


@dataclass(frozen=True)
class Command:
    """One ``fluidfs`` command: its name, its line in --help, and the family that runs it."""

    name: str
    help: str
    family: str  # module fluidfs.cli.<family>, which defines cmd_<name>(args)


COMMANDS = [
    Command("init", "make a new keyfile", "keyfile"),
    Command("mount", "mount the backup folder", "mount"),
    Command("serve", "run a peer that donates space (no mount)", "serve"),
    Command("testnet", "run a local network of peers to try fluidfs", "serve"),
    Command("id", "print this node's peer id", "inspect"),
    Command("peers", "list peers, or add one (peers add HOST:PORT or peers add CODE)",
            "inspect"),
    Command("invite", "print a code a friend gives `fluidfs peers add` to meet this node",
            "invite"),
    Command("check", "is every file recoverable, and how safely?", "inspect"),
    Command("status", "what the running node is doing", "inspect"),
    Command("sync", "commit now; return once everything is stored at full redundancy",
            "snapshots"),
    Command("snapshots", "list the kept snapshots", "snapshots"),
    Command("forget", "apply the retention rules now (or drop the named snapshots)",
            "snapshots"),
    Command("key", "keyfile tools (key export)", "keyfile"),
    Command("provider", "a storage provider's customers (provider add|invite|list|remove; "
            "a customer: provider join CODE)",
            "provider"),
    Command("unmount", "flush and unmount", "mount"),
    Command("service", "mount at login (service install writes a systemd user unit)",
            "autostart"),
]


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> Parser:
    """The argument parser for every command."""
    parser = Parser(prog="fluidfs", description="Peer-to-peer encrypted backup filesystem.")
    parser.add_argument("--version", action="version", version=f"fluidfs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    for command in COMMANDS:
        add_options(commands.add_parser(command.name, help=command.help), command.name)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fluidfs`` command."""
    args = build_parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    family = importlib.import_module(f"fluidfs.cli.{command.family}")
    try:
        getattr(family, f"cmd_{command.name}")(args)
    except KeyboardInterrupt:
        sys.exit(130)
