"""When automatic commits happen (remount/schedule.py), on made-up times and a virtual clock.

The first tests drive the schedule alone: it is a state machine without I/O, so each
rule is a few events and a question. The last ones run the real commit loop of a real
node (remount/commits.py: real LMDB, real commits) under trio's MockClock, so that
"thirty quiet seconds" take no time. A commit does its work in worker threads, which
an autojump clock does not wait for: while one runs, the test waits with
``until_on_mock_clock`` (virtual time stands still) instead of sleeping.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyfuse3
import pytest
import trio
from inproc import until_on_mock_clock

from fluidfs import keys
from fluidfs.fs.tree import ROOT_INO
from fluidfs.keys import BootstrapPeer
from fluidfs.node.node import Node, NodeConfig
from fluidfs.remount.options import RemountOptions
from fluidfs.remount.schedule import (
    Action,
    CommitSchedule,
    SchedulePolicy,
)
from fluidfs.statedir import StateDir

POLICY = SchedulePolicy(
    quiet=30.0,
    max_delay=300.0,
    refresh_interval=600.0,
    retention_interval=3600.0,
    incomplete_recheck=15.0,
    publish_retry=10.0,
)


def schedule(*, automatic: bool = True, at: float = 0.0) -> CommitSchedule:
    s = CommitSchedule(POLICY, automatic=automatic)
    s.start(at)
    return s


def run_due(s: CommitSchedule, now: float) -> Action | None:
    """Fire whatever is due at *now* (asserting something is), as the loop does."""
    due = s.next(now)
    assert due is not None and due.at <= now, f"nothing due at {now}: {due}"
    return s.fired(due, now)


def commit(s: CommitSchedule, now: float, *, user: bool, version: int = 0, incomplete=False):
    s.commit_started(user_changed=user)
    s.commit_finished(now, holders_version=version, incomplete=incomplete, user_changed=user)


# --- the schedule alone ---------------------------------------------------------------------


def test_changes_are_committed_once_quiet() -> None:
    s = schedule()
    s.changed(100.0)
    s.changed(110.0)  # each change restarts the quiet period
    due = s.next(120.0)
    assert due.action is Action.COMMIT_CHANGES and due.at == 140.0
    assert "quiet" in due.reason
    assert s.next(139.9).at > 139.9, "not yet"
    assert run_due(s, 140.0) is Action.COMMIT_CHANGES


def test_changes_that_never_pause_are_committed_after_the_max_delay() -> None:
    s = schedule()
    for t in range(0, 400, 10):  # a change every 10 s, never 30 s of quiet
        s.changed(float(t))
        due = s.next(float(t))
        if due.at <= t:
            break
    assert t == 300 and due.action is Action.COMMIT_CHANGES
    assert "300" in due.reason


def test_changes_a_previous_run_left_are_due_a_quiet_period_after_the_start() -> None:
    s = CommitSchedule(POLICY, automatic=True, dirty=True)
    assert s.changes_pending, "known before the loop runs (fluidfs sync sees them)"
    s.start(100.0)
    due = s.next(100.0)
    assert due.action is Action.COMMIT_CHANGES and due.at == 130.0


def test_without_peers_nothing_is_ever_due() -> None:
    s = schedule(automatic=False)
    s.changed(5.0)
    assert s.next(1e9) is None, "commits only on request (fluidfs sync)"
    assert s.changes_pending
    s.network(True)  # the first agreement
    assert s.next(36.0).action is Action.COMMIT_CHANGES


def test_a_commit_takes_the_changes_and_a_failed_one_gives_them_back() -> None:
    s = schedule()
    s.changed(10.0)
    s.commit_started(user_changed=True)
    assert not s.changes_pending
    assert s.commit_failed(50.0, reopen=True), "the changes are due again"
    assert s.next(50.0).at == 80.0
    s.changed(60.0)  # a change during a commit keeps its own window
    s.commit_started(user_changed=True)
    s.changed(61.0)
    assert not s.commit_failed(62.0, reopen=True), "already open"
    assert s.next(62.0).at == 91.0


def test_the_tree_is_recommitted_each_refresh_interval_only_if_holders_changed() -> None:
    s = schedule()
    commit(s, 0.0, user=True, version=7)
    due = s.next(1.0)
    assert due.action is Action.REFRESH and due.at == 600.0
    s.holders_changed(7)
    assert run_due(s, 600.0) is None, "same holders: not worth reading the tree"
    assert s.next(601.0).at == 1200.0
    s.holders_changed(8)  # a block got a new holder (upload or repair)
    assert run_due(s, 1200.0) is Action.REFRESH
    commit(s, 1201.0, user=False, version=8)
    assert s.next(1202.0).at == 1800.0


def test_retention_recommits_at_least_hourly_even_with_the_same_holders() -> None:
    s = schedule()
    commit(s, 0.0, user=True, version=3)
    s.holders_changed(3)
    fired = []
    for t in range(600, 4201, 600):
        action = run_due(s, float(t))
        if action is not None:
            fired.append(t)
            commit(s, float(t), user=False, version=3)
    assert fired == [3600], "old snapshots expire even when nothing else changes"


def test_a_commit_naming_incomplete_holders_is_looked_at_again_soon() -> None:
    s = schedule()
    commit(s, 100.0, user=True, version=1, incomplete=True)
    due = s.next(101.0)
    assert due.action is Action.REFRESH and due.at == 115.0
    s.holders_changed(1)
    assert run_due(s, 115.0) is None
    assert s.next(116.0).at == 130.0, "still waiting for the uploads: look again"
    s.holders_changed(2)  # the uploads finished
    assert run_due(s, 130.0) is Action.REFRESH
    commit(s, 131.0, user=False, version=2)
    assert s.next(132.0).at == 730.0, "complete: back to the refresh interval"


def test_a_root_that_reached_too_few_peers_is_sent_again() -> None:
    s = schedule()
    commit(s, 50.0, user=True)
    s.publish_short(50.0)
    due = s.next(51.0)
    assert due.action is Action.PUBLISH and due.at == 60.0
    assert run_due(s, 60.0) is Action.PUBLISH
    s.publish_short(61.0)
    assert s.next(62.0).at == 71.0
    s.published()
    assert s.next(72.0).action is Action.REFRESH


def test_a_withheld_root_is_followed_by_a_new_commit_and_a_superseded_one_at_once() -> None:
    s = schedule()
    commit(s, 10.0, user=True, version=1)
    s.publish_withheld(10.0)  # some block had fewer than K holders
    due = s.next(11.0)
    assert due.action is Action.REFRESH and due.at == 20.0
    s.publish_superseded(12.0)  # peers hold a root numbered past ours
    due = s.next(12.0)
    assert due.action is Action.COMMIT_AGAIN and due.at == 12.0
    assert s.again_pending
    s.commit_started(user_changed=False)
    assert not s.again_pending


def test_changes_go_first_when_several_things_are_due() -> None:
    s = schedule()
    commit(s, 0.0, user=True, version=1)
    s.publish_short(0.0)  # due at 10
    s.changed(5.0)  # due at 35
    s.holders_changed(2)  # refresh due at 600
    assert s.next(700.0).action is Action.COMMIT_CHANGES
    assert s.next(20.0).action is Action.PUBLISH, "only the publish is due yet"


def test_nothing_is_due_once_stopping_or_after_losing_the_lease() -> None:
    s = schedule()
    s.changed(1.0)
    s.stop()
    assert s.next(1e6) is None, "the unmount takes its own last commit"
    t = schedule()
    t.changed(1.0)
    t.lease_lost()
    assert t.next(1e6) is None


# --- the real commit loop on a virtual clock --------------------------------------------------

CTX = pyfuse3.RequestContext()
RING = keys.KeyRing(keys.generate())


def make_node(path: Path, *, peers: bool) -> Node:
    # A pinned peer makes the node one with peers (commits are automatic). It is never
    # dialled here (no services run): records reach no peer, and blocks stay on this
    # node, fully stored, so no commit waits for uploads.
    pinned = [BootstrapPeer("127.0.0.1:9", os.urandom(32))] if peers else []
    config = NodeConfig(
        RING,
        StateDir(path),
        cache_size=1 << 24,
        block_size=64 * 1024,
        remount=RemountOptions(commit_quiet=30.0, commit_max_delay=300.0, pinned=pinned),
    )
    return Node(config)


async def write_file(node: Node, name: str) -> None:
    fi, _ = await node.ops.create(ROOT_INO, name.encode(), 0o644, os.O_RDWR, CTX)
    await node.ops.write(fi.fh, 0, b"x" * 100)
    await node.ops.release(fi.fh)


def head_seq(node: Node) -> int:
    head = node.committer.heads.latest()
    return head.seq if head is not None else 0


async def running(node: Node, nursery: trio.Nursery) -> None:
    await node.start()
    await nursery.start(node.data.run)
    await nursery.start(node.commits.run)


async def test_the_loop_commits_after_the_quiet_period(tmp_path, autojump_clock) -> None:
    node = make_node(tmp_path / "s", peers=True)
    try:
        async with trio.open_nursery() as nursery:
            await running(node, nursery)
            await write_file(node, "a")
            await trio.sleep(29.0)
            assert head_seq(node) == 0, "still within the quiet period"
            await trio.sleep(1.5)
            await until_on_mock_clock(lambda: head_seq(node) == 1, what="the commit")
            assert node.remount_requests.status()["changes_pending"] is False
            nursery.cancel_scope.cancel()
    finally:
        node.close()


async def test_the_loop_never_commits_without_peers(tmp_path, autojump_clock) -> None:
    node = make_node(tmp_path / "s", peers=False)
    try:
        async with trio.open_nursery() as nursery:
            await running(node, nursery)
            await write_file(node, "a")
            await trio.sleep(1_000.0)
            assert head_seq(node) == 0
            assert await node.commits.commit(user_changed=True) is not None, "on request"
            assert head_seq(node) == 1
            nursery.cancel_scope.cancel()
    finally:
        node.close()


async def test_a_root_no_peer_took_is_sent_again_every_ten_seconds(
    tmp_path, autojump_clock, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="fluidfs.remount.publisher")
    node = make_node(tmp_path / "s", peers=True)
    try:
        async with trio.open_nursery() as nursery:
            await running(node, nursery)
            await write_file(node, "a")
            await trio.sleep(30.5)
            await until_on_mock_clock(lambda: node.publisher.pending is not None, what="publish")
            assert head_seq(node) == 1
            tries = sum("will retry" in r.message for r in caplog.records)
            await trio.sleep(30.5)
            again = sum("will retry" in r.message for r in caplog.records)
            assert again - tries == 3, "one publish every 10 s"
            assert node.remount_requests.status()["published"] is False
            nursery.cancel_scope.cancel()
    finally:
        node.close()


async def test_the_unmount_commits_what_changed(tmp_path, autojump_clock) -> None:
    node = make_node(tmp_path / "s", peers=True)
    try:
        async with trio.open_nursery() as nursery:
            await running(node, nursery)
            await write_file(node, "a")
            await trio.sleep(5.0)
            assert head_seq(node) == 0
            stopped = trio.Event()

            async def stop() -> None:
                await node.stop()
                stopped.set()

            nursery.start_soon(stop)
            await until_on_mock_clock(stopped.is_set, what="the unmount")
            assert head_seq(node) == 1, "the last commit is the unmount's"
            nursery.cancel_scope.cancel()
    finally:
        node.close()


@pytest.mark.parametrize("peers", [True, False])
async def test_changes_left_by_a_crash_are_committed_after_restart(
    tmp_path, autojump_clock, peers
) -> None:
    node = make_node(tmp_path / "s", peers=peers)
    try:
        async with trio.open_nursery() as nursery:
            await running(node, nursery)
            await write_file(node, "a")
            nursery.cancel_scope.cancel()  # "crash": no commit
    finally:
        node.close()
    node = make_node(tmp_path / "s", peers=peers)
    try:
        async with trio.open_nursery() as nursery:
            await running(node, nursery)
            assert node.commits.changes_pending, "the dirty flag survived"
            await trio.sleep(30.5)
            if peers:
                await until_on_mock_clock(lambda: head_seq(node) == 1, what="the commit")
            else:
                assert head_seq(node) == 0
            nursery.cancel_scope.cancel()
    finally:
        node.close()
