"""A liar among real `fluidfs serve` peers (issue 19): a host that answers every audit
challenge from a good copy but serves corrupt shards on `RetrieveShard`.

It is found by `fluidfs check --read-data` (exit 3, named per peer) and, without any
read, by the sampled retrieval audits; either way its shards are re-created on other
peers, its agreement ends and its trust stays at the floor. Both fail on the code
before issue 19: `check --read-data` said OK 12/12 and exited 0, and audits never
fetched a whole shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peerhelpers import Peer, start_all, status, wait_for

PEERS = 13  # N = 12 holders per block, and one more for the liar's shards to go to
BLOCK = 256 * 1024
BLOCKS = 4
FLOOR = 0.01  # peers/trust.py: TrustPolicy.floor


@pytest.fixture
def peers(tmp_path: Path):
    made = [Peer(tmp_path, f"p{i:02d}") for i in range(PEERS)]
    made[0].extra += ["--lie-on-retrieve"]
    try:
        start_all(made)
        yield made
    finally:
        for peer in made:
            peer.kill()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fluidfs", *args], capture_output=True,
                          text=True, timeout=300)


def peer_rows(state: Path) -> dict[str, dict]:
    result = cli("peers", "--json", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return {row["id"]: row for row in json.loads(result.stdout)["peers"]}


def mount_with_data(make_mount, peers: list[Peer], *extra: str):
    args = ["--block-size", "256K", "--listen", "127.0.0.1:0", "--donate", "24G",
            "--tolerance", "600", *extra]
    for peer in peers:
        args += ["--peer", peer.addr]
    mnt = make_mount("m", extra=args)
    mnt.mount()
    wait_for(lambda: status(mnt.state)["peers_with_agreements"] == len(peers), 60,
             "agreements with every peer")
    data = os.urandom(BLOCKS * BLOCK)
    (mnt.path / "f").write_bytes(data)
    return mnt, data


def fully_away_from(mnt, liar: Peer, me: str) -> bool:
    s = status(mnt.state)
    return s["redundancy"] == {"12": BLOCKS} and liar.hosted_for(me) == 0


def test_check_read_data_finds_the_liar_and_its_shards_move(make_mount, peers):
    liar = peers[0]
    mnt, data = mount_with_data(make_mount, peers)  # hourly audits: none in this test
    me = status(mnt.state)["peer_id"]
    wait_for(lambda: status(mnt.state)["redundancy"] == {"12": BLOCKS}, 60, "full redundancy")
    assert liar.hosted_for(me) > 0

    found = cli("check", "--read-data", "--state-dir", str(mnt.state))
    out = found.stdout + found.stderr
    assert found.returncode == 3, out
    assert "0 unrecoverable" in found.stdout and "DEGRADED" in found.stdout, out
    assert f"PEER {liar.peer_id}: 0 good, " in found.stdout, out
    others = [line for line in found.stdout.splitlines()
              if line.startswith("PEER ") and liar.peer_id not in line]
    assert others == [], out
    assert "corrupt (" in found.stdout, out

    wait_for(lambda: fully_away_from(mnt, liar, me), 60,
             "the liar's shards re-created elsewhere and given up there")
    row = peer_rows(mnt.state)[liar.peer_id]
    assert row["trust"] == pytest.approx(FLOOR) and not row["active"], row
    again = cli("check", "--read-data", "--state-dir", str(mnt.state))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (mnt.path / "f").read_bytes() == data
    assert peer_rows(mnt.state)[liar.peer_id]["trust"] < 2 * FLOOR


def test_sampled_audits_catch_the_liar_without_a_read(make_mount, peers):
    liar = peers[0]
    mnt, data = mount_with_data(make_mount, peers, "--audit-interval", "1")
    me = status(mnt.state)["peer_id"]
    wait_for(lambda: peer_rows(mnt.state)[liar.peer_id]["trust"] == pytest.approx(FLOOR),
             60, "audits to catch the liar")
    assert status(mnt.state)["audit_fetches"] > 0
    wait_for(lambda: fully_away_from(mnt, liar, me), 60,
             "the liar's shards re-created elsewhere and given up there")
    assert not peer_rows(mnt.state)[liar.peer_id]["active"]
    wait_for(lambda: status(mnt.state)["audit_cycles"] >= 5, 30, "more audit cycles")
    assert peer_rows(mnt.state)[liar.peer_id]["trust"] < 2 * FLOOR, "still at the floor"
    log = (mnt.state / "fluidfs.log").read_text()
    assert "served a corrupt shard" in log
    assert (mnt.path / "f").read_bytes() == data
