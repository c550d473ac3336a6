"""Placement groups (peers/copysets.py): stable cuts of the live agreements."""

from __future__ import annotations

import pytest

from fluidfs.peers.copysets import groups, prefer_group


def keys(count: int) -> list[bytes]:
    return [bytes([i]) * 32 for i in range(count)]


def test_peers_are_cut_in_order_of_agreement_and_the_remainder_joins_the_last() -> None:
    peers = keys(29)
    members = [(float(100 - i), key) for i, key in enumerate(peers)]  # newest first
    cut = groups(members, 12)
    assert [len(g) for g in cut] == [12, 17]
    assert cut[0] == list(reversed(peers))[:12]  # oldest agreements first
    assert groups(members[:23], 12) == [sorted(peers[:23], key=lambda k: -k[0])], (
        "fewer than 2N peers: one group, as spreading"
    )
    assert groups([], 12) == []
    with pytest.raises(ValueError):
        groups(members, 0)


def test_a_new_block_follows_the_best_ranked_peer_and_a_repair_its_holders() -> None:
    peers = keys(8)
    grouped = [peers[:4], peers[4:]]
    ranked = [peers[5], peers[1], peers[6], peers[0], peers[7], peers[4], peers[2]]
    assert prefer_group(ranked, grouped) == [
        peers[5], peers[6], peers[7], peers[4], peers[1], peers[0], peers[2],
    ]
    # holders mostly in the first group: its free members first, ranked order kept
    assert prefer_group(ranked, grouped, holding=[peers[3], peers[2], peers[4]])[:2] == [
        peers[1], peers[0],
    ]
    assert prefer_group(ranked, [peers]) == ranked
