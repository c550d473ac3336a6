"""The metadata reserve (diskspace.py) holds while data writers run at once."""

from __future__ import annotations

import errno

import pytest

from fluidfs.diskspace import DiskReserve, free_bytes

MiB = 1 << 20


def test_writers_at_once_cannot_eat_the_reserve_together(tmp_path) -> None:
    """Each of two writers alone fits above the reserve; both at once would eat it, so
    the second is refused while the first's bytes are claimed, and let through once
    they are not. Before claims, each writer looked at the free space alone and both
    went ahead (two sealers, each storing a block's shards, filled the disk that the
    mount's metadata needed). The margins are wide: other processes may write to this
    disk meanwhile."""
    reserve = DiskReserve(tmp_path, reserve=free_bytes(tmp_path) - 400 * MiB)
    with reserve.claim(300 * MiB):
        with pytest.raises(OSError) as refused, reserve.claim(300 * MiB):
            pass
        assert refused.value.errno == errno.ENOSPC
    assert reserve.claimed == 0
    with reserve.claim(300 * MiB):
        pass


def test_a_refused_claim_leaves_nothing_claimed(tmp_path) -> None:
    reserve = DiskReserve(tmp_path, reserve=free_bytes(tmp_path) + MiB)
    with pytest.raises(OSError), reserve.claim(1):
        pass
    assert reserve.claimed == 0
