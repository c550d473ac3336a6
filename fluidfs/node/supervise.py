"""Containment: run a background loop so that its failure never ends the node.

``supervise(name, fn, *args)`` runs ``await fn(*args)``; if it raises an ``Exception`` the
failure is logged (the first with its traceback, then at most one line per
``LOG_EVERY`` seconds with a count of the ones not shown), and the loop is started again
after a pause that doubles from ``BACKOFF_MIN`` up to ``BACKOFF_MAX`` and falls back to
the minimum once a run lasted ``HEALTHY_AFTER`` seconds. A loop that keeps failing thus
costs at most one restart every ``BACKOFF_MAX`` seconds, never a busy spin. A loop
that returns is done (e.g. a bootstrap that reached its peer). Cancellation and other
``BaseException``s (KeyboardInterrupt, a cancelled exception group) pass through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

log = logging.getLogger(__name__)

BACKOFF_MIN = 1.0
BACKOFF_MAX = 60.0
HEALTHY_AFTER = 300.0
LOG_EVERY = 60.0


@dataclass
class Supervised:
    """What the supervisor knows about one loop (for status and tests)."""

    name: str
    failures: int = 0
    restarts: int = 0
    last_error: str = ""


async def supervise(
    name: str,
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    state: Supervised | None = None,
    backoff_min: float = BACKOFF_MIN,
    backoff_max: float = BACKOFF_MAX,
) -> None:
    """Run ``fn(*args)`` until it returns, restarting it with back-off when it fails."""
    state = state or Supervised(name)
    pause = backoff_min
    logged_at = -float("inf")
    unlogged = 0
    while True:
        started = trio.current_time()
        try:
            await fn(*args)
            return
        except Exception as exc:  # BaseException (cancellation) is not caught
            now = trio.current_time()
            state.failures += 1
            state.last_error = f"{type(exc).__name__}: {exc}"
            if now - started >= HEALTHY_AFTER:
                pause = backoff_min
            if state.failures == 1:
                log.exception("background task %s failed; restarting in %.0f s", name, pause)
                logged_at = now
            elif now - logged_at >= LOG_EVERY:
                log.error(
                    "background task %s failed again (%s); %d failures not logged; "
                    "restarting in %.0f s",
                    name,
                    state.last_error[:200],
                    unlogged,
                    pause,
                )
                logged_at, unlogged = now, 0
            else:
                unlogged += 1
        await trio.sleep(pause)
        pause = min(pause * 2, backoff_max)
        state.restarts += 1
