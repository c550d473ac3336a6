"""Request and response schemas of the fluidfs peer protocol, version 1 (data only).

Operation names follow the Fluidbackup paper. The service that implements them lives
elsewhere; a dispatcher for it can use ``REQUEST_SCHEMAS`` as its ``schemas``. The client
(``RpcConnection.call``) validates requests before sending and responses on arrival with
``OPS``. See docs/protocol.md for the meaning of each field and the error codes.
"""

from __future__ import annotations

from typing import NamedTuple

from fluidfs.wire.schema import Bool, Bytes, Int, List, Map, Schema, Str

__all__ = [
    "ERROR_CODES",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_IDS",
    "MAX_BATCH_SHARD",
    "MAX_LIST_PAGE",
    "MAX_SHARD",
    "OPS",
    "REQUEST_SCHEMAS",
    "RESPONSE_SCHEMAS",
    "OpSpec",
]

MAX_SHARD = 8 * 1024 * 1024  # bytes of one shard
MAX_LEAF = 64 * 1024  # bytes of one audited Merkle leaf
MAX_ADDR = 300  # "host:port" hint
MAX_RECORD = 64 * 1024  # one signed per-owner record
MAX_ADDR_RECORD = 640  # one signed address record (peers/addrrecord.py)
MAX_LIST_PAGE = 1024  # shard ids in one ListShards page (~35 KB reply)
# RetrieveShards (v1, added with issue 15): small shards (metadata nodes) several at once.
MAX_BATCH_IDS = 64  # shard ids in one request
MAX_BATCH_SHARD = 64 * 1024  # bytes of one shard in the answer (larger ones: RetrieveShard)
MAX_BATCH_BYTES = 1024 * 1024  # shard bytes in one answer, all together
U64 = Int(0, 2**64 - 1)
ID = Bytes(min=32, max=32)  # shard id / peer id / nonce / Merkle node
CODE = Str(min=1, max=64)
STORE_AT = Map({"id": ID, "addr": Str(min=1, max=MAX_ADDR)})
# "for" (shard and record ops, optional): sent to a storage provider, the customer whose
# reservation the shard or record is under (docs/federation.md); absent: the caller's own
# agreement with us.
FOR = {"for": ID}
# "delegation" (AuditShard, RetrieveShard, StoreShard, optional): the owner's signed
# permission for the caller, its storage provider, to act on the owner's shards here
# (peers/delegation.py); the op is answered as if the owner had called.
MAX_DELEGATION = 256
SHARD_OP_EXTRAS = {**FOR, "delegation": Bytes(min=1, max=MAX_DELEGATION)}

# Error codes on the wire. The RPC layer itself produces the first group; a service uses
# the second for its ops (it may add more; clients must treat unknown codes as failures).
ERROR_CODES = {
    # produced by fluidfs.net.rpc
    "unknown_op": "no such operation",
    "bad_request": "request envelope or arguments do not fit the schema",
    "bad_version": "envelope version not supported",
    "internal": "the handler failed; details are in the server's log",
    # produced locally by the client (never sent)
    "bad_reply": "the peer's reply does not fit the schema",
    "timeout": "no reply in time",
    "connection_lost": "connection ended before the reply",
    "too_large": "the request does not fit in one frame",
    # for services
    "no_agreement": "no storage agreement with this peer",
    "over_quota": "the store would exceed the agreed space",
    "not_found": "no such shard",
    "bad_shard": "shard bytes do not match the id",
    "refused": "the peer declines (see message)",
    "busy": "try again later",
}


class OpSpec(NamedTuple):
    """The schemas of one operation's ``args`` and ``ok`` maps."""

    request: Schema
    response: Schema


OPS: dict[str, OpSpec] = {
    # offer: bytes I host for you; ask: bytes you host for me; term: seconds.
    # store_at: the storage provider that holds the proposer's side (docs/federation.md):
    # send StoreShard/RetrieveShard/DeleteShard/AuditShard for this agreement there.
    # addr: where the proposer accepts connections (so the peer can call back and refer it).
    "ProposeAgreement": OpSpec(
        Map(
            {"offer": U64, "ask": U64, "term": U64},
            optional={"store_at": STORE_AT, "addr": Str(MAX_ADDR)},
        ),
        Map(
            {"accepted": Bool(), "offer": U64, "ask": U64, "term": U64},
            optional={"reason": Str(1024)},
        ),
    ),
    # The sender ends the agreement (both directions): the receiver stops taking its
    # shards, and drops what it hosts for it after its keep period.
    "EndAgreement": OpSpec(Map({}), Map({"ended": Bool()})),
    "StoreShard": OpSpec(
        Map({"shards": List(Map({"id": ID, "data": Bytes(max=MAX_SHARD)}), max_len=64)},
            optional=SHARD_OP_EXTRAS),
        Map(
            {
                "stored": List(ID, max_len=64),
                "refused": List(Map({"id": ID, "code": CODE}), max_len=64),
            }
        ),
    ),
    "RetrieveShard": OpSpec(
        Map({"id": ID}, optional=SHARD_OP_EXTRAS),
        # a view of the reply's frame (its readers take blocks.erasure.Shard)
        Map({"data": Bytes(max=MAX_SHARD, view=True)}),
    ),
    # Several of the caller's own small shards at once (no "for", no "delegation"): each
    # id held is in `found` (once, at most MAX_BATCH_SHARD bytes, MAX_BATCH_BYTES in all),
    # each id not held in `missing`; an id in neither was not answered this time (the
    # answer was full, or the shard is too large for one): ask for it again.
    "RetrieveShards": OpSpec(
        Map({"ids": List(ID, min_len=1, max_len=MAX_BATCH_IDS)}),
        Map({"found": List(Map({"id": ID, "data": Bytes(max=MAX_BATCH_SHARD)}),
                           max_len=MAX_BATCH_IDS),
             "missing": List(ID, max_len=MAX_BATCH_IDS)}),
    ),
    "DeleteShard": OpSpec(
        Map({"ids": List(ID, max_len=1024)}, optional=FOR),
        Map({"deleted": Int(0, 1024)}),
    ),
    # One page of the ids of the caller's shards the peer holds, ascending, all above
    # `after` (b"" for the first page); `more`: another page follows.
    "ListShards": OpSpec(
        Map({"after": Bytes(max=32), "limit": Int(1, MAX_LIST_PAGE)}),
        Map({"ids": List(ID, max_len=MAX_LIST_PAGE), "more": Bool()}),
    ),
    "ShareNewPeers": OpSpec(
        Map({"max": Int(0, 256)}),
        # record (optional): that peer's own signed address record, the newest we hold.
        Map({"peers": List(Map({"id": ID, "addr": Str(MAX_ADDR)},
                               optional={"record": Bytes(min=1, max=MAX_ADDR_RECORD)}),
                           max_len=256)}),
    ),
    # Prove possession of shard `id`: return Merkle leaf `leaf` (keyed by `nonce` as the
    # service defines) and the sibling path up to the root (the shard id).
    "AuditShard": OpSpec(
        Map({"id": ID, "leaf": U64, "nonce": ID}, optional=SHARD_OP_EXTRAS),
        Map({"leaf_data": Bytes(max=MAX_LEAF), "path": List(ID, max_len=40)}),
    ),
    # time: the responder's clock, Unix seconds.
    # addr (optional): where the caller accepts connections, so the callee can call back.
    # record (optional): the caller's signed address record (peers/addrrecord.py).
    # seen (reply, optional): the caller's address as the responder sees the connection
    # ("host:port" after any NAT), so a node learns the address the internet gives it.
    # record (reply, optional): the responder's own signed address record (a relay's
    # says it relays: a node met only as a bootstrap address learns that from it).
    "Ping": OpSpec(
        Map({}, optional={"addr": Str(MAX_ADDR),
                          "record": Bytes(min=1, max=MAX_ADDR_RECORD)}),
        Map({"time": U64}, optional={"seen": Str(MAX_ADDR),
                                     "record": Bytes(min=1, max=MAX_ADDR_RECORD)}),
    ),
    # Small signed per-owner records (root pointer, writer lease; see peers/rootrecord.py).
    # PutRecord: the peer keeps the record if it verifies as the caller's own, its fence
    # is not below the highest the peer holds for the caller, and its seq is higher than
    # the one held - or, with expect, the held seq is exactly expect (0: none held);
    # stored=false and the held seq otherwise.
    # GetRecord: the caller's own record of that kind (not_found if none).
    "PutRecord": OpSpec(
        Map({"record": Bytes(min=1, max=MAX_RECORD)}, optional={"expect": U64, **FOR}),
        Map({"stored": Bool(), "seq": U64}),
    ),
    "GetRecord": OpSpec(
        Map({"kind": Str(min=1, max=16)}, optional=FOR),
        Map({"record": Bytes(min=1, max=MAX_RECORD)}),
    ),
    # Relays (peers/relay.py, net/relaywire.py). RelayRegister: register the caller (the
    # identity it proved) at this relay for `ttl` seconds, renewed by calling it again.
    # RelayIncoming (relay → registered peer): open a stream back with ACCEPT and `token`.
    "RelayRegister": OpSpec(Map({}), Map({"ttl": Int(1, 86400)})),
    "RelayIncoming": OpSpec(Map({"token": Bytes(min=16, max=16)}), Map({})),
}

# A customer and its storage provider (docs/federation.md). Reserve: make or resize the
# space held for the shards of the customer's partner `peer` (at most `size` bytes,
# within the customer's quota); Unreserve: remove it (shards kept for the keep period).
OPS["Reserve"] = OpSpec(Map({"peer": ID, "size": U64}), Map({"size": U64}))
OPS["Unreserve"] = OpSpec(Map({"peer": ID}), Map({"removed": Bool()}))
# The customer's own figures (its status shows them): quota, live reservations, bytes
# reserved and held (removed reservations' shards in their keep period included).
OPS["Account"] = OpSpec(
    Map({}), Map({"quota": U64, "reservations": U64, "reserved": U64, "held": U64}))
# Anyone: present the secret of the operator's one-time invitation code
# (peers/providercode.py); the caller becomes a customer with the code's quota.
OPS["RedeemInvite"] = OpSpec(Map({"secret": Bytes(min=16, max=16)}), Map({"quota": U64}))
# A customer's own access to the shards under its reservations, to hand them over when
# it switches providers (docs/federation.md): list one page of a reservation's shard ids
# (as ListShards), fetch one, and store into a live reservation (as StoreShard).
OPS["ListReserved"] = OpSpec(
    Map({"peer": ID, "after": Bytes(max=32), "limit": Int(1, MAX_LIST_PAGE)}),
    OPS["ListShards"].response,
)
# bytes, not a view of the frame as RetrieveShard's: the shard is sent on (StoreReserved),
# and cbor2 would encode a memoryview as an array of integers
OPS["FetchReserved"] = OpSpec(Map({"peer": ID, "id": ID}), Map({"data": Bytes(max=MAX_SHARD)}))
OPS["StoreReserved"] = OpSpec(
    Map({"peer": ID, "shards": List(Map({"id": ID, "data": Bytes(max=MAX_SHARD)}),
                                    max_len=64)}),
    OPS["StoreShard"].response,
)
# The records under a reservation move with it (peers/recordmove.py): fetch the partner's
# record of a kind (as GetRecord), store one of the partner's own (as PutRecord, without
# expect: never replacing a newer one).
OPS["FetchReservedRecord"] = OpSpec(Map({"peer": ID, "kind": Str(min=1, max=16)}),
                                    OPS["GetRecord"].response)
OPS["StoreReservedRecord"] = OpSpec(Map({"peer": ID, "record": Bytes(min=1, max=MAX_RECORD)}),
                                    OPS["PutRecord"].response)

# Provider-side repair (docs/federation.md, issue 13 item 4), a customer to its provider
# only. RepairGrant: the customer's delegation naming the provider (peers/delegation.py)
# and the partners it may place re-created shards on, with the bytes it may still place
# at each; sent again to keep it current, and the customer counts as back. RepairCaps:
# replace the blocks' repair capabilities (code, shard size, shard ids, holders; b"":
# none) with block ids above `after` up to `upto` by `put` (pages in order make a full
# upload, deleted blocks included), within a quota. RepairAway: the customer goes away
# now. FetchJournal / AckJournal: the signed entries of what the provider moved,
# numbered from 1; drop those up to `upto`.
MAX_CAPS_PAGE = 64
MAX_JOURNAL_PAGE = 256
REPAIR_CAP = Map({"block": ID, "k": Int(1, 255), "n": Int(1, 255),
                  "size": Int(1, MAX_SHARD), "ids": List(ID, min_len=1, max_len=255),
                  "holders": List(Bytes(max=32), min_len=1, max_len=255)})
OPS["RepairGrant"] = OpSpec(
    Map({"delegation": Bytes(min=1, max=MAX_DELEGATION),
         "peers": List(Map({"id": ID, "addr": Str(min=1, max=MAX_ADDR), "room": U64}),
                       max_len=1024)}),
    Map({"until": U64, "caps_bytes": U64, "caps_quota": U64}),
)
OPS["RepairCaps"] = OpSpec(
    Map({"after": Bytes(max=32), "upto": ID, "put": List(REPAIR_CAP, max_len=MAX_CAPS_PAGE)}),
    Map({"caps_bytes": U64, "caps_quota": U64}),
)
OPS["RepairAway"] = OpSpec(Map({}), Map({"away": Bool()}))
OPS["FetchJournal"] = OpSpec(
    Map({"after": U64, "limit": Int(1, MAX_JOURNAL_PAGE)}),
    Map({"entries": List(Bytes(min=1, max=512), max_len=MAX_JOURNAL_PAGE), "more": Bool()}),
)
OPS["AckJournal"] = OpSpec(Map({"upto": U64}), Map({"dropped": U64}))

REQUEST_SCHEMAS: dict[str, Schema] = {op: spec.request for op, spec in OPS.items()}
RESPONSE_SCHEMAS: dict[str, Schema] = {op: spec.response for op, spec in OPS.items()}
