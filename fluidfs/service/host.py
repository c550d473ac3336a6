"""The peer service: dispatches other peers' RPCs to the module that answers them.

What each op does, and the rules it enforces, is in the module that answers it:
service/agreements.py (ProposeAgreement, EndAgreement), service/shards.py (StoreShard,
RetrieveShard(s), DeleteShard, AuditShard; quotas in service/quota.py), service/records.py
(PutRecord, GetRecord), service/discovery.py (ShareNewPeers, Ping) and, on a storage
provider, service/provider.py (Reserve, Unreserve, shard ops for a customer). The wire side is in
docs/protocol.md, the limits in its §5.

Every shard-store and record-store call runs in a worker thread of ``limiter``, the
service's own (so peers cannot starve the filesystem's sealing threads).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from fluidfs.diskspace import DiskReserve
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import REQUEST_SCHEMAS
from fluidfs.peers.addrrecord import AddressBook
from fluidfs.peers.agreements import Ledger, TermsPolicy
from fluidfs.peers.lifecycle import DAY
from fluidfs.peers.peerlist import PeerList
from fluidfs.service.agreements import AgreementOps
from fluidfs.service.customer_repair import CustomerRepairOps
from fluidfs.service.delegated import DelegatedCalls
from fluidfs.service.discovery import DiscoveryOps
from fluidfs.service.faults import NO_FAULTS, FaultInjection
from fluidfs.service.ops import Args, Op, Reply
from fluidfs.service.provider import ProviderOps
from fluidfs.service.quota import OwnerLocks, ShardQuota
from fluidfs.service.records import RecordOps
from fluidfs.service.shards import ShardOps
from fluidfs.store.accounts import AccountBook
from fluidfs.store.records import RecordStore
from fluidfs.store.repairbook import RepairBook
from fluidfs.store.shards import ShardStore

FAULTY_OPS = {"StoreShard", "RetrieveShard", "RetrieveShards", "AuditShard"}


class PeerService:
    """Dispatcher for inbound RPCs (plugs into fluidfs.net.rpc).

    *records*: where records are kept for partners (None: this node keeps none).
    *on_end*: called with a peer's key when an agreement ends here (the peer ended it, or
    an idle one made room); our shards on that peer no longer count.
    *addresses*: peers' signed address records; *remote_of*: where a peer's connection
    comes from (service/discovery.py).
    *accounts*: a storage provider's customers (None: this node is no provider), whose
    removed reservations are served for *keep* seconds (service/provider.py), and whose
    partners' records go to *reserved_records* (default: ``reserved-records`` beside
    *records*).
    *proposes_only*: our side is held by our own provider; new proposals are declined.
    *relay_ops*: RelayRegister when this node relays (peers/relay.py), RelayIncoming when
    it keeps registrations (peers/relayclient.py).
    *reserve*: the state disk's ``DiskReserve`` (default: one of its own over *shards*'
    disk); shards stored for peers, and the terms granted them, leave it PEER_RESERVE.
    """

    schemas = REQUEST_SCHEMAS

    def __init__(
        self,
        shards: ShardStore,
        ledger: Ledger,
        peers: PeerList,
        *,
        donate: int,
        ratio: float,
        limiter: trio.CapacityLimiter,
        records: RecordStore | None,
        on_end: Callable[[bytes], None],
        faults: FaultInjection = NO_FAULTS,
        terms: TermsPolicy | None = None,
        cooldown: float = DAY,
        addresses: AddressBook | None = None,
        remote_of: Callable[[bytes], str] = lambda _key: "",
        accounts: AccountBook | None = None,
        keep: float = DAY,
        proposes_only: bool = False,
        relay_ops: dict[str, Op] | None = None,
        reserved_records: RecordStore | None = None,
        reserve: DiskReserve | None = None,
    ) -> None:
        terms = terms or TermsPolicy()
        # The state disk's reserve, shared with our own data writers (node.py); peers'
        # stores leave it PEER_RESERVE free (diskspace.py).
        reserve = DiskReserve(shards.path) if reserve is None else reserve
        self.faults = faults
        self.shards = shards
        self.ledger = ledger
        # One store per owner at a time; at most one table entry per live agreement.
        quota = ShardQuota(shards, donate, peers.self_key, limiter,
                           OwnerLocks(terms.max_agreements), reserve)
        agreements = AgreementOps(ledger, peers, shards, records, limiter, on_end,
                                  donate, ratio, terms, cooldown, reserve, proposes_only)
        direct = ShardOps(shards, ledger, quota, limiter, faults)
        direct_records = RecordOps(records, ledger, limiter)
        self._ops: dict[str, Op] = {
            **agreements.ops(),
            **direct.ops(),
            **direct_records.ops(),
            **DiscoveryOps(peers, AddressBook() if addresses is None else addresses,
                           remote_of).ops(),
            **(relay_ops or {}),
        }
        self.keep = keep
        self.delegated = DelegatedCalls(self._holds_for, ledger.clock)
        self.provider: ProviderOps | None = None
        self.repair_book: RepairBook | None = None  # a provider's, for customers' repairs
        if accounts is not None:
            if reserved_records is None and records is not None:
                reserved_records = RecordStore(records.root.parent / "reserved-records",
                                               reserve=records.reserve)
            self.provider = ProviderOps(accounts, shards, quota, direct, limiter,
                                        peers.self_key, keep, direct_records,
                                        reserved_records)
            self._ops.update(self.provider.ops())
            self.repair_book = RepairBook(accounts.db, accounts.clock)
            self._ops.update(CustomerRepairOps(accounts, self.repair_book, peers.self_key,
                                               limiter).ops())

    def is_partner(self, key: bytes) -> bool:
        """A peer with a live agreement, or one whose ended agreement is still in its keep
        period (we keep its shards so it can fetch them back: it needs a partner's reply
        sizes for that); on a provider, also its customers and the peers storing under
        their reservations (they get a partner's limits, net/admission.py); and a
        partner's provider holding a valid repair delegation (service/delegated.py)."""
        if self._holds_for(key) or self.delegated.is_delegate(key):
            return True
        return self.provider is not None and self.provider.is_partner(key)

    def _holds_for(self, key: bytes) -> bool:
        """A live agreement with *key*, or an ended one still in its keep period."""
        agreement = self.ledger.get(key)
        return agreement is not None and (
            agreement.active
            or self.ledger.clock() - (agreement.ended_at or 0.0) <= self.keep
        )

    async def handle(self, peer_key: bytes, op: str, args: Args) -> Reply:
        """Serve one validated request from *peer_key* (or, with a valid delegation, as
        from the owner who signed it)."""
        answer = self._ops.get(op)
        if answer is None:
            raise RpcError("unknown_op", f"{op} is not served here")
        peer_key, args = self.delegated.resolve(peer_key, op, args)
        if "for" in args and self.provider is None:
            raise RpcError("refused", "this node is no storage provider")
        rate = self.faults.fault_rate
        if rate and op in FAULTY_OPS and random.random() < rate:
            raise RpcError("busy", "injected fault (--fault-rate)")
        return await answer(peer_key, args)

    def hosted_total(self) -> int:
        """Bytes held in the shard store for every owner, this node included (blocking)."""
        return sum(self.shards.owners().values())
