"""Provider-side repair: a provider keeps its customers' blocks whole while they are away.

A customer U that mounts with ``--provider-repairs`` hands its provider P (only a
customer the operator admitted; anyone else is ``refused``):

- ``RepairGrant``: its delegation naming P (peers/delegation.py), which U's holders check
  before answering P's audits, fetches and stores as U's own; and the partners P may
  place re-created shards on, each with its address and the bytes U may still place
  there. P believes the room from U only, never from a partner, and spends it as it
  places. Sent again every lifecycle tick: U counts as present while it does.
- ``RepairCaps``: the repair capability of its blocks, a page at a time (block id, K, N,
  shard size, shard ids, each shard's holder), within a quota (store/repairbook.py
  ``caps_quota``). Never a key, a nonce or a plaintext byte: P re-creates ciphertext
  shards by erasure coding and checks each against its id.
- ``RepairAway`` at unmount; ``FetchJournal`` / ``AckJournal`` when it comes back.

``CustomerRepairer.run`` works for a customer that is away (it said so, or has not
refreshed its grant for ``silence`` seconds) and whose delegation is valid: every
``interval`` it audits each holder named in the capabilities (one sampled shard per
holder and pass, more for the ones found missing), counts a holder *gone* when it has
not answered for ``lost_after`` seconds or answers that it holds no agreement with U, and
re-creates the shards of gone holders and the shards an audit found missing or bad: K
good shards are fetched from the other holders (each checked against its id), the lost
ones recomputed and placed on a partner of U's that holds nothing of the block and has
the room, under U's agreement with it (a delegated ``StoreShard``). Each move is recorded
in the capability and as a signed journal entry (peers/repairjournal.py) in one
transaction. Shards with no reachable holder recorded (kept on U itself) are U's concern.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nacl.signing
import trio

from fluidfs.blocks import erasure, merkle
from fluidfs.keys import encode_peer_id
from fluidfs.net.errors import RpcError
from fluidfs.net.messages import MAX_JOURNAL_PAGE
from fluidfs.peers.connections import Connections, PeerUnavailable
from fluidfs.peers.delegation import DelegationError, read_delegation
from fluidfs.peers.repairjournal import Move, sign_move
from fluidfs.service.ops import Args, Op, Reply
from fluidfs.store.accounts import AccountBook
from fluidfs.store.repairbook import (
    MAX_JOURNAL,
    Capability,
    Grant,
    PeerRoom,
    RepairBook,
    caps_quota,
)

log = logging.getLogger(__name__)

CAPS_BATCH = 256  # capabilities read per transaction during a pass
ACK_BATCH = 2048  # journal entries dropped per write transaction


@dataclass
class RepairForCustomersPolicy:
    """When a provider repairs for an away customer, and when a holder counts as gone."""

    interval: float = 300.0  # seconds between passes
    lost_after: float = 3600.0  # a holder silent this long has lost its shards
    silence: float = 600.0  # a customer that has not refreshed its grant this long is away
    timeout: float = 10.0  # per request to a holder


@dataclass
class CustomerRepairOps:
    """Answers RepairGrant, RepairCaps, RepairAway, FetchJournal and AckJournal."""

    accounts: AccountBook
    book: RepairBook
    self_key: bytes
    limiter: trio.CapacityLimiter

    def ops(self) -> dict[str, Op]:
        """The ops served here, by wire name."""
        return {
            "RepairGrant": self.grant,
            "RepairCaps": self.caps,
            "RepairAway": self.away,
            "FetchJournal": self.fetch_journal,
            "AckJournal": self.ack_journal,
        }

    def _quota(self, customer: bytes) -> int:
        account = self.accounts.account(customer)
        if account is None:
            raise RpcError("refused", "not a customer of this provider")
        return caps_quota(account.quota)

    async def grant(self, customer: bytes, args: Args) -> Reply:
        """Keep the customer's delegation and partners' room; it is present now."""
        quota = self._quota(customer)
        try:
            grant = read_delegation(args["delegation"], self.self_key, now=self.book.clock())
        except DelegationError as exc:
            raise RpcError("bad_request", str(exc)) from None
        if grant.owner != customer:
            raise RpcError("bad_request", "the delegation is another owner's")
        peers, seen = [], set()
        for peer in args["peers"]:
            if peer["id"] in (customer, self.self_key) or peer["id"] in seen:
                raise RpcError("bad_request", "each partner once, neither you nor me")
            seen.add(peer["id"])
            peers.append(PeerRoom(peer["id"], peer["addr"], peer["room"]))
        await trio.to_thread.run_sync(self.book.put_grant, customer, args["delegation"],
                                      grant.until, peers, limiter=self.limiter)
        used = await trio.to_thread.run_sync(self.book.usage, customer, limiter=self.limiter)
        return {"until": grant.until, "caps_bytes": used, "caps_quota": quota}

    async def caps(self, customer: bytes, args: Args) -> Reply:
        """Replace a range of the customer's capabilities by one page."""
        quota = self._quota(customer)
        after, upto = args["after"], args["upto"]
        if len(after) not in (0, 32) or (after and after >= upto):
            raise RpcError("bad_request", "the range is (after, upto], after empty or an id")
        put: list[Capability] = []
        last = after
        for item in args["put"]:
            block, k, n = item["block"], item["k"], item["n"]
            if not last < block <= upto:
                raise RpcError("bad_request", "blocks ascending, within the range")
            if not k <= n or len(item["ids"]) != n or len(item["holders"]) != n:
                raise RpcError("bad_request", "K <= N ids and holders")
            if any(len(h) not in (0, 32) for h in item["holders"]):
                raise RpcError("bad_request", "a holder is an id or empty")
            put.append(Capability(block, k, n, item["size"], list(item["ids"]),
                                  list(item["holders"])))
            last = block
        done, used = await trio.to_thread.run_sync(
            self.book.replace_caps, customer, after, upto, put, quota, limiter=self.limiter)
        if not done:
            raise RpcError("over_quota", f"repair capabilities are limited to {quota} bytes")
        return {"caps_bytes": used, "caps_quota": quota}

    async def away(self, customer: bytes, _args: Args) -> Reply:
        """The customer goes away: repair for it from now on."""
        self._quota(customer)
        away = await trio.to_thread.run_sync(self.book.set_away, customer, True,
                                             limiter=self.limiter)
        if away:
            log.info("customer %s went away: repairing for it", _short(customer))
        return {"away": away}

    async def fetch_journal(self, customer: bytes, args: Args) -> Reply:
        """One page of the customer's journal after entry ``after``."""
        self._quota(customer)
        entries, more = await trio.to_thread.run_sync(
            self.book.journal_after, customer, args["after"],
            min(args["limit"], MAX_JOURNAL_PAGE), limiter=self.limiter)
        return {"entries": entries, "more": more}

    async def ack_journal(self, customer: bytes, args: Args) -> Reply:
        """Drop the customer's entries up to ``upto`` (it merged them)."""
        self._quota(customer)
        dropped, more = 0, True
        while more:
            batch, more = await trio.to_thread.run_sync(
                self.book.acknowledge, customer, args["upto"], ACK_BATCH, limiter=self.limiter)
            dropped += batch
        return {"dropped": dropped}


@dataclass
class _HolderState:
    silent_since: float | None = None  # first failed call of the current silence
    refused: bool = False  # answered that it holds no agreement with the customer
    checked: bool = False  # audited in this pass


@dataclass
class CustomerRepairer:
    """Audits and repairs the blocks of customers that are away (module docstring)."""

    book: RepairBook
    conns: Connections
    identity: nacl.signing.SigningKey
    limiter: trio.CapacityLimiter
    policy: RepairForCustomersPolicy = field(default_factory=RepairForCustomersPolicy)
    clock: Callable[[], float] = time.time
    repaired: dict[bytes, int] = field(default_factory=dict)  # shards placed per customer
    _holders: dict[tuple[bytes, bytes], _HolderState] = field(default_factory=dict)

    def with_status(
        self, status: Callable[[dict], Awaitable[dict]]
    ) -> Callable[[dict], Awaitable[dict]]:
        """The node's ``status`` control handler, with the shards re-created for each
        customer since this node started."""

        async def handler(request: dict) -> dict:
            reply = await status(request)
            reply["repairing_for_customers"] = {
                encode_peer_id(key): count for key, count in self.repaired.items()}
            return reply

        return handler

    async def run(self) -> None:
        """A pass every ``interval`` until cancelled."""
        while True:
            await self.repair_pass()
            await trio.sleep(self.policy.interval)

    def is_away(self, grant: Grant) -> bool:
        """The customer said it went away, or has not refreshed its grant for a while."""
        return grant.away or self.clock() - grant.seen > self.policy.silence

    async def repair_pass(self) -> int:
        """Audit and repair for every away customer with a valid delegation; return
        the bytes of shards placed."""
        grants = await trio.to_thread.run_sync(self.book.grants, limiter=self.limiter)
        placed = 0
        for grant in grants:
            if grant.until <= self.clock() or not self.is_away(grant):
                continue
            try:
                placed += await self._for_customer(grant)
            except Exception:  # one customer's trouble must not stop the others
                log.exception("repairing for customer %s failed", _short(grant.customer))
        return placed

    async def _for_customer(self, grant: Grant) -> int:
        customer = grant.customer
        for key in [k for k in self._holders if k[0] == customer]:
            self._holders[key].checked = False
        placed = 0
        after = b""
        journal = await trio.to_thread.run_sync(self.book.journal_length, customer,
                                                limiter=self.limiter)
        if journal >= MAX_JOURNAL:
            log.warning("customer %s: %d journal entries unacknowledged; not repairing",
                        _short(customer), journal)
            return placed
        while True:
            caps = await trio.to_thread.run_sync(self.book.caps_after, customer, after,
                                                 CAPS_BATCH, limiter=self.limiter)
            if not caps:
                return placed
            grant = await trio.to_thread.run_sync(self.book.grant, customer,
                                                  limiter=self.limiter) or grant
            if not self.is_away(grant):
                return placed  # it came back meanwhile: its own repairer takes over
            for cap in caps:
                try:
                    placed += await self._block(grant, cap)
                except Exception as exc:  # one bad block must not stop the others
                    log.error("customer %s, block %s: repair failed: %s", _short(customer),
                              cap.block.hex()[:16], exc)
            after = caps[-1].block

    def _state(self, customer: bytes, holder: bytes) -> _HolderState:
        return self._holders.setdefault((customer, holder), _HolderState())

    def _gone(self, state: _HolderState) -> bool:
        return state.refused or (state.silent_since is not None
                                 and self.clock() - state.silent_since >= self.policy.lost_after)

    async def _call(self, grant: Grant, holder: bytes, addr: str, op: str,
                    args: Args) -> Reply | None:
        """A delegated call to *holder*; None if it did not answer (its silence counted),
        RpcError passed on if it answered with a refusal."""
        state = self._state(grant.customer, holder)
        try:
            reply = await self.conns.call(holder, op, {**args, "delegation": grant.delegation},
                                          timeout=self.policy.timeout, addr=addr)
        except PeerUnavailable:
            if state.silent_since is None:
                state.silent_since = self.clock()
            return None
        except RpcError as exc:
            state.silent_since = None
            if exc.code in ("refused", "no_agreement"):
                state.refused = True
            raise
        state.silent_since = None
        state.refused = False
        return reply

    async def _audit(self, grant: Grant, holder: bytes, addr: str, cap: Capability,
                     index: int) -> bool | None:
        """True: the holder proved the shard; False: it is missing or bad there;
        None: the holder did not answer."""
        leaves = merkle.leaf_count(cap.size)
        leaf = random.randrange(leaves)
        try:
            reply = await self._call(grant, holder, addr, "AuditShard",
                                     {"id": cap.ids[index], "leaf": leaf,
                                      "nonce": os.urandom(32)})
        except RpcError as exc:
            # not_found: that shard is gone; refused / no_agreement: every shard there is
            # (_call marked the holder); anything else (busy, a holder too old to take a
            # delegation) proves nothing either way.
            return False if exc.code in ("not_found", "refused", "no_agreement") else None
        if reply is None:
            return None
        return merkle.verify(cap.ids[index], cap.size, leaf, reply["leaf_data"], reply["path"])

    async def _block(self, grant: Grant, cap: Capability) -> int:
        """Audit one block's holders and re-create what they lost; bytes placed."""
        customer = grant.customer
        addrs = {p.key: p.addr for p in grant.peers}
        lost: list[int] = []
        good: list[int] = []
        audits: dict[int, bool | None] = {}

        async def audit(index: int, holder: bytes) -> None:
            audits[index] = await self._audit(grant, holder, addrs.get(holder, ""), cap,
                                              index)

        # Each holder not yet heard from in this pass is audited once, all at once: a
        # silent one costs one timeout, not one each.
        async with trio.open_nursery() as nursery:
            for index, holder in enumerate(cap.holders):
                state = self._state(customer, holder) if holder else None
                if state is not None and not state.checked and not self._gone(state):
                    state.checked = True
                    nursery.start_soon(audit, index, holder)
        for index, holder in enumerate(cap.holders):
            if not holder:
                continue
            state = self._state(customer, holder)
            proved = audits.get(index)
            if self._gone(state) or (proved is False and not state.refused):
                lost.append(index)
            elif proved is True or (index not in audits and state.silent_since is None):
                good.append(index)
        if not lost:
            return 0
        return await self._repair(grant, cap, lost, good, addrs)

    async def _repair(self, grant: Grant, cap: Capability, lost: list[int],
                      good: list[int], addrs: dict[bytes, str]) -> int:
        fetched: dict[int, bytes] = {}
        for index in good:
            if len(fetched) >= cap.k:
                break
            holder = cap.holders[index]
            try:
                reply = await self._call(grant, holder, addrs.get(holder, ""),
                                         "RetrieveShard", {"id": cap.ids[index]})
            except RpcError:
                continue
            if reply is not None and merkle.shard_id(reply["data"]) == cap.ids[index]:
                fetched[index] = reply["data"]
        if len(fetched) < cap.k:
            log.warning("customer %s, block %s: %d good shards of %d needed; cannot repair",
                        _short(grant.customer), cap.block.hex()[:16], len(fetched), cap.k)
            return 0
        made = await trio.to_thread.run_sync(_recreate, cap, fetched, lost,
                                             limiter=self.limiter)
        placed = 0
        for index, data in made.items():
            target = await self._place(grant, cap, data)
            if target is None:
                log.warning("customer %s: no partner has room for a shard of block %s",
                            _short(grant.customer), cap.block.hex()[:16])
                break
            old = cap.holders[index]
            move_time = int(self.clock())

            def sign(seq: int, index=index, old=old, target=target,
                     move_time=move_time) -> bytes:
                move = Move(seq, cap.block, index, cap.ids[index], old, target, move_time)
                return sign_move(self.identity, grant.customer, move)

            await trio.to_thread.run_sync(self.book.move_holder, grant.customer, cap, index,
                                          target, sign, limiter=self.limiter)
            await trio.to_thread.run_sync(self.book.spend_room, grant.customer, target,
                                          len(data), limiter=self.limiter)
            self.repaired[grant.customer] = self.repaired.get(grant.customer, 0) + 1
            placed += len(data)
        return placed

    async def _place(self, grant: Grant, cap: Capability, data: bytes) -> bytes | None:
        """Store *data* on a partner of the customer that holds nothing of the block and
        has the room; the partner's id, or None."""
        current = await trio.to_thread.run_sync(self.book.grant, grant.customer,
                                                limiter=self.limiter) or grant
        holding = set(cap.holders)
        candidates = [p for p in current.peers if p.key not in holding
                      and p.room >= len(data)
                      and not self._gone(self._state(grant.customer, p.key))]
        random.shuffle(candidates)
        sid = merkle.shard_id(data)
        for peer in candidates:
            # A small delegated call first: the partner then gives us a partner's frames.
            try:
                introduced = await self._call(current, peer.key, peer.addr, "AuditShard",
                                              {"id": sid, "leaf": 0, "nonce": os.urandom(32)})
            except RpcError as exc:
                if exc.code != "not_found":
                    continue
                introduced = {}
            if introduced is None:
                continue
            try:
                reply = await self._call(current, peer.key, peer.addr, "StoreShard",
                                         {"shards": [{"id": sid, "data": data}]})
            except RpcError:
                continue
            if reply is not None and sid in reply["stored"]:
                return peer.key
        return None


def _recreate(cap: Capability, good: dict[int, bytes], wanted: list[int]) -> dict[int, bytes]:
    """Shards *wanted* of the block from K good ones (as blocks/erasure.py codes them),
    each checked against its id; those that fail are left out (in a worker thread).

    A capability does not name the block's erasure code (it predates layout 4): the
    shard ids tell. The newest code goes first; a zfec block costs one more coding.
    """
    numbers = sorted(good)[: cap.k]
    chosen = {i: good[i] for i in numbers}
    out: dict[int, bytes] = {}
    for code in (erasure.RS_CAUCHY, erasure.ZFEC):
        missing = [i for i in wanted if i not in out]
        if not missing or (code == erasure.RS_CAUCHY and not erasure.cauchy_available()):
            continue
        try:
            made = erasure.make(code, cap.k, cap.n, cap.size, chosen, missing)
        except erasure.ErasureError:
            continue
        for index, shard in made.items():
            data = bytes(shard)
            if merkle.shard_id(data) == cap.ids[index]:
                out[index] = data
    return out


def _short(key: bytes) -> str:
    return encode_peer_id(key)[:12]
