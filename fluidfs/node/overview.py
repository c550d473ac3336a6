"""The overview: one sentence that says whether the backup is safe, and the warnings.

``overview(figures)`` reads only the figures of ``NodeStatus.report`` (a pure
function), so ``fluidfs status --json`` and the web page say the same thing. Levels:

- ``safe``: every data block is on all N peers, nothing waits to upload, no peer fails
  (the warnings, such as a keyfile never exported, are listed apart).
- ``warning``: everything can still be rebuilt from peers, but something needs time or
  attention (uploads under way, a peer failing, blocks below N, keyfile never exported).
- ``danger``: something could not be rebuilt from peers today (blocks only on this
  machine, blocks below K shards, or more failing peers than the code tolerates).
"""

from __future__ import annotations

import time
from typing import Any

DISK_LOW_FRACTION = 0.05  # warn when less than this share of the state disk is free
DISK_LOW_BYTES = 1 << 30  # ... and less than this many bytes


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _counted(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _exist(n: int, word: str) -> str:
    return _counted(n, word) + (" exists" if n == 1 else " exist")


def overview(figures: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """The verdict on *figures* (a status report): level, sentence and warnings."""
    now = time.time() if now is None else now
    n, k = figures["shards_total"], figures["shards_needed"]
    levels = figures["redundancy"]
    local = levels.get("local", 0)
    remote = [int(level) for level in levels if level != "local"]
    lowest = min(remote) if remote else n
    files = figures["files"]
    failing = figures["peers_failing"]
    # Blocks with fewer than K shards on holders that answer now: unreadable until
    # those holders come back or their tolerance ends and repair starts.
    unreadable = sum(n_blocks for level, n_blocks in figures.get("reachable", {}).items()
                     if int(level) < k)
    warnings: list[dict[str, str]] = []

    def warn(kind: str, text: str) -> None:
        warnings.append({"kind": kind, "text": text})

    if not figures["keyfile_saved"]:
        warn("keyfile", "The keyfile was never exported: if this machine is lost, the backup "
             "is lost with it. Save it (Keyfile tab) and confirm.")
    if local:
        warn("local", f"{_exist(local, 'block')} only on this machine "
             "(not yet on peers).")
    if failing:
        oldest = now - min(p["since"] for p in failing)
        warn("peers", f"{_counted(len(failing), 'peer')} failing for {_duration(oldest)}.")
    if figures["providers_gone"]:
        warn("gone", f"{_counted(figures['providers_gone'], 'peer')} holding our data "
             "ended the agreement: repair moves its shards elsewhere.")
    if unreadable:
        warn("unreachable", f"{_counted(unreadable, 'block')} with fewer than {k} shards "
             "on peers that answer now: unreadable until they come back.")
    if lowest < k:
        warn("lost", f"Some blocks have fewer than {k} shards on peers: they cannot be "
             "rebuilt from peers now.")
    conflicts = (figures.get("commit") or {}).get("conflicts") or []
    if conflicts:
        warn("conflicts", f".fluidfs-conflicts/ holds writes acknowledged by a mount that was "
             f"replaced before it could publish them ({', '.join(conflicts)}): move what "
             "you need into place, then delete the folder.")
    disk_free, disk_total = figures["disk_free"], figures["disk_total"]
    if disk_total and disk_free < DISK_LOW_BYTES and disk_free < DISK_LOW_FRACTION * disk_total:
        warn("disk", f"The disk holding the state directory is nearly full "
             f"({disk_free >> 20} MiB free).")

    uploading = figures["upload_pending_bytes"] or figures["unsealed_bytes"]
    if not figures["network"]:
        level = "danger"
        sentence = f"{_exist(files, 'file')} only on this machine: no peers yet."
    elif local or lowest < k or len(failing) > n - k or unreadable:
        level = "danger"
        if local:
            sentence = f"{_exist(local, 'block')} only on this machine."
        elif len(failing) > n - k:
            sentence = (f"{_counted(len(failing), 'peer')} failing for "
                        f"{_duration(now - min(p['since'] for p in failing))}: "
                        f"fewer than {k} of {n} answer.")
        elif lowest < k:
            sentence = f"Some files cannot be rebuilt: blocks with fewer than {k} shards."
        else:
            sentence = (f"{_counted(unreadable, 'block')} unreadable now: fewer than {k} "
                        "of their shards are on peers that answer.")
    elif failing:
        level = "warning"
        sentence = (f"{_counted(len(failing), 'peer')} failing for "
                    f"{_duration(now - min(p['since'] for p in failing))}.")
    elif uploading or lowest < n or figures["under_replicated"]:
        level = "warning"
        sentence = (f"Uploading: all {_counted(files, 'file')} are on at least {lowest} of "
                    f"{n} peers ({k} rebuild them).")
    else:
        level = "safe"
        sentence = f"All {_counted(files, 'file')} are on {n} of {n} peers."
    return {"level": level, "safe": level == "safe", "sentence": sentence,
            "warnings": warnings}
