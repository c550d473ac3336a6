"""Placement groups: each block's shards stay within one group of peers (copysets).

A backup spread over P peers with every block on a random N of them is lost once *any*
N-K+1 of the P are dead at once; with blocks confined to fixed groups of N, only N-K+1
dead peers *within one group* lose data, and there are far fewer such sets (Cidon et al.,
"Copysets", USENIX ATC 2013). With P = 48 and N = 12: 4 x C(12,5) = 3,168 fatal sets
instead of C(48,5) = 1,712,304. Adding peers then adds capacity without making some
fatal set likelier per block. The price: a dead peer's shards all belong to one group's
blocks, so its repair fetches from the same few peers.

Groups are a pure function of the live agreements: ordered by when each was made (then
by key), cut into runs of N; a remainder shorter than N joins the last full group, so
fewer than 2N peers form one group — exactly the old behaviour. A new block goes to the
group of the best-ranked usable peer (placement stays weighted by trust and room); a
block that already has holders (repair, top-up) prefers the group holding most of them.
Peers outside the chosen group stand by in ranked order, so a full group never stops
placement. Groups shift when an early agreement ends; blocks placed before keep their
holders, and repair pulls them back toward one group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def groups(members: Iterable[tuple[float, bytes]], size: int) -> list[list[bytes]]:
    """Peers given as (agreement made at, key), cut into groups of *size* (the last
    group takes any remainder; fewer than 2 * *size* peers make one group)."""
    if size <= 0:
        raise ValueError("a group needs at least one peer")
    ordered = [key for _, key in sorted(members)]
    full = max(1, len(ordered) // size)
    cut = [ordered[i * size : (i + 1) * size] for i in range(full)]
    cut[-1].extend(ordered[full * size :])
    return [group for group in cut if group]


def prefer_group(
    ranked: Sequence[bytes], grouped: Sequence[Sequence[bytes]], holding: Iterable[bytes] = ()
) -> list[bytes]:
    """*ranked* candidates reordered so that one group's members come first.

    The group is the one holding most of *holding* (the block's current holders), or
    else the group of the first ranked candidate; order within each part is kept.
    """
    if len(grouped) <= 1 or not ranked:
        return list(ranked)
    group_of = {key: number for number, group in enumerate(grouped) for key in group}
    counts: dict[int, int] = {}
    for key in holding:
        if key in group_of:
            counts[group_of[key]] = counts.get(group_of[key], 0) + 1
    if counts:
        chosen = max(counts, key=lambda number: (counts[number], -number))
    else:
        chosen = next((group_of[key] for key in ranked if key in group_of), -1)
    first = [key for key in ranked if group_of.get(key) == chosen]
    return first + [key for key in ranked if group_of.get(key) != chosen]
