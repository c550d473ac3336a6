#!/usr/bin/env python3
"""Bring up a network lab of fluidfs peers in Linux network namespaces, and tear it down.

Run as root from the repository (uses tests/netlab.py; needs iproute2, iptables, nftables
and miniupnpd: ``bash contrib/setup.sh``):

    .venv/bin/python contrib/netlab.py --public 6 --upnp-homes 4 --nat-homes 2 \\
        --up 20mbit --down 200mbit --dir /tmp/fluidlab

Public peers get 198.51.100.x on the lab's internet; each home is a NAT router (192.0.3.x
with miniupnpd, 198.51.100.x without) and one machine 10.<home>.0.2 behind it. Every
machine runs ``fluidfs serve`` (``--no-peers``: nothing runs), the first public peer
being everyone's bootstrap. The script prints how to enter each namespace, e.g.

    nsenter --net=/var/run/netns/<tag>-home1-pc bash

and keeps the lab up until Ctrl-C (or SIGTERM), then kills the peers and deletes every
namespace. Nothing is configured in the host's own network namespace.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netlab import Host, Lab

from fluidfs import keys

PORT = 7470
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?)(bit)?$", re.IGNORECASE)


def rate(text: str) -> int:
    """'20mbit', '20M' or '20000000' → bits per second."""
    match = _RATE.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 20mbit)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def start_peer(host: Host, root: Path, bootstrap: str | None, donate: str) -> None:
    """`fluidfs serve` inside *host*, listening on its own address."""
    state, keyfile = root / host.name, root / f"{host.name}.key"
    if not keyfile.exists():
        keys.write_keyfile(keyfile, keys.generate())
    argv = [sys.executable, "-m", "fluidfs", "serve", "--keyfile", str(keyfile),
            "--state-dir", str(state), "--listen", f"{host.ip}:{PORT}", "--donate", donate]
    if bootstrap:
        argv += ["--peer", bootstrap]
    log = open(root / f"{host.name}.log", "ab")  # noqa: SIM115 - the child keeps it
    host.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--public", type=int, default=3, help="peers with a public address")
    parser.add_argument("--upnp-homes", type=int, default=1, help="homes whose router has UPnP")
    parser.add_argument("--nat-homes", type=int, default=1, help="homes behind NAT, no UPnP")
    parser.add_argument("--up", type=rate, default=None, help="uplink of every machine")
    parser.add_argument("--down", type=rate, default=None, help="downlink of every machine")
    parser.add_argument("--donate", default="2G", help="what each peer donates")
    parser.add_argument("--no-peers", action="store_true", help="only the network")
    parser.add_argument("--dir", type=Path, required=True, help="logs, states, configs")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    stop = False

    def interrupted(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    with Lab(args.dir) as lab:
        hosts = [lab.public(f"pub{i + 1}", args.up, args.down) for i in range(args.public)]
        for i in range(args.upnp_homes + args.nat_homes):
            home = lab.home(f"home{i + 1}", upnp=i < args.upnp_homes)
            hosts.append(home.host(f"home{i + 1}-pc", args.up, args.down))
        bootstrap = f"{hosts[0].ip}:{PORT}" if hosts and args.public else None
        print(f"lab {lab.tag}: the internet is namespace {lab.inet}")
        for n, host in enumerate(hosts):
            if not args.no_peers:
                start_peer(host, args.dir, bootstrap if n else None, args.donate)
            where = f"behind {host.gateway}" if host.gateway else "public"
            print(f"  {host.name:12} {host.ip:15} {where:18} nsenter --net=/var/run/netns/"
                  f"{host.ns} bash")
        print(f"logs and states in {args.dir}; Ctrl-C tears the lab down", flush=True)
        while not stop:
            time.sleep(0.5)
        print("tearing down", flush=True)


if __name__ == "__main__":
    main()
