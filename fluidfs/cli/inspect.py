"""Looking at a node: ``id``, ``peers``, ``status`` and ``check``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from fluidfs import keys as keymod
from fluidfs.cli.common import EXIT_USAGE, counted, fail
from fluidfs.cli.nodecall import call_node
from fluidfs.statedir import default_keyfile


def cmd_id(args: argparse.Namespace) -> None:
    """fluidfs id: print the peer id of the keyfile."""
    path = (args.keyfile or default_keyfile()).absolute()
    try:
        print(keymod.KeyRing(keymod.read_keyfile(path)).peer_id)
    except keymod.KeyfileError as exc:
        fail(str(exc))


def _ago(timestamp: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"


def cmd_peers(args: argparse.Namespace) -> None:
    """fluidfs peers [list] | peers add HOST:PORT | peers add CODE."""
    if args.action == "add":
        if not args.addr:
            fail("peers add needs [PEERID@]HOST:PORT or an invite code", EXIT_USAGE)
        # Imported here: the invite code's parser pulls in the network stack (trio), which
        # `status` and `peers` (a fresh process each, polled by scripts) do not need.
        from fluidfs.cli.invite import add_invited, is_invite

        if is_invite(args.addr):
            add_invited(args)
            return
        reply = call_node(args, "add_peer", addr=args.addr)
        note = "agreement made" if reply["agreement"] else "no agreement (yet)"
        print(f"added peer {reply['id']} at {args.addr.rpartition('@')[2]}: {note}")
        return
    if args.addr:
        fail("peers list takes no address", EXIT_USAGE)
    reply = call_node(args, "peers")
    rows = reply["peers"]
    if args.json:
        print(json.dumps(reply, indent=2))
        return
    providers = any(row.get("held_at") or row.get("their_side_at") for row in rows)
    print(f"{'PEER':<20} {'ADDRESS':<22} {'LAST SEEN':<10} {'WE HOST':>17} {'THEY HOST':>17}"
          + ("  PROVIDER" if providers else ""))
    for row in rows:
        print(
            f"{row['id'][:18] + '…':<20} {row['addr']:<22} {_ago(row['last_seen']):<10} "
            f"{human(row['we_use']) + '/' + human(row['we_host']):>17} "
            f"{human(row['they_use']) + '/' + human(row['they_host']):>17}"
            + (f"  {_provider_column(row)}" if providers else "")
            + (f"  LIAR: served a corrupt shard {_ago(row['caught'])}" if row.get("caught")
               else "")
            + ("  CUSTOMER" if row.get("customer") else "")
        )
    if "customers" in reply:
        _print_customers(reply["customers"])


def _provider_column(row: dict) -> str:
    """Where the sides of the agreement with this peer are held, if at a provider."""
    parts = []
    if row.get("held_at"):
        parts.append(f"ours at {row['held_at'][:12]}…")
    if row.get("their_side_at"):
        parts.append(f"theirs at {row['their_side_at'][:12]}…")
    return ", ".join(parts) or "-"


def _print_customers(customers: list[dict]) -> None:
    """A provider's customers: quota, reservations, bytes reserved and held."""
    print(f"\nserving as a storage provider for {len(customers)} customers:")
    print(f"{'CUSTOMER':<20} {'QUOTA':>9} {'RESERVATIONS':>12} {'RESERVED':>9} {'HELD':>9}")
    for row in customers:
        print(f"{row['id'][:18] + '…':<20} {human(row['quota']):>9} "
              f"{row['reservations']:>12} {human(row['reserved_bytes']):>9} "
              f"{human(row['held_bytes']):>9}")


def cmd_status(args: argparse.Namespace) -> None:
    """fluidfs status: peers, uploads and redundancy of the running node."""
    reply = call_node(args, "status")
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return
    n, k = reply["shards_total"], reply["shards_needed"]
    if "overview" in reply:
        print(f"{reply['overview']['level'].upper()}: {reply['overview']['sentence']}")
        for warning in reply["overview"]["warnings"]:
            print(f"  warning: {warning['text']}")
    print(f"peer id:     {reply['peer_id']}")
    print(f"listening:   {reply['listen'] or 'no'}")
    print(
        f"peers:       {reply['peers_known']} known, "
        f"{reply['peers_with_agreements']} with agreements"
    )
    print(f"blocks:      {reply['blocks']} ({reply['under_replicated']} under-replicated)")
    print(f"unsealed:    {human(reply['unsealed_bytes'])}")
    print(f"hosting:     {human(reply['hosted_bytes'])} for peers")
    if "provider" in reply:
        _print_provider(reply["provider"])
    if "leaving_provider" in reply:
        leaving = reply["leaving_provider"]
        print(f"leaving provider {leaving['id'][:18]}… at {leaving['addr']}: "
              f"{leaving['left']} agreements still held there, {leaving['brought_home']} "
              f"brought home ({leaving['copied']} shards copied)")
    if "serving_as_provider" in reply:
        serving = reply["serving_as_provider"]
        print(f"provider for: {serving['customers']} customers, {serving['reservations']} "
              f"reservations, {human(serving['reserved_bytes'])} reserved, "
              f"{human(serving['held_bytes'])} held")
    _print_provider_repairs(reply)
    if reply["local_shard_bytes"] or reply["redundancy"].get("local"):
        print(
            f"on this node: {human(reply['local_shard_bytes'])} of our own shards "
            f"({reply['redundancy'].get('local', 0)} blocks not yet on peers; they move "
            "there once enough peers have room)"
        )
    _print_uploads(reply)
    print(f"network:     {network_line(reply)}")
    if "relay" in reply:
        print(f"relaying:    {relay_line(reply['relay'])}")
    print(f"repair:      {reply['repair_queue']} blocks queued, "
          f"{human(reply['repaired_bytes'])} rebuilt, {human(reply['repair_rate'])}/s "
          f"(at most {human(reply['repair_bandwidth'])}/s)")
    if reply.get("endangered_blocks"):
        print(f"             {reply['endangered_blocks']} blocks down to K+1 reachable shards "
              "or fewer: repaired now, before their holders' tolerance ends")
    print(f"deleting:    {human(reply['gc_pending_bytes'])} of old shards still on peers")
    for line in durability_lines(reply.get("durability"), n):
        print(line)
    print(f"verified:    {reply['audit_challenges']} challenges and {reply['audit_fetches']} "
          f"whole shards in {reply['audit_cycles']} cycles")
    if "commit" in reply:
        print_commit_status(reply["commit"])
    print(f"redundancy:  shards on distinct peers, of {n} ({k} rebuild a block)")
    for level, count in reply["redundancy"].items():
        if level == "local":
            label = "on this node only"
        elif int(level) < k:
            label = f"{level:>3}/{n}  below {k}: not recoverable from peers"
        else:
            label = f"{level:>3}/{n}"
        print(f"  {label}: {count} blocks")
    _print_reachable(reply, n, k)


def _print_reachable(reply: dict, n: int, k: int) -> None:
    """Shards whose holder answers now, and the holders that are failing since when."""
    reachable, failing = reply.get("reachable", {}), reply.get("peers_failing", [])
    if not failing:
        return
    print(f"reachable:   shards whose holder is not failing now, of {n}")
    for level, count in reachable.items():
        note = f"  below {k}: not readable now" if int(level) < k else ""
        print(f"  {level:>3}/{n}{note}: {count} blocks")
    print(f"failing:     {len(failing)} holders (agreements end after the tolerance)")
    for peer in failing:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(peer["since"]))
        print(f"  {peer['id'][:18]}…  since {since} ({_ago(peer['since'])})")


def durability_lines(figures: dict | None, n: int) -> list[str]:
    """The estimated chance of losing data this year, with its assumptions one line below."""
    if figures is None:
        return [f"durability:  no estimate until the backup is on {n} peers"]
    spread = f"in groups of {n}" if figures["grouped"] and figures["peers"] >= 2 * n else "spread"
    how = "measured" if figures["rate_measured"] else "at most (the limit)"
    return [
        f"durability:  estimated chance of losing data this year: {figures['annual_loss']:.1g}",
        f"             ({figures['peers']} peers, {spread}; a peer assumed to last "
        f"{figures['lifetime_days']:.0f} days; a lost peer repaired in "
        f"{figures['repair_days']:.1f} days = {figures['tolerance_days']:g} days' tolerance + "
        f"{human(figures['share_bytes'])} re-created at {human(figures['repair_rate'])}/s, {how})",
    ]


def network_line(reply: dict) -> str:
    """Rates to and from peers against their limits, and when the uploads will be done."""

    def rate(key: str, limit: float | None) -> str:
        return f"{human(reply[key])}/s " + (f"of {human(limit)}/s" if limit else "(no limit)")

    eta = reply["upload_eta"]
    if eta == 0:
        done = "uploads done"
    elif eta is None:
        done = "upload ETA unknown (not moving)"
    else:
        done = f"upload ETA {duration(eta)}"
    return (
        f"sending {rate('send_rate', reply['limit_upload'])}, "
        f"receiving {rate('receive_rate', reply['limit_download'])}; {done}"
    )


def relay_line(load: dict) -> str:
    """What this node relays for peers nobody can dial, against its bounds."""
    rate = load["rate"]
    each = f"at most {human(rate)}/s each way" if rate else "no limit each"
    return (f"{load['registered']} of {load['max_registered']} peers registered, "
            f"{load['relayed']} of {load['max_relayed']} connections ({each}), "
            f"{human(load['bytes_relayed'])} relayed")


def duration(seconds: float) -> str:
    """A time span as '45s', '12m 5s', '3h 20m', '2d 4h'."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _print_provider_repairs(reply: dict) -> None:
    """What the provider repaired for us while we were away (issue 13 item 4), or, on a
    provider, the shards it re-created for its away customers."""
    repairs = reply.get("provider_repairs")
    if repairs is not None:
        if repairs["merged"] is None:
            away = "its journal not fetched yet"
        else:
            away = (f"while we were away it re-created {repairs['merged']} shards of "
                    f"{repairs['blocks']} blocks")
            if repairs["refused"]:
                away += f" ({repairs['refused']} journal entries refused)"
        print(f"provider repairs: {away}; repair capability "
              f"{human(repairs['caps_bytes'])} of {human(repairs['caps_quota'])}")
    for customer, count in (reply.get("repairing_for_customers") or {}).items():
        print(f"repaired for customer {customer[:18]}…: {count} shards re-created")


def _print_provider(provider: dict) -> None:
    """The provider line: who holds our side of the agreements, and whether it answers."""
    state = {True: "reachable", False: "NOT REACHABLE", None: "not asked yet"}
    answer = state[provider["reachable"]]
    if provider["reachable"] is False and provider["last_error"]:
        answer += f" ({provider['last_error']})"
    account = ""
    if provider.get("quota") is not None:
        account = (f"; our quota there {human(provider['quota'])}, "
                   f"{human(provider['held_bytes'])} held")
    elif provider.get("account_error") == "refused":
        account = "; NOT ADMITTED as its customer"
    print(f"provider:    {provider['id'][:18]}… at {provider['addr']}: {answer}; holds our "
          f"side of {provider['reservations']} agreements "
          f"({human(provider['reserved_bytes'])} reserved){account}")
    if provider.get("moving_from"):
        print(f"             moving from provider {provider['moving_from'][:18]}…: "
              f"{provider['moving']} agreements still held there")
    if provider.get("held_here"):
        print(f"             moving to this provider: {provider['held_here']} agreements "
              "still held here")


def _print_uploads(reply: dict) -> None:
    pending, rate = reply["upload_pending_bytes"], reply["upload_rate"]
    done = reply["uploaded_bytes"]
    eta = f"{pending / rate:.0f} s" if rate > 1 and pending else ("-" if pending else "done")
    if not sys.stdout.isatty():
        print(
            f"uploads:     {human(pending)} pending, {human(rate)}/s, ETA {eta} "
            f"({human(done)} sent)"
        )
        return
    # Lazy: rich draws the bar only on a terminal; scripts reading status need not load it.
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    progress = Progress(
        TextColumn("uploads:    "),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn(f"{human(pending)} pending · {human(rate)}/s · ETA {eta}"),
        console=Console(),
        auto_refresh=False,
    )
    progress.add_task("upload", total=max(done + pending, 1), completed=done)
    progress.refresh()
    progress.console.print(progress.get_renderable())


EXIT_UNRECOVERABLE = 1  # some file cannot be rebuilt
EXIT_DEGRADED = 3  # --read-data: every file rebuilds, but some copy is corrupt or missing


def cmd_check(args: argparse.Namespace) -> None:
    """fluidfs check: per-file recoverability; exit 1 if anything is unrecoverable. With
    --read-data every shard copy is fetched and verified: bad copies are listed per block
    and per peer, and a check that found one exits 3 if every file still rebuilds."""
    reply = call_node(args, "check", timeout=24 * 3600.0, read_data=args.read_data)
    files = reply["files"]
    bad = [f for f in files if f["state"] == "unrecoverable"]
    if args.json:  # the same exit codes as the table
        print(json.dumps(reply, indent=2))
        if bad:
            sys.exit(EXIT_UNRECOVERABLE)
        if reply.get("bad_blocks"):  # a block is listed only with a corrupt or missing copy
            sys.exit(EXIT_DEGRADED)
        return
    for f in files:
        print(f"{f['state'].upper():<14} {f['redundancy']:>7}  {f['path']}")
    blocks = reply.get("bad_blocks", [])
    for b in blocks:
        parts = [f"{len(b['corrupt'])} corrupt ({', '.join(p[:12] for p in b['corrupt'])})"
                 if b["corrupt"] else "",
                 f"{len(b['missing'])} missing ({', '.join(p[:12] for p in b['missing'])})"
                 if b["missing"] else ""]
        print(f"BLOCK {b['block'][:16]} {b['good']}/{b['total']} good copies: "
              f"{'; '.join(p for p in parts if p)}  (in {b['path']})")
    by_peer = reply.get("copies_by_peer", {})
    for peer, counts in sorted(by_peer.items()):
        if counts.get("corrupt") or counts.get("missing"):
            print(f"PEER {peer}: {counts.get('good', 0)} good, {counts.get('corrupt', 0)} "
                  f"corrupt, {counts.get('missing', 0)} missing copies")
    what = "every shard copy fetched and verified" if args.read_data else "holders probed"
    copies = sum(len(b["corrupt"]) + len(b["missing"]) for b in blocks)
    print(
        f"fluidfs check: {len(files)} files, {len(bad)} unrecoverable, "
        f"{copies} bad shard copies in {len(blocks)} blocks ({what}; "
        f"{reply['shards_needed']} shards rebuild a block)"
    )
    if bad:
        print("fluidfs check: UNRECOVERABLE: some files cannot be rebuilt")
        sys.exit(EXIT_UNRECOVERABLE)
    if copies:
        print("fluidfs check: DEGRADED: every file can be rebuilt, but some copies are bad "
              "(repair re-creates them)")
        sys.exit(EXIT_DEGRADED)


def print_commit_status(commit: dict) -> None:
    """The commit lines of `fluidfs status`."""
    if commit["head_seq"]:
        age = max(0, int(time.time() - commit["head_time"]))
        state = "published" if commit["published"] else "not yet on peers"
        line = f"commit {commit['head_seq']}, {age} s ago, {state}"
    else:
        line = "none yet"
    if commit["changes_pending"]:
        line += "; changes waiting for the next commit"
    print(f"committed:   {line}; {counted(commit['snapshots'], 'snapshot')}")
    if not commit["writer"]:
        print(f"writer:      no, this mount is read-only: {commit['last_error']}")
    if commit.get("unpublished"):
        print("warning:     writes acknowledged by this mount were never published before it "
              "lost the writer lease; they are readable here only: copy what you need out "
              "of this mount before unmounting")
    if commit.get("conflicts"):
        print(f"warning:     .fluidfs-conflicts/ holds writes acknowledged by a mount that "
              f"was replaced before it could publish them ({', '.join(commit['conflicts'])}): "
              "move what you need into place, then delete the folder")
    if commit["lazy_dirs"] or not commit["index_complete"]:
        print(f"restoring:   {commit['lazy_dirs']} directories not fetched yet")
