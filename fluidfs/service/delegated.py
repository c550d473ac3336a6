"""Shard ops a partner's storage provider makes on the partner's behalf (a holder's side).

A request carrying ``delegation`` (peers/delegation.py) is answered as if its owner had
made it, once the delegation checks out: signed by the owner, naming the caller as the
delegate, not expired, for an owner we hold an agreement with (live, or ended and in its
keep period: a provider may still fetch what we keep), and only on the delegated ops.
Everything after that is the owner's own op: the owner's shards, the owner's agreement
and the owner's room; a delegated store is refused past it exactly as the owner's would be.
Anything else is ``refused``, and a request cannot carry both ``for`` and ``delegation``.

While a delegation is valid its delegate gets a partner's limits (its stores and fetches
carry whole shards). Its first delegated request is still sized as a stranger's (the
budget is chosen before the request is read), so a delegate audits before it fetches.
At most one delegate per owner we hold an agreement with is remembered, so strangers
cannot grow the table.
"""

from __future__ import annotations

from collections.abc import Callable

from fluidfs.net.errors import RpcError
from fluidfs.peers.delegation import DELEGATED_OPS, DelegationError, read_delegation
from fluidfs.service.ops import Args


class DelegatedCalls:
    """Checks delegations and remembers the delegates that showed a valid one."""

    def __init__(self, is_partner: Callable[[bytes], bool],
                 clock: Callable[[], float]) -> None:
        self.is_partner = is_partner  # an owner whose shards we hold (agreement or keep)
        self.clock = clock
        self._delegates: dict[bytes, tuple[bytes, int]] = {}  # owner -> (delegate, until)

    def resolve(self, caller: bytes, op: str, args: Args) -> tuple[bytes, Args]:
        """The identity *caller*'s request is answered as, and its args without the
        delegation (unchanged without one). Raises ``RpcError`` for a bad delegation."""
        raw = args.get("delegation") if op in DELEGATED_OPS else None
        if raw is None:  # (the op schemas give the field to the delegated ops only)
            return caller, args
        if "for" in args:
            raise RpcError("bad_request", "a delegated op is for the holder itself")
        try:
            grant = read_delegation(raw, caller, now=self.clock())
        except DelegationError as exc:
            raise RpcError("refused", str(exc)) from None
        if not self.is_partner(grant.owner):
            raise RpcError("refused", "no agreement with the delegation's owner")
        self._delegates[grant.owner] = (grant.delegate, grant.until)
        return grant.owner, {k: v for k, v in args.items() if k != "delegation"}

    def is_delegate(self, key: bytes) -> bool:
        """True while *key* holds a valid delegation from an owner we hold shards of."""
        now = self.clock()
        for owner, (delegate, until) in list(self._delegates.items()):
            if until <= now or not self.is_partner(owner):
                del self._delegates[owner]
            elif delegate == key:
                return True
        return False
