"""The lease gate's decisions (remount/gate.py): when a fresh state may start empty.

Pure functions of what peers answered; the mounts that exercise them end to end are
tests/test_fresh_machine_safety.py and tests/test_remount.py.
"""

from __future__ import annotations

from fluidfs.peers.rootrecord import Found
from fluidfs.remount.gate import FreshStart, answered_enough, forked, fresh_start, quorum

MACHINE = b"m" * 16
OTHER = b"o" * 16


def none_found(answered: int, absent: int) -> Found:
    """Peers answered, *absent* of them with not_found, none with a root record."""
    return Found(0, {}, b"", answered, 0, absent)


def root(seq: int, machine: bytes = OTHER) -> Found:
    return Found(seq, {"machine": machine, "host": "elsewhere", "time": 0}, b"raw", 3, 3)


def test_the_quorum_is_k_and_no_fewer_than_the_keyfile_lists() -> None:
    assert quorum(needed=8, listed=3) == 8
    assert quorum(needed=2, listed=5) == 5


def test_a_fresh_state_restores_any_backup_found_even_with_new() -> None:
    assert fresh_start(root(4), known_new=False, quorum=8) is FreshStart.RESTORE
    assert fresh_start(root(4), known_new=True, quorum=8) is FreshStart.RESTORE


def test_a_fresh_state_starts_empty_only_on_a_quorum_of_not_found() -> None:
    assert fresh_start(None, known_new=False, quorum=3) is FreshStart.REFUSE, "nobody answered"
    assert fresh_start(none_found(5, 1), known_new=False, quorum=3) is FreshStart.REFUSE, (
        "one peer saying not_found proves nothing"
    )
    assert fresh_start(none_found(5, 2), known_new=False, quorum=3) is FreshStart.REFUSE
    assert fresh_start(none_found(3, 3), known_new=False, quorum=3) is FreshStart.START_NEW


def test_a_backup_known_to_be_new_starts_empty_without_asking() -> None:
    assert fresh_start(None, known_new=True, quorum=3) is FreshStart.START_NEW
    assert fresh_start(none_found(1, 1), known_new=True, quorum=3) is FreshStart.START_NEW


def test_asking_again_stops_once_the_answers_settle_the_question() -> None:
    assert not answered_enough(None, waiting=False, quorum=3), "nobody answered: ask again"
    assert answered_enough(none_found(1, 1), waiting=False, quorum=3), "not fresh: any answer"
    assert not answered_enough(none_found(2, 2), waiting=True, quorum=3)
    assert answered_enough(none_found(3, 3), waiting=True, quorum=3)
    assert answered_enough(root(1), waiting=True, quorum=3), "a backup settles it"


def test_a_used_state_keeps_its_writes_once_another_machine_committed() -> None:
    assert forked(None, MACHINE, published_seq=5) is None
    assert forked(none_found(3, 3), MACHINE, published_seq=5) is None
    assert forked(root(9, MACHINE), MACHINE, published_seq=5) is None, "our own, newer elsewhere"
    assert forked(root(5), MACHINE, published_seq=5) is None, "the one we published or adopted"
    moved = forked(root(6), MACHINE, published_seq=5)
    assert moved is not None and "changed on host elsewhere" in moved
    # This state committed 2..5 locally, never published past 1; B took over from 1 and
    # published 3: B's tree is the backup, although this state's newest head is 5.
    assert forked(root(3), MACHINE, published_seq=1) is not None
