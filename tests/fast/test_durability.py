"""The durability model and the churn simulator that drives fluidfs's own policies."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from fluidfs.blocks.durability import DurabilityModel, loss_probability
from fluidfs.peers.lifecycle import DAY, LifecyclePolicy

SIM = Path(__file__).resolve().parents[2] / "contrib" / "sim" / "churn.py"


def _churn():
    spec = importlib.util.spec_from_file_location("churn", SIM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["churn"] = module
    spec.loader.exec_module(module)
    return module


churn = _churn()


@pytest.mark.parametrize(
    ("peers", "repair_days", "expected"),
    [  # issue 18's table (8-of-12, 2-year lifetimes), computed independently with scipy
        (16, 2.0, 5.8e-7),
        (24, 1.0, 3.6e-7),
        (24, 1.5, 1.8e-6),
        (24, 2.0, 5.5e-6),
        (24, 7.0, 6.5e-4),
        (48, 1.0, 1.4e-5),
        (48, 7.0, 1.9e-2),
    ],
)
def test_the_model_gives_the_annual_loss_of_the_issue_table(
    peers: int, repair_days: float, expected: float
) -> None:
    got = loss_probability(peers, 730.0, repair_days)
    assert math.isclose(got, expected, rel_tol=0.05), got


def test_more_peers_and_slower_repair_both_raise_the_risk() -> None:
    base = DurabilityModel(peers=24, lifetime_days=730, repair_days=1.0).loss_probability()
    assert DurabilityModel(48, 730, 1.0).loss_probability() > base
    assert DurabilityModel(24, 730, 2.0).loss_probability() > base
    assert DurabilityModel(24, 1460, 1.0).loss_probability() < base


def test_the_model_refuses_inputs_that_describe_no_backup() -> None:
    with pytest.raises(ValueError):
        loss_probability(8, 730, 1.0)  # fewer peers than shards
    with pytest.raises(ValueError):
        loss_probability(24, 0, 1.0)


def _small(**changes) -> churn.SimConfig:
    settings = dict(peers=120, years=0.5, owners=8, partners=20, groups=6, seed=3)
    settings.update(changes)
    return churn.SimConfig(**settings)


ALWAYS_ON = (churn.PeerClass("server", 1.0, 0.0, 0.0),)


def test_a_network_that_never_fails_repairs_nothing_and_loses_nothing() -> None:
    report = churn.Simulation(
        _small(classes=ALWAYS_ON, lifetime_days=1e9, liar_share=0.0)
    ).run()
    assert report.losses == 0
    assert report.repair_times == [] and report.fetched_bytes == 0
    assert 12 <= report.distinct_peers <= 20  # each backup on its partners only


def test_a_dead_peer_is_repaired_after_the_tolerance_at_k_bytes_fetched_per_byte() -> None:
    report = churn.Simulation(
        _small(classes=ALWAYS_ON, lifetime_days=200, liar_share=0.0)
    ).run()
    assert report.repair_times, "peers died, their shards were re-created"
    assert min(report.repair_times) > LifecyclePolicy().tolerance  # nobody knew sooner
    assert report.fetched_bytes == pytest.approx(8 * report.recreated_bytes)


def test_caught_liars_stay_at_the_trust_floor_while_honest_peers_rise() -> None:
    report = churn.Simulation(_small(classes=ALWAYS_ON, lifetime_days=1e9, liar_share=0.1)).run()
    _, liars, honest = report.liar_trust[-1]
    assert liars < 0.1 < 10 < honest


def test_a_longer_tolerance_rides_out_holidays_with_less_repair() -> None:
    def recreated(tolerance_days: float) -> float:
        policy = LifecyclePolicy(tolerance=tolerance_days * DAY)
        return churn.Simulation(_small(lifecycle=policy, lifetime_days=1e9)).run().recreated_bytes

    assert recreated(14) < recreated(1) / 2


def test_placement_groups_cut_the_risk_of_a_wide_spread() -> None:
    spread = DurabilityModel(48, 730, 1.0).loss_probability()
    grouped = DurabilityModel(48, 730, 1.0, grouped=True).loss_probability()
    assert grouped < spread / 100
    # fewer than 2N peers make one group: the same as spreading
    assert DurabilityModel(20, 730, 1.0, grouped=True).loss_probability() == (
        DurabilityModel(20, 730, 1.0).loss_probability()
    )
