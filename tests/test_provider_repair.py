"""Provider-side repair with real processes (issue 13 item 4, docs/federation.md).

U mounts with ``--provider P --provider-repairs`` and twelve `fluidfs serve` peers; it
writes, syncs and unmounts (telling P it goes away). Three of U's holders are killed.
P, short tolerance, finds them silent, re-creates their shards from the others on U's
remaining partners with U's delegation, and journals the moves. U mounts again: it
merges the journal (status says what P repaired), and ``check --read-data`` finds every
copy its records name good; a fresh machine with U's keyfile restores the tree. P's state
holds no plaintext or key of U's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import run_cli
from peerhelpers import Peer, status, wait_for

from fluidfs import keys

pytestmark = [pytest.mark.mount, pytest.mark.network]

HOSTS = 12
P_TOLERANCE = 2.0  # P counts a holder silent this long as gone


def holders_of_u(state: Path) -> set[str]:
    """Peer ids holding U's shards, as U's peer table counts them."""
    result = run_cli("peers", "--json", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return {row["id"] for row in json.loads(result.stdout)["peers"]
            if row.get("they_use", 0) > 0}


def test_the_provider_repairs_while_the_user_is_away(tmp_path: Path, make_mount):
    provider = Peer(tmp_path, "provider", extra=["--provider", "--tolerance",
                                                 str(P_TOLERANCE)])
    hosts = [Peer(tmp_path, f"s{i}") for i in range(HOSTS)]
    try:
        for peer in (provider, *hosts):
            peer.start()
        user_key = tmp_path / "u.key"
        keys.write_keyfile(user_key, keys.generate(shards_total=6, shards_needed=3))
        ring = keys.KeyRing(keys.read_keyfile(user_key))
        user_id = keys.encode_peer_id(ring.public_key)
        admitted = run_cli("provider", "add", user_id, "--quota", "1G",
                           "--state-dir", str(provider.state))
        assert admitted.returncode == 0, admitted.stderr

        args = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "1G",
                "--no-web", *[f"--peer={h.addr}" for h in hosts],
                f"--provider={provider.peer_id}@{provider.addr}", "--provider-repairs"]
        u = make_mount("u", key=user_key, extra=args)
        u.mount()
        data = os.urandom(8 * 256 * 1024)  # 8 blocks of 6 shards on 12 peers
        (u.path / "file").write_bytes(data)
        synced = run_cli("sync", "--state-dir", str(u.state), "--timeout", "120")
        assert synced.returncode == 0, synced.stderr + u.log()
        holding = holders_of_u(u.state)
        assert len(holding) >= 6
        u.unmount()  # U uploads its capability and tells P it goes away

        by_id = {h.peer_id: h for h in hosts}
        killed = [by_id[i] for i in sorted(holding)[:3]]
        for host in killed:
            host.kill()
        repaired = wait_for(
            lambda: status(provider.state).get("repairing_for_customers", {}).get(user_id),
            120, "P re-creating the killed holders' shards")
        assert repaired > 0
        assert "repaired for customer" in run_cli(
            "status", "--state-dir", str(provider.state)).stdout

        u.mount()  # U is back: it fetches and merges P's journal
        merged = wait_for(lambda: (m := status(u.state)["provider_repairs"])["merged"]
                          is not None and m, 60, "U merging P's journal")
        assert merged["merged"] >= repaired and merged["refused"] == 0
        assert merged["caps_bytes"] > 0  # what P holds of U's capability
        assert "while we were away it re-created" in run_cli(
            "status", "--state-dir", str(u.state)).stdout
        checked = run_cli("check", "--read-data", "--state-dir", str(u.state), timeout=300)
        assert checked.returncode == 0, checked.stdout + checked.stderr + u.log()
        u.unmount()

        # A fresh machine with U's keyfile restores the tree.
        fresh = make_mount("fresh", key=user_key, extra=[
            "--listen", "127.0.0.1:0", "--no-web",
            *[f"--peer={h.addr}" for h in hosts if h not in killed]])
        fresh.mount()
        assert (fresh.path / "file").read_bytes() == data

        # P never held a plaintext byte or a key of U's.
        secrets = [data[i : i + 64] for i in range(0, len(data), 64 * 1024)]
        secrets += [ring.keyfile.root, ring.metadata_key, ring.wrap_key, ring.dedup_key]
        for path in provider.state.rglob("*"):
            if path.is_file() and not path.is_socket():
                content = path.read_bytes()
                assert not any(secret in content for secret in secrets), path
    finally:
        for peer in (provider, *hosts):
            peer.kill()
