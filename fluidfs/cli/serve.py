"""Running peers without a mount: ``serve`` (one peer) and ``testnet`` (a local network)."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from fluidfs import keys as keymod
from fluidfs.cli.common import fail, state_dir
from fluidfs.cli.firstrun import check_state_dir, load_or_create_keyfile
from fluidfs.cli.nodeargs import (
    add_pinned,
    bootstrap_entries,
    serve_config,
    serve_faults,
    setup_node_process,
)
from fluidfs.node import gctune
from fluidfs.node.node import Node
from fluidfs.statedir import StateError


def cmd_serve(args: argparse.Namespace) -> None:
    """fluidfs serve: run a peer that only donates space, in the foreground."""
    state = state_dir(args)
    check_state_dir(state)
    keyring = load_or_create_keyfile(args.keyfile, state)
    setup_node_process(args.log_file)
    try:
        node = Node(serve_config(args, keyring, state), faults=serve_faults(args))
    except StateError as exc:
        fail(str(exc))
    add_pinned(node, bootstrap_entries(args, keyring))
    print(f"fluidfs: serving as peer {keyring.peer_id} on {args.listen}", file=sys.stderr)
    gctune.tune()
    try:
        trio.run(node.serve)
    except OSError as exc:
        fail(f"cannot serve on {args.listen}: {exc}")
    finally:
        node.close()


def cmd_testnet(args: argparse.Namespace) -> None:
    """fluidfs testnet: run N `fluidfs serve` peers on 127.0.0.1 until interrupted."""
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
