"""A network lab: Linux network namespaces standing in for the internet and home routers.

One lab is a set of namespaces named ``<tag>-<name>`` (``tag`` is ``fl`` and six random
hex digits, so labs of tests running at once never meet):

- ``<tag>-inet``: the internet, a bridge ``br0`` that every public interface joins;
  addresses in 198.51.100.0/24 (TEST-NET-2, a documentation range routed nowhere);
- a *public host* (``lab.public("p1")``): one namespace, ``eth0`` on the internet with
  198.51.100.(10+i); no default route is needed, everything public is on one /24;
- a *home* (``lab.home("h1", upnp=True)``): a router namespace with ``wan`` on the
  internet (198.51.100.(100+i)) and a bridge ``lan`` for 10.i.0.0/24 (router 10.i.0.1),
  doing NAT (iptables MASQUERADE) and dropping new connections from outside that no
  port mapping asked for; ``home.host("m")`` adds a machine (10.i.0.2, …) whose default
  route is the router. With ``upnp=True`` the router runs ``miniupnpd`` (UPnP-IGD and
  NAT-PMP), its config, pid and lease files in the lab's directory.

Rates (``up=``/``down=``, bits per second) shape a host's link with ``tc`` token-bucket
filters (``tbf``) on each end of its veth pair (``tc netem`` is not available here).

Processes run inside a namespace with ``nsenter --net=/var/run/netns/NAME``: unlike
``ip netns exec`` it keeps the caller's mount namespace, so a FUSE mount made inside is
visible to the test. Nothing is configured in the host's own namespace and no route
leads out of the lab: its only traffic is between its namespaces (and their loopback).

Teardown (``close``: a fixture finalizer, and ``atexit`` for anything left) kills every
process the lab started and every process still inside its namespaces (by pid), then
deletes the namespaces, which removes their veths and bridges.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NETNS_DIR = Path("/var/run/netns")
INTERNET = ipaddress.IPv4Network("198.51.100.0/24")
# miniupnpd 2.3 refuses to map ports when its external address is in any reserved or
# documentation range (it would be behind another NAT), so routers running it take their
# address from this range instead. It exists only inside the lab: no route leads out.
UPNP_WAN = ipaddress.IPv4Network("192.0.3.0/24")
_LIVE: set[Lab] = set()


class LabError(RuntimeError):
    """A lab command failed."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def nsenter(ns: str) -> list[str]:
    """The argv prefix that runs a command in namespace *ns* (network only)."""
    return ["nsenter", f"--net={NETNS_DIR / ns}", "--"]


def _burst(rate: int) -> int:
    """Bucket size in bytes for *rate* bits/s: 20 ms of traffic, at least 64 KiB (one GSO
    segment must fit, or tbf drops it)."""
    return max(64 * 1024, rate // 8 // 50)


@dataclass(eq=False)
class Host:
    """A machine: one network namespace with one interface ``eth0``."""

    lab: Lab
    name: str
    ns: str
    ip: str
    gateway: str | None = None  # default route (hosts in a home)
    outer_ns: str = ""  # the namespace holding the other end of eth0
    outer_if: str = ""
    iface: str = "eth0"  # its interface ("wan" on a router)

    def argv(self, *argv: str) -> list[str]:
        """*argv* prefixed to run inside this host's namespace."""
        return [*nsenter(self.ns), *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """Run a command inside the host; return its output."""
        return _run(self.argv(*argv), check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start a process inside the host; the lab kills it at teardown."""
        proc = subprocess.Popen(self.argv(*argv), **kw)
        self.lab.procs.append(proc)
        return proc

    def shape(self, up: int | None = None, down: int | None = None) -> None:
        """Token-bucket limits in bits/s on the host's uplink and downlink (None: none)."""
        for ns, dev, rate in ((self.ns, self.iface, up), (self.outer_ns, self.outer_if, down)):
            if rate is None:
                _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            else:
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                      "rate", f"{rate}bit", "burst", str(_burst(rate)), "latency", "200ms"])

    def link(self, up: bool) -> None:
        """Cut (False) or restore (True) the host's cable."""
        _run(["ip", "-n", self.ns, "link", "set", self.iface, "up" if up else "down"])
        if up:
            self._routes()

    def readdress(self, ip: str) -> None:
        """Give the host a new address (its old one stops working at once, and its
        connections with it: the kernel resets them as a new DHCP lease would)."""
        _run(["ip", "-n", self.ns, "addr", "flush", "dev", self.iface])
        _run(["ip", "-n", self.ns, "addr", "add", f"{ip}/24", "dev", self.iface])
        self._routes()
        self.ip = ip

    def _routes(self) -> None:
        if self.gateway:
            _run(["ip", "-n", self.ns, "route", "replace", "default", "via", self.gateway])
        else:  # on the internet: both lab ranges are on this one wire
            for net in (INTERNET, UPNP_WAN):
                _run(["ip", "-n", self.ns, "route", "replace", str(net), "dev", self.iface])


@dataclass(eq=False)
class Home:
    """A home network: a NAT router and the machines behind it."""

    lab: Lab
    router: Host
    number: int  # the home's LAN is 10.<number>.0.0/24
    upnp: bool
    hosts: list[Host] = field(default_factory=list)
    miniupnpd: subprocess.Popen | None = None

    @property
    def public_ip(self) -> str:
        """The router's address on the internet (what peers see a home machine as)."""
        return self.router.ip

    def host(self, name: str, up: int | None = None, down: int | None = None) -> Host:
        """A machine on this home's LAN (10.<home>.0.<2+i>), routed through the router."""
        ip = f"10.{self.number}.0.{len(self.hosts) + 2}"
        gateway = f"10.{self.number}.0.1"
        host = self.lab.add_host(name, ip, self.router.ns, "lan", gateway=gateway)
        self.hosts.append(host)
        if up is not None or down is not None:
            host.shape(up, down)
        return host


class Lab:
    """Namespaces, veths and processes of one test's network; ``close`` removes them all."""

    def __init__(self, root: Path, tag: str | None = None) -> None:
        self.root = root
        self.tag = tag or "fl" + secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.hosts: dict[str, Host] = {}
        self.homes: list[Home] = []
        self._ifaces = 0
        self._public = 0
        _LIVE.add(self)
        try:
            self.inet = self._namespace("inet")
            _run(["ip", "-n", self.inet, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self.inet, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise

    # --- building -----------------------------------------------------------------------

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        if len(ns) > 60 or "/" in ns:
            raise LabError(f"bad namespace name {ns!r}")
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def add_host(self, name: str, ip: str, outer_ns: str, bridge: str, *,
                 gateway: str | None = None, inner_if: str = "eth0") -> Host:
        """A namespace *name* whose *inner_if* is a veth to *bridge* in *outer_ns*."""
        if name in self.hosts:
            raise LabError(f"host {name!r} exists")
        ns = self._namespace(name)
        self._ifaces += 1
        outer_if = f"v{self._ifaces}"
        _run(["ip", "-n", outer_ns, "link", "add", outer_if, "type", "veth",
              "peer", "name", inner_if, "netns", ns])
        _run(["ip", "-n", outer_ns, "link", "set", outer_if, "master", bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", inner_if])
        _run(["ip", "-n", ns, "link", "set", inner_if, "up"])
        host = Host(self, name, ns, ip, gateway, outer_ns, outer_if, inner_if)
        host._routes()
        self.hosts[name] = host
        return host

    def public_ip(self) -> str:
        """The next free address for a public host."""
        self._public += 1
        if self._public > 89:
            raise LabError("at most 89 public hosts")
        return str(INTERNET[10 + self._public - 1])

    def public(self, name: str, up: int | None = None, down: int | None = None) -> Host:
        """A machine with a public address on the internet."""
        host = self.add_host(name, self.public_ip(), self.inet, "br0")
        if up is not None or down is not None:
            host.shape(up, down)
        return host

    def home(self, name: str, *, upnp: bool = False, up: int | None = None,
             down: int | None = None) -> Home:
        """A home behind a NAT router (with miniupnpd if *upnp*); rates shape its line."""
        number = len(self.homes) + 1
        if number > 99:
            raise LabError("at most 99 homes")
        wan_ip = str((UPNP_WAN if upnp else INTERNET)[100 + number])
        router = self.add_host(name, wan_ip, self.inet, "br0", inner_if="wan")
        ns = router.ns
        _run(["ip", "-n", ns, "link", "add", "lan", "type", "bridge"])
        _run(["ip", "-n", ns, "addr", "add", f"10.{number}.0.1/24", "dev", "lan"])
        _run(["ip", "-n", ns, "link", "set", "lan", "up"])
        router.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # NAT out of the home; nothing new comes in unless a port mapping (DNAT) asked.
        router.run("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", "wan",
                   "-j", "MASQUERADE")
        router.run("iptables", "-w", "-A", "FORWARD", "-i", "wan", "-m", "conntrack",
                   "--ctstate", "NEW", "-m", "conntrack", "!", "--ctstate", "DNAT",
                   "-j", "DROP")
        home = Home(self, router, number, upnp)
        self.homes.append(home)
        if up is not None or down is not None:
            router.shape(up, down)
        if upnp:
            home.miniupnpd = self._start_miniupnpd(home)
        return home

    def _start_miniupnpd(self, home: Home) -> subprocess.Popen:
        router = home.router
        rules = self.root / f"{router.ns}.nft"
        rules.write_text(MINIUPNPD_TABLES)
        router.run("nft", "-f", str(rules))
        conf = self.root / f"{router.ns}-miniupnpd.conf"
        leases = self.root / f"{router.ns}.leases"
        conf.write_text(MINIUPNPD_CONF.format(number=home.number, ext_ip=router.ip,
                                              uuid=_uuid(), leases=leases))
        log = open(self.root / f"{router.ns}-miniupnpd.log", "ab")  # noqa: SIM115
        proc = router.popen(["miniupnpd", "-d", "-f", str(conf),
                             "-P", str(self.root / f"{router.ns}-miniupnpd.pid")],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 15
        while "5351" not in router.run("ss", "-lun", check=False):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"miniupnpd did not start in {router.ns}: "
                               f"{(self.root / f'{router.ns}-miniupnpd.log').read_text()}")
            time.sleep(0.05)
        return proc

    # --- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill the lab's processes and delete its namespaces (never raises)."""
        for proc in self.procs:
            with contextlib.suppress(Exception):
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=10)
        for ns in reversed(self.namespaces):
            # Whatever still runs inside (a daemonised mount): by pid, then the namespace.
            pids = _run(["ip", "netns", "pids", ns], check=False).split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            for pid in pids:
                _wait_gone(int(pid))
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()
        _LIVE.discard(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _uuid() -> str:
    raw = secrets.token_hex(16)
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


@atexit.register
def _close_all() -> None:
    for lab in list(_LIVE):
        lab.close()


# The nftables chains miniupnpd (nftables backend) fills with its mappings.
MINIUPNPD_TABLES = """\
table inet filter {
    chain forward {
        type filter hook forward priority 0; policy accept;
        jump miniupnpd
    }
    chain miniupnpd {
    }
    chain prerouting {
        type nat hook prerouting priority -100; policy accept;
        jump prerouting_miniupnpd
    }
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        jump postrouting_miniupnpd
    }
    chain prerouting_miniupnpd {
    }
    chain postrouting_miniupnpd {
    }
}
"""

MINIUPNPD_CONF = """\
ext_ifname=wan
ext_ip={ext_ip}
listening_ip=lan
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
notify_interval=60
clean_ruleset_interval=600
uuid={uuid}
lease_file={leases}
allow 1024-65535 10.{number}.0.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


@pytest.fixture(name="lab")
def lab_fixture(tmp_path: Path) -> Iterator[Lab]:
    """A fresh lab for one test (fixture ``lab``: import ``lab_fixture`` into a test
    module); every namespace and process is gone afterwards."""
    made = Lab(tmp_path)
    try:
        yield made
    finally:
        made.close()


# --- small tools for tests: a TCP sink and a sender, run inside namespaces -----------------

SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
while True:
    c, a = s.accept()
    got, t0 = 0, time.monotonic()
    while chunk := c.recv(1 << 16):
        got += len(chunk)
    print(a[0], got, time.monotonic() - t0, flush=True)
    c.close()
"""

SEND = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
left, block = int(sys.argv[3]), b"x" * (1 << 16)
while left > 0:
    left -= c.send(block[:left])
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def start_sink(host: Host, port: int) -> subprocess.Popen:
    """A TCP server on *port* inside *host*: prints ``SOURCE_IP BYTES SECONDS`` per
    connection (the source as the server saw it, after any NAT)."""
    proc = host.popen([sys.executable, "-c", SINK, str(port)], stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


def send(host: Host, ip: str, port: int, size: int, timeout: float = 3.0) -> bool:
    """Send *size* bytes from *host* to ip:port; True if it connected and delivered."""
    result = subprocess.run(host.argv(sys.executable, "-c", SEND, ip, str(port), str(size),
                                      str(timeout)),
                            capture_output=True, text=True, timeout=120)
    return result.returncode == 0
