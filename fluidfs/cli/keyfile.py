"""``fluidfs init`` (make a keyfile) and ``fluidfs key export`` (print it, with peers)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from fluidfs import control, keysaved
from fluidfs import keys as keymod
from fluidfs.cli.common import EXIT_USAGE, fail, state_dir
from fluidfs.peers.agreements import Ledger
from fluidfs.peers.peerlist import PeerList
from fluidfs.statedir import StateDir, default_data_dir, default_keyfile
from fluidfs.store.db import Database

MAX_EXPORTED_PEERS = 16


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


def cmd_key(args: argparse.Namespace) -> None:
    """fluidfs key export [--with-peers]."""
    path = (args.keyfile or default_keyfile()).absolute()
    try:
        keyfile = keymod.read_keyfile(path)
    except keymod.KeyfileError as exc:
        fail(str(exc))
    if args.with_peers:
        current = _current_peers(state_dir(args), keymod.KeyRing(keyfile).public_key)
        if not current:
            fail("no peer addresses known: mount once (with --peer) or run with --state-dir")
        # One entry per address; an entry that names the peer's id wins over one that does not.
        merged: dict[str, keymod.BootstrapPeer] = {}
        for entry in [*current, *keyfile.bootstrap()]:
            if entry.addr not in merged or merged[entry.addr].key is None:
                merged[entry.addr] = entry
        keyfile = keymod.with_peers(keyfile, list(merged.values())[:MAX_EXPORTED_PEERS])
    sys.stdout.write(keymod.dumps(keyfile))
    sys.stdout.flush()  # only a keyfile that was handed out counts as exported
    print(
        f"fluidfs: keyfile with {len(keyfile.peers)} peer addresses; keep it somewhere safe, "
        "off this machine: it is all that is needed to get the backup back",
        file=sys.stderr,
    )
    _record_export(state_dir(args), keymod.KeyRing(keyfile).peer_id)


def _record_export(state: StateDir, peer_id: str) -> None:
    """Silence the "keyfile never exported" warning of this keyfile's own state directory.

    Only a state directory that belongs to the keyfile (its recorded identity, or the
    ``new-key`` mark of ``fluidfs init``) is touched: exporting one key must not silence
    the warning of another backup, and a state directory that does not exist is not made.
    """
    if not (state.identity() == peer_id or state.made_for(peer_id)):
        return
    try:
        keysaved.mark_saved(state.path)
    except OSError as exc:
        print(f"fluidfs: could not record the export in {state.path}: {exc}", file=sys.stderr)


def _current_peers(state: StateDir, self_key: bytes) -> list[keymod.BootstrapPeer]:
    """The peers the node knows (id and address), agreements and trust first."""
    try:
        rows = control.call(state.control, "peers")["peers"]
    except control.ControlError:
        return _saved_peers(state, self_key)
    ranked = sorted(rows, key=lambda r: (-(r["they_host"] > 0), -r["trust"], -r["last_seen"]))
    return _entries(f"{row['id']}@{row['addr']}" for row in ranked)


def _saved_peers(state: StateDir, self_key: bytes) -> list[keymod.BootstrapPeer]:
    """The same, read from the state directory of a node that is not running."""
    try:
        db = Database(state.meta, ["peers", "peer_index", "agreements"], readonly=True)
    except FileNotFoundError:
        return []
    try:
        peers, agreements = list(PeerList(db, self_key)), Ledger(db)
    finally:
        db.close()
    peers.sort(key=lambda p: (-(agreements.get(p.key) is not None), -p.trust, -p.last_seen))
    return _entries(f"{keymod.encode_peer_id(p.key)}@{p.addr}" for p in peers)


def _entries(texts: Iterable[str]) -> list[keymod.BootstrapPeer]:
    """Parsed PEERID@HOST:PORT entries, skipping those without a (usable) address."""
    found = []
    for text in texts:
        try:
            found.append(keymod.parse_peer(text))
        except ValueError:
            continue
    return found
