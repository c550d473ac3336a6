"""Argument types: command-line text to values (argparse ``type=``) and values back to text.

Each parser raises ``argparse.ArgumentTypeError`` with one line that argparse prints.
Each ``*_text`` function is the inverse its option uses when the background mount
re-runs the command line (options.py): parsing its output gives the same value.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import TYPE_CHECKING

from fluidfs import keys as keymod
from fluidfs.peers.address import split_host_port
from fluidfs.peers.trust import TrustPolicy, parse_policy

if TYPE_CHECKING:
    from fluidfs.fs.snapshots import Retention
    from fluidfs.net.limits import NetLimits

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse '512M', '2G', '1GiB', '4096' into bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 2G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def shard_count(text: str) -> int:
    """A number of shards (or peers): a whole number from 1 to 256."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"must be between 1 and 256: {value}")
    return value


def seconds(text: str) -> float:
    """A duration in seconds, more than 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text}")
    return value


def listen_address(text: str) -> str:
    """HOST:PORT to listen on or dial (port 0 and 0.0.0.0 allowed); kept as text."""
    try:
        split_host_port(text, bind=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def peer_entry(text: str) -> str:
    """[PEERID@]HOST:PORT, checked and kept as text."""
    try:
        keymod.parse_peer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def trust_policy(text: str) -> TrustPolicy:
    """Trust model parameters 'rise=1.05,fall=0.7,...' (peers/trust.py)."""
    try:
        return parse_policy(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def trust_text(policy: TrustPolicy) -> str:
    """The inverse of ``trust_policy``: every field, K=V,..."""
    return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(policy).items())


def net_limits(text: str) -> NetLimits:
    """Network limits K=V,... (net/limits.py); tests shrink timeouts."""
    # Lazy: the fluidfs.net package loads trio, which `fluidfs --help` should not wait for.
    from fluidfs.net.limits import parse_limits

    try:
        return parse_limits(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def retention(text: str) -> Retention:
    """Snapshot retention rules 'all=1d,hourly=7d,...' (fs/snapshots.py)."""
    # Lazy: fs.snapshots loads trio and pyfuse3, which `fluidfs --help` should not wait for.
    from fluidfs.fs.snapshots import Retention

    try:
        return Retention.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
