"""From command-line arguments to a running node's settings (``mount`` and ``serve``).

The ``NodeConfig`` of each command, the test-only faults of a serving peer, the pinned
bootstrap peers, and the process settings every node process runs with.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from fluidfs import keys as keymod
from fluidfs.blocks.audit import AuditPolicy
from fluidfs.blocks.repair import RepairPolicy
from fluidfs.cli.argtypes import RELAY_UNLIMITED
from fluidfs.cli.common import EXIT_USAGE, fail
from fluidfs.net.limits import DEFAULT_LIMITS
from fluidfs.node import logsetup
from fluidfs.node.config import NodeConfig
from fluidfs.node.node import Node
from fluidfs.peers.lifecycle import LifecyclePolicy
from fluidfs.peers.portmap import PortMapPolicy
from fluidfs.peers.reach import ReachPolicy
from fluidfs.peers.relay import RelayPolicy
from fluidfs.remount.options import RemountOptions
from fluidfs.service.customer_repair import RepairForCustomersPolicy
from fluidfs.service.faults import FaultInjection
from fluidfs.statedir import StateDir
from fluidfs.sysutil import tune_malloc


def setup_node_process(log_file: Path | None = None) -> None:
    """Logging, file-mode and allocator settings for a process that runs a node.

    Everything the node creates (LMDB files, cache, log, control socket) is for its
    owner only: umask 077 from the start, so no file is ever briefly readable by others.
    The log is rate-limited per cause and, in a file, rotated (logsetup.py).
    """
    os.umask(0o077)
    logsetup.configure(log_file)
    tune_malloc()


def bootstrap_entries(
    args: argparse.Namespace, keyring: keymod.KeyRing
) -> list[keymod.BootstrapPeer]:
    """The --peer entries and the keyfile's, parsed, without repeats."""
    entries = [keymod.parse_peer(p) for p in args.peer] + keyring.keyfile.bootstrap()
    return list({str(e): e for e in entries}.values())


def add_pinned(node: Node, entries: list[keymod.BootstrapPeer]) -> None:
    """Bootstrap entries naming a peer id become known peers, dialled only as that peer.

    They are not dialled as bare addresses (that would let whoever answers there in):
    the node's reconnect, discovery and remount dial known peers with the identity
    they must prove (peers/connections.py, ``Connections.get``).
    """
    pinned = [e for e in entries if e.key is not None and e.key != node.peers.self_key]
    for entry in pinned:
        known = node.peers.get(entry.key)
        if known is None or not known.addr:
            node.peers.add(entry.key, entry.addr)
    if pinned:
        node.blocks.use_network(node.remote)


def _peer_settings(args: argparse.Namespace, entries: list[keymod.BootstrapPeer]) -> dict:
    """NodeConfig fields from the options every node command takes (options.py, NODE)."""
    return {
        "listen": args.listen,
        "donate": args.donate,
        "bootstrap": [e.addr for e in entries if e.key is None],
        "ratio": args.ratio,
        "term": args.term,
        "audit": AuditPolicy(interval=args.audit_interval,
                             retrieve_budget=args.audit_fetch_budget),
        "reach": ReachPolicy(interval=args.reach_interval),
        "portmap": PortMapPolicy(enabled=not args.no_upnp),
        "relay_via": tuple(args.relay_via),
        "lifecycle": LifecyclePolicy(
            tolerance=args.tolerance,
            keep=args.keep_shards,
            tick=min(60.0, max(0.5, args.tolerance / 4)),
            cooldown=args.tolerance,  # one tolerance period, as documented
        ),
        "repair": RepairPolicy(bandwidth=args.repair_bandwidth),
        "repair_threshold": args.repair_threshold,
        "even_placement": args.placement == "even",
        "trust": args.trust,
        "limit_upload": args.limit_upload,
        "limit_download": args.limit_download,
    }


def mount_config(args: argparse.Namespace, keyring: keymod.KeyRing, state: StateDir) -> NodeConfig:
    """NodeConfig of ``fluidfs mount``."""
    entries = bootstrap_entries(args, keyring)
    return NodeConfig(
        keyring,
        state,
        cache_size=args.cache_size,
        block_size=args.block_size,
        stores_data=True,
        remount=remount_options(args, [e for e in entries if e.key is not None]),
        web=None if args.no_web else args.web,
        web_refresh=args.web_refresh,
        use_provider=provider_entry(args.use_provider),
        provider_repairs=provider_repairs(args),
        **_peer_settings(args, entries),
    )


def provider_repairs(args: argparse.Namespace) -> bool:
    """``--provider-repairs`` makes sense only with a ``--provider``."""
    if args.provider_repairs and args.use_provider is None:
        fail("--provider-repairs needs --provider PEERID@HOST:PORT", EXIT_USAGE)
    return bool(args.provider_repairs)


def customer_repairs(tolerance: float) -> RepairForCustomersPolicy:
    """A provider's repairs for away customers, scaled to the tolerance: a holder silent
    for the tolerance has lost its shards (as the customer's own lifecycle would end its
    agreement); a customer silent for ten passes has gone away without saying so."""
    interval = min(60.0, max(0.5, tolerance / 4))
    return RepairForCustomersPolicy(interval=interval, lost_after=tolerance,
                                    silence=10 * interval)


def provider_entry(text: str | None) -> tuple[bytes, str] | None:
    """``--provider PEERID@HOST:PORT`` as (id, address): the id is required, so no one
    else answering at that address can take our side of the agreements."""
    if text is None:
        return None
    entry = keymod.parse_peer(text)
    if entry.key is None:
        fail("--provider needs the provider's id: PEERID@HOST:PORT", EXIT_USAGE)
    return entry.key, entry.addr


def remount_options(
    args: argparse.Namespace, pinned: list[keymod.BootstrapPeer]
) -> RemountOptions:
    """RemountOptions from ``fluidfs mount`` arguments (unset ones keep their defaults)."""
    given = {
        "retention": args.retention,
        "commit_quiet": args.commit_quiet,
        "commit_max_delay": args.commit_max_delay,
        "lease_renew": args.lease_renew,
        "refresh_interval": args.refresh_interval,
        "restore_wait": args.restore_wait,
    }
    return RemountOptions(
        takeover=args.takeover,
        mountpoint=str(args.mountpoint.expanduser().absolute()),
        new=args.new,
        pinned=pinned,
        **{name: value for name, value in given.items() if value is not None},
    )


def serve_config(args: argparse.Namespace, keyring: keymod.KeyRing, state: StateDir) -> NodeConfig:
    """NodeConfig of ``fluidfs serve``: a peer that accepts agreements and proposes none."""
    return NodeConfig(
        keyring,
        state,
        stores_data=False,
        net_limits=args.net_limits or DEFAULT_LIMITS,
        provider=args.provider,
        customer_repairs=customer_repairs(args.tolerance),
        relay=relay_policy(args),
        **_peer_settings(args, bootstrap_entries(args, keyring)),
    )


def relay_policy(args: argparse.Namespace) -> RelayPolicy | None:
    """The bounds of ``serve --relay`` (None without ``--relay``); the defaults of
    RelayPolicy for the options not given."""
    given = {"max_registered": args.relay_max_peers, "max_relayed": args.relay_max_connections,
             "rate": args.relay_limit}
    if not args.relay:
        named = [flag for flag, value in zip(
            ("--relay-max-peers", "--relay-max-connections", "--relay-limit"),
            given.values(), strict=True) if value is not None]
        if named:
            fail(f"{', '.join(named)} only apply with --relay", EXIT_USAGE)
        return None
    settings = {name: value for name, value in given.items() if value is not None}
    if settings.get("rate") == RELAY_UNLIMITED:
        settings["rate"] = None
    policy = RelayPolicy(**settings)
    return replace(policy, max_per_peer=min(policy.max_per_peer, policy.max_relayed))


def serve_faults(args: argparse.Namespace) -> FaultInjection:
    """The test-only misbehaviour ``fluidfs serve`` was asked for (hidden options)."""
    return FaultInjection(fault_rate=args.fault_rate, lie_on_retrieve=args.lie_on_retrieve)
