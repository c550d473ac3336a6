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


# --limit-upload/--limit-download, as rclone's --bwlimit: a bare number is KiB/s, K/M/G/T
# are binary bytes per second (B: bytes), and bits are spelled out in decimal units as
# ISPs and tc count them (kbit, Mbit, Gbit).
_RATE_BYTES = {"b": 1, "": 1 << 10, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_RATE_BITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
MIN_RATE = 1 << 10  # bytes per second: below one KiB/s a limit only stalls the node
RATE_HELP = (
    "a bare number is KiB/s, K/M/G are KiB/MiB/GiB per second, bits as 20Mbit "
    "(default: off, no limit)"
)


def bandwidth_limit(text: str) -> int | None:
    """A bandwidth limit in bytes per second: '512' or '512K' (KiB/s), '2M', '1.5G',
    '4096B', '20Mbit', '800kbit'; 'off' is no limit (None)."""
    spelled = text.strip()
    if spelled.lower() == "off":
        return None
    bits = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bits?(?:/s)?", spelled, re.IGNORECASE)
    octets = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?(?:/s)?", spelled, re.IGNORECASE)
    if bits:
        rate = int(float(bits.group(1)) * _RATE_BITS[bits.group(2).lower()] / 8)
    elif octets:
        rate = int(float(octets.group(1)) * _RATE_BYTES[octets.group(2).lower()])
    else:
        raise argparse.ArgumentTypeError(
            f"not a bandwidth: {text!r} (try 512K or 2M for bytes per second, "
            "20Mbit for bits, off for no limit)"
        )
    if rate < MIN_RATE:
        raise argparse.ArgumentTypeError(
            f"bandwidth limit {text!r} is below 1K (1 KiB/s); use off for no limit"
        )
    return rate


def bandwidth_text(rate: int) -> str:
    """The inverse of ``bandwidth_limit``: bytes per second, spelled with B."""
    return f"{rate}B"


RELAY_UNLIMITED = 0  # --relay-limit off: relayed connections are not paced


def relay_limit(text: str) -> int:
    """``--relay-limit``: bytes a second each way of one relayed connection, spelt as
    ``bandwidth_limit``; 'off' is ``RELAY_UNLIMITED``."""
    limit = bandwidth_limit(text)
    return RELAY_UNLIMITED if limit is None else limit


def relay_limit_text(rate: int) -> str:
    """The inverse of ``relay_limit``."""
    return "off" if rate == RELAY_UNLIMITED else bandwidth_text(rate)


def relay_count(text: str) -> int:
    """A relay bound (peers registered, connections relayed): 1 to 65536."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 65536:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65536: {value}")
    return value


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


_LIFETIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIFETIME = 365 * 86400


def lifetime(text: str) -> float:
    """How long something stays valid: '7d', '12h', '30m', '90s' or seconds; at most a
    year."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 7d or 12h)")
    value = float(match.group(1)) * _LIFETIME_UNITS[match.group(2).lower()]
    if not 0 < value <= MAX_LIFETIME:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 365d: {text}")
    return value


def listen_address(text: str) -> str:
    """HOST:PORT to listen on or dial (port 0 and 0.0.0.0 allowed); kept as text."""
    try:
        split_host_port(text, bind=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def peer_target(text: str) -> str:
    """What `peers add` takes: [PEERID@]HOST:PORT, or an invite code (checked); kept as
    text."""
    # Lazy: address records load the wire schema and nacl, which --help need not wait for.
    from fluidfs.peers.invite import InviteError, is_invite, read_invite

    if is_invite(text):
        try:
            read_invite(text)
        except InviteError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text
    if "@" in text:
        return peer_entry(text)
    return listen_address(text)


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
