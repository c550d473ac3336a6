"""Command-line handlers for the peer network: serve, id, peers, status, testnet."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fluidfs import keys as keymod
from fluidfs.cli.main import (
    EXIT_USAGE,
    add_pinned,
    bootstrap_entries,
    fail,
    load_or_create_keyfile,
    node_config,
    setup_node_process,
)
from fluidfs.statedir import StateDir, StateError, default_data_dir, default_keyfile

# --- serve, id, peers, status ---------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> None:
    """fluidfs serve: run a peer that only donates space, in the foreground."""
    import trio

    from fluidfs.node.node import Node

    state = StateDir((args.state_dir or default_data_dir()).expanduser())
    keyring = load_or_create_keyfile(args.keyfile)
    setup_node_process(args.log_file)
    try:
        node = Node(node_config(args, keyring, state))
    except StateError as exc:
        fail(str(exc))
    add_pinned(node, bootstrap_entries(args, keyring))
    print(f"fluidfs: serving as peer {keyring.peer_id} on {args.listen}", file=sys.stderr)
    try:
        trio.run(node.serve)
    except OSError as exc:
        fail(f"cannot serve on {args.listen}: {exc}")
    finally:
        node.close()


def cmd_id(args: argparse.Namespace) -> None:
    """fluidfs id: print the peer id of the keyfile."""
    path = (args.keyfile or default_keyfile()).absolute()
    try:
        print(keymod.KeyRing(keymod.read_keyfile(path)).peer_id)
    except keymod.KeyfileError as exc:
        fail(str(exc))


def _control(args: argparse.Namespace, cmd: str, timeout: float = 60.0, **request) -> dict:
    from fluidfs import control

    state = StateDir((args.state_dir or default_data_dir()).expanduser())
    try:
        return control.call(state.control, cmd, timeout=timeout, **request)
    except control.ControlError as exc:
        fail(str(exc))


def _ago(timestamp: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def cmd_peers(args: argparse.Namespace) -> None:
    """fluidfs peers [list] | peers add HOST:PORT."""
    if args.action == "add":
        if not args.addr:
            fail("peers add needs HOST:PORT", EXIT_USAGE)
        reply = _control(args, "add_peer", addr=args.addr)
        note = "agreement made" if reply["agreement"] else "no agreement (yet)"
        print(f"added peer {reply['id']} at {args.addr}: {note}")
        return
    if args.addr:
        fail("peers list takes no address", EXIT_USAGE)
    rows = _control(args, "peers")["peers"]
    if args.json:
        import json

        print(json.dumps({"peers": rows}, indent=2))
        return
    print(f"{'PEER':<20} {'ADDRESS':<22} {'LAST SEEN':<10} {'WE HOST':>17} {'THEY HOST':>17}")
    for row in rows:
        print(
            f"{row['id'][:18] + '…':<20} {row['addr']:<22} {_ago(row['last_seen']):<10} "
            f"{human(row['we_use']) + '/' + human(row['we_host']):>17} "
            f"{human(row['they_use']) + '/' + human(row['they_host']):>17}"
        )


def cmd_status(args: argparse.Namespace) -> None:
    """fluidfs status: peers, uploads and redundancy of the running node."""
    import json

    reply = _control(args, "status")
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return
    n, k = reply["shards_total"], reply["shards_needed"]
    print(f"peer id:     {reply['peer_id']}")
    print(f"listening:   {reply['listen'] or 'no'}")
    print(
        f"peers:       {reply['peers_known']} known, "
        f"{reply['peers_with_agreements']} with agreements"
    )
    print(f"blocks:      {reply['blocks']} ({reply['under_replicated']} under-replicated)")
    print(f"unsealed:    {human(reply['unsealed_bytes'])}")
    print(f"hosting:     {human(reply['hosted_bytes'])} for peers")
    if reply["local_shard_bytes"] or reply["redundancy"].get("local"):
        print(
            f"on this node: {human(reply['local_shard_bytes'])} of our own shards "
            f"({reply['redundancy'].get('local', 0)} blocks not yet on peers; they move "
            "there once enough peers have room)"
        )
    _print_uploads(reply)
    print(f"repair:      {reply['repair_queue']} blocks queued, "
          f"{human(reply['repaired_bytes'])} rebuilt, {human(reply['repair_rate'])}/s "
          f"(at most {human(reply['repair_bandwidth'])}/s)")
    print(f"deleting:    {human(reply['gc_pending_bytes'])} of old shards still on peers")
    print(f"verified:    {reply['audit_challenges']} challenges in {reply['audit_cycles']} cycles")
    if "commit" in reply:
        from fluidfs.cli.remount import print_commit_status

        print_commit_status(reply["commit"])
    print(f"redundancy:  shards on distinct peers, of {n} ({k} rebuild a block)")
    for level, count in reply["redundancy"].items():
        if level == "local":
            label = "on this node only"
        elif int(level) < k:
            label = f"{level:>3}/{n}  below {k}: not recoverable from peers"
        else:
            label = f"{level:>3}/{n}"
        print(f"  {label}: {count} blocks")


def _print_uploads(reply: dict) -> None:
    pending, rate = reply["upload_pending_bytes"], reply["upload_rate"]
    done = reply["uploaded_bytes"]
    eta = f"{pending / rate:.0f} s" if rate > 1 and pending else ("-" if pending else "done")
    if not sys.stdout.isatty():
        print(
            f"uploads:     {human(pending)} pending, {human(rate)}/s, ETA {eta} "
            f"({human(done)} sent)"
        )
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    progress = Progress(
        TextColumn("uploads:    "),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn(f"{human(pending)} pending · {human(rate)}/s · ETA {eta}"),
        console=Console(),
        auto_refresh=False,
    )
    progress.add_task("upload", total=max(done + pending, 1), completed=done)
    progress.refresh()
    progress.console.print(progress.get_renderable())


def cmd_testnet(args: argparse.Namespace) -> None:
    """fluidfs testnet: run N `fluidfs serve` peers on 127.0.0.1 until interrupted."""
    import signal
    import subprocess
    import tempfile

    root = args.dir or Path(tempfile.mkdtemp(prefix="fluidfs-testnet-"))
    root.mkdir(parents=True, exist_ok=True)
    first = f"127.0.0.1:{args.base_port}"
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for i in range(args.peers):
            key = root / f"peer{i}.key"
            if not key.exists():
                keymod.write_keyfile(key, keymod.generate())
            argv = [
                sys.executable,
                "-m",
                "fluidfs",
                "serve",
                "--keyfile",
                str(key),
                "--state-dir",
                str(root / f"peer{i}"),
                "--donate",
                str(args.donate),
                "--listen",
                f"127.0.0.1:{args.base_port + i}",
            ]
            if i:
                argv += ["--peer", first]
            log = open(root / f"peer{i}.log", "ab")  # noqa: SIM115 - the child keeps it
            procs.append(
                subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
                )
            )
        _wait_listening(root, args.peers, procs)
        print(
            f"testnet: {args.peers} peers on 127.0.0.1:{args.base_port}-"
            f"{args.base_port + args.peers - 1} (state and logs in {root})"
        )
        print(f"mount with: fluidfs mount ~/Backup --listen 127.0.0.1:0 --peer {first}", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        fail("a testnet peer exited; see the logs in " + str(root))
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    print("testnet: stopped", file=sys.stderr)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _wait_listening(root: Path, count: int, procs: list) -> None:
    deadline = time.monotonic() + 60
    while not all((root / f"peer{i}" / "listen").exists() for i in range(count)):
        if any(p.poll() is not None for p in procs):
            fail(f"a testnet peer failed to start; see the logs in {root}")
        if time.monotonic() > deadline:
            fail("testnet peers did not start within 60 s")
        time.sleep(0.1)


def cmd_check(args: argparse.Namespace) -> None:
    """fluidfs check: per-file recoverability; exit 1 if anything is unrecoverable."""
    reply = _control(args, "check", timeout=24 * 3600.0, read_data=args.read_data)
    files = reply["files"]
    bad = [f for f in files if f["state"] == "unrecoverable"]
    for f in files:
        print(f"{f['state'].upper():<14} {f['redundancy']:>7}  {f['path']}")
    what = "blocks rebuilt and verified" if args.read_data else "holders probed"
    print(
        f"fluidfs check: {len(files)} files, {len(bad)} unrecoverable ({what}; "
        f"{reply['shards_needed']} shards rebuild a block)"
    )
    if bad:
        sys.exit(1)
