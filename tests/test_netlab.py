"""The network lab itself (tests/netlab.py): NAT, shaping, UPnP and a clean teardown."""

from __future__ import annotations

import subprocess
import time

from netlab import Lab, lab_fixture, send, start_sink  # noqa: F401 - the lab fixture

MBIT = 1_000_000


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_a_home_dials_out_but_cannot_be_dialled(lab: Lab) -> None:
    """A machine behind the NAT router reaches a public host, which sees the router's
    address; the public host can reach neither the machine's private address nor the
    router's public one (no port mapping was asked for)."""
    public = lab.public("pub")
    home = lab.home("home")
    machine = home.host("pc")
    sink = start_sink(public, 9000)
    assert send(machine, public.ip, 9000, 1000)
    source, size, _ = sink.stdout.readline().split()
    assert (source, int(size)) == (home.public_ip, 1000)

    start_sink(machine, 9001)
    assert not send(public, machine.ip, 9001, 10, timeout=1.0)
    assert not send(public, home.public_ip, 9001, 10, timeout=1.0)


def test_shaping_limits_a_transfer_rate(lab: Lab) -> None:
    """An 8 Mbit/s uplink carries 3 MB in about 3 s, not at memory speed; the receiver's
    downlink is shaped the same way from the other end."""
    sender = lab.public("tx", up=8 * MBIT)
    receiver = lab.public("rx", down=200 * MBIT)
    sink = start_sink(receiver, 9000)
    size = 3_000_000
    started = time.monotonic()
    assert send(sender, receiver.ip, 9000, size, timeout=30)
    elapsed = time.monotonic() - started
    _, got, _ = sink.stdout.readline().split()
    assert int(got) == size
    rate = size * 8 / elapsed
    assert 4 * MBIT < rate < 8 * MBIT * 1.1, f"{rate / MBIT:.1f} Mbit/s"

    receiver.shape(down=4 * MBIT)
    started = time.monotonic()
    assert send(sender, receiver.ip, 9000, size // 2, timeout=30)
    rate = size // 2 * 8 / (time.monotonic() - started)
    assert 2 * MBIT < rate < 4 * MBIT * 1.1, f"{rate / MBIT:.1f} Mbit/s"


def test_teardown_leaves_nothing(tmp_path) -> None:
    """Closing a lab removes its namespaces and kills the processes started in them."""
    with Lab(tmp_path) as made:
        home = made.home("h", upnp=True)
        host = home.host("pc")
        sink = start_sink(host, 9000)
        names = set(made.namespaces)
        assert names <= netns_names()
    assert not names & netns_names()
    assert sink.poll() is not None
