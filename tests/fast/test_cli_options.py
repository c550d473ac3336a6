"""The command line's options table: every option declared once, every command built
from it."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluidfs import keys
from fluidfs.cli.main import build_parser, main
from fluidfs.cli.options import OPTIONS
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.peerlist import PeerList
from fluidfs.statedir import StateDir
from fluidfs.store.db import META_TABLES, Database

BASE = ["mount", "/mnt/base"]


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def test_every_command_is_built_from_the_table() -> None:
    parser = build_parser()
    for o in OPTIONS:
        for command in o.commands:
            sub = _subparser(parser, command)
            assert any(
                a.option_strings[:1] == [o.flags[0]] or (o.positional and a.dest == o.flags[0])
                for a in sub._actions
            ), (o.flags, command)


def test_key_export_lists_saved_peers_of_a_stopped_node(tmp_path: Path, capsys) -> None:
    """`key export --with-peers` reads the peer table of a node that is not running,
    partners first, without writing to its state."""
    keyfile = tmp_path / "k.key"
    keys.write_keyfile(keyfile, keys.generate())
    ring = keys.KeyRing(keys.read_keyfile(keyfile))
    state = StateDir(tmp_path / "state")
    stranger, partner, nowhere = b"s" * 32, b"p" * 32, b"n" * 32
    db = Database(state.meta, META_TABLES)
    peers = PeerList(db, ring.public_key)
    peers.add(stranger, "10.0.0.1:7470")
    peers.add(partner, "10.0.0.2:7470")
    peers.add(nowhere, "")
    Ledger(db).record(partner, 1 << 20, 1 << 20, 3600)
    db.close()
    before = {p.name: p.read_bytes() for p in state.meta.iterdir() if p.name == "data.mdb"}

    main(["key", "export", "--with-peers", "--keyfile", str(keyfile),
          "--state-dir", str(state.path)])

    exported = keys.loads(capsys.readouterr().out)
    assert [e.key for e in exported.bootstrap()] == [partner, stranger]
    assert {p.name: p.read_bytes() for p in state.meta.iterdir() if p.name == "data.mdb"} == before


def test_commit_max_delay_reaches_the_commit_schedule() -> None:
    # A long creation run (bench_scale at a million files) puts off both automatic
    # triggers, so its first sync commits the whole tree.
    from fluidfs.cli.nodeargs import remount_options

    given = build_parser().parse_args([*BASE, "--commit-max-delay", "86400"])
    assert remount_options(given, []).schedule().max_delay == 86400
    default = build_parser().parse_args(BASE)
    assert remount_options(default, []).schedule().max_delay == 300
