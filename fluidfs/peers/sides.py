"""Where each partner's side of our agreement is held: at the partner, or at its storage
provider (``store_at``, docs/federation.md).

For a partner we hold an agreement with, the ledger says (``Ledger.store_at_of``). A
fresh machine restoring our backup from the keyfile has no ledger yet: it learns from
our root record, which lists beside the peers (``peers``) the providers holding their
sides (``held_at``: ``[[peer key, provider key, "host:port"], ...]``, written by
``listing``), so it asks a partner's provider for the shards of ours that partner's side
holds while the partner is offline. An agreement in the ledger always wins over what was
learned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fluidfs.peers.address import PeerAddr
from fluidfs.peers.agreements import Ledger
from fluidfs.wire import Bytes, SchemaError, Str, Tuple

MAX_LISTED = 256  # entries of held_at read or written (the root's peer list has as many)
MAX_ADDR = 300
HELD_AT = Tuple(Bytes(32, 32), Bytes(32, 32), Str(MAX_ADDR))


@dataclass
class ProviderSides:
    """The ledger's ``store_at`` for our partners, and what a root record taught us."""

    ledger: Ledger
    learned: dict[bytes, tuple[bytes, str]] = field(default_factory=dict)

    def store_at_of(self, peer: bytes) -> tuple[bytes, str] | None:
        """(id, address) of the provider holding *peer*'s side, if any."""
        if self.ledger.get(peer) is not None:
            return self.ledger.store_at_of(peer)
        return self.learned.get(peer)

    def listing(self) -> list[list]:
        """The ``held_at`` entry of our root record: live agreements held at a provider."""
        rows = []
        for agreement in self.ledger.active():
            where = self.ledger.store_at_of(agreement.peer)
            if where is not None:
                rows.append([agreement.peer, where[0], where[1]])
        return rows[:MAX_LISTED]

    def learn(self, listed: object, self_key: bytes) -> int:
        """Take the ``held_at`` entry of our own root record; how many were taken. The
        record is signed by us, but a bad item costs only itself."""
        if type(listed) is not list:
            return 0
        taken = 0
        for item in listed[:MAX_LISTED]:
            try:
                peer, provider, addr = HELD_AT.parse(item)
                PeerAddr.parse(addr)
            except (SchemaError, ValueError):
                continue
            if provider in (peer, self_key) or peer == self_key:
                continue
            self.learned[peer] = (provider, addr)
            taken += 1
        return taken
