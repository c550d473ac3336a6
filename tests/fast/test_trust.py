"""Trust arithmetic, referral shares and weighted placement (no network)."""

from __future__ import annotations

import random
from collections import Counter

from fluidfs.peers.peerlist import PeerList
from fluidfs.peers.placement import rank
from fluidfs.peers.trust import TrustPolicy
from fluidfs.store.db import META_TABLES, Database

ME, REFERRER, GOOD, LIAR = (bytes([i]) * 32 for i in range(4))


def make_list(tmp_path, **policy) -> PeerList:
    peers = PeerList(Database(tmp_path / "m", META_TABLES), ME, TrustPolicy(**policy))
    peers.add(REFERRER, "127.0.0.1:1")
    return peers


def test_rise_is_geometric_and_fall_is_bounded(tmp_path):
    peers = make_list(tmp_path)
    peers.add(GOOD, "127.0.0.1:2")
    for _ in range(10):
        peers.record(GOOD, True)
    assert abs(peers.get(GOOD).trust - 1.05**10) < 1e-9
    for _ in range(100):
        peers.record(GOOD, False)
    assert peers.get(GOOD).trust == TrustPolicy().floor
    assert (peers.get(GOOD).ok, peers.get(GOOD).fail) == (10, 100)


def test_referrer_gains_from_good_referrals_and_not_from_liars(tmp_path):
    peers = make_list(tmp_path)
    peers.add(GOOD, "127.0.0.1:2", referrer=REFERRER)
    for _ in range(20):
        peers.record(GOOD, True)
    gained = peers.get(REFERRER).trust
    assert gained > 1.0
    assert abs(gained - (1.0 + 0.1 * (peers.get(GOOD).trust - 1.0))) < 1e-9

    liars = make_list(tmp_path / "b")
    liars.add(LIAR, "127.0.0.1:3", referrer=REFERRER)
    for _ in range(20):
        liars.record(LIAR, False)
    assert liars.get(REFERRER).trust < 1.0


def test_trust_survives_a_restart(tmp_path):
    peers = make_list(tmp_path)
    peers.add(GOOD, "127.0.0.1:2", referrer=REFERRER)
    peers.record(GOOD, True)
    peers.save_all()
    again = PeerList(peers.db, ME)
    assert again.get(GOOD).trust == peers.get(GOOD).trust
    assert again.get(GOOD).referrer == REFERRER


def test_unvetted_peers_weigh_less():
    policy = TrustPolicy(vetting_checks=10, vetting_weight=0.1)
    assert policy.weight(1.0, 3) == 0.1
    assert policy.weight(1.0, 10) == 1.0


def test_weighted_ranking_favours_heavy_peers_and_never_repeats():
    rng = random.Random(7)
    weights = {bytes([i]) * 32: (0.05 if i < 5 else 1.0) for i in range(20)}
    top = Counter()
    for _ in range(2000):
        order = rank(weights, rng)
        assert len(order) == len(set(order)) == 20
        top.update(order[:12])
    light = sum(top[bytes([i]) * 32] for i in range(5)) / (5 * 2000)
    heavy = sum(top[bytes([i]) * 32] for i in range(5, 20)) / (15 * 2000)
    assert light < 0.2 < 0.7 < heavy  # an even spread would give 0.6 each
    assert rank({b"z" * 32: 0.0}) == []


def test_trust_parameters_from_the_command_line():
    from fluidfs.peers.trust import parse_policy

    policy = parse_policy("rise=1.1, vetting_checks=3")
    assert (policy.rise, policy.vetting_checks, policy.fall) == (1.1, 3, 0.7)
    for bad in ("rise", "nope=1", "fall=2", "rise=0.5"):
        try:
            parse_policy(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
