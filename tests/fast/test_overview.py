"""The overview's verdict (node/overview.py): one sentence from the status figures."""

from __future__ import annotations

from fluidfs.node.overview import overview

NOW = 1_000_000.0


def figures(**changes) -> dict:
    base = {
        "shards_total": 12, "shards_needed": 8, "redundancy": {"12": 40}, "files": 12480,
        "peers_failing": [], "providers_gone": 0, "keyfile_saved": True,
        "disk_free": 50 << 30, "disk_total": 100 << 30, "upload_pending_bytes": 0,
        "unsealed_bytes": 0, "network": True, "under_replicated": 0,
    }
    return base | changes


def failing(n: int, since: float) -> list[dict]:
    return [{"id": f"p{i}", "since": since} for i in range(n)]


def test_safe_says_how_many_files_on_how_many_peers() -> None:
    o = overview(figures(), NOW)
    assert o == {"level": "safe", "safe": True, "warnings": [],
                 "sentence": "All 12,480 files are on 12 of 12 peers."}


def test_failing_peers_warn_then_endanger() -> None:
    two = overview(figures(peers_failing=failing(2, NOW - 14 * 3600)), NOW)
    assert two["level"] == "warning"
    assert two["sentence"] == "2 peers failing for 14 h."
    five = overview(figures(peers_failing=failing(5, NOW - 30)), NOW)
    assert five["level"] == "danger" and not five["safe"]
    assert five["sentence"].startswith("5 peers failing for 30 s")


def test_local_blocks_and_uploads() -> None:
    local = overview(figures(redundancy={"local": 3, "12": 5}), NOW)
    assert local["level"] == "danger"
    assert local["sentence"] == "3 blocks exist only on this machine."
    uploading = overview(figures(redundancy={"12": 5, "9": 2}, upload_pending_bytes=10), NOW)
    assert uploading["level"] == "warning"
    assert "at least 9 of 12" in uploading["sentence"]
    lost = overview(figures(redundancy={"12": 5, "7": 1}), NOW)
    assert lost["level"] == "danger"
    assert "lost" in [w["kind"] for w in lost["warnings"]]


def test_warnings_that_matter() -> None:
    o = overview(figures(keyfile_saved=False, disk_free=100 << 20, providers_gone=1), NOW)
    assert o["level"] == "safe", "the data is safe; the warnings are listed apart"
    assert [w["kind"] for w in o["warnings"]] == ["keyfile", "gone", "disk"]
    alone = overview(figures(network=False, redundancy={"local": 2}, files=1), NOW)
    assert alone["sentence"] == "1 file exists only on this machine: no peers yet."


def test_a_conflicts_folder_is_a_warning_until_it_is_deleted() -> None:
    kept = overview(figures(commit={"conflicts": ["laptop-20261201-1200"]}), NOW)
    assert kept["level"] == "safe", "the data is safe; the folder is listed apart"
    (warning,) = kept["warnings"]
    assert warning["kind"] == "conflicts"
    assert "laptop-20261201-1200" in warning["text"]
    assert overview(figures(commit={"conflicts": []}), NOW)["warnings"] == []


def test_blocks_below_k_reachable_are_danger_before_any_tolerance_ends() -> None:
    """Issue 19: agreed holders still count, but a block with fewer than K shards on
    holders that answer cannot be read now. Before, two failing peers were a warning."""
    o = overview(figures(peers_failing=failing(2, NOW - 60),
                         reachable={"12": 30, "10": 9, "7": 1}), NOW)
    assert o["level"] == "danger"
    assert o["sentence"] == ("1 block unreadable now: fewer than 8 of their shards "
                             "are on peers that answer.")
    assert "unreachable" in [w["kind"] for w in o["warnings"]]
    fine = overview(figures(peers_failing=failing(2, NOW - 60), reachable={"12": 30, "10": 10}),
                    NOW)
    assert fine["level"] == "warning"
