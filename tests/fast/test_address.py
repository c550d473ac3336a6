"""Peer addresses are parsed once, strictly, into PeerAddr (fluidfs/peers/address.py)."""

from __future__ import annotations

import dataclasses

import pytest

from fluidfs.peers.address import (
    AddressError,
    PeerAddr,
    UnusableAddress,
    format_host_port,
    split_host_port,
)
from fluidfs.peers.connections import split_addr

GOOD = {
    "127.0.0.1:7470": ("127.0.0.1", 7470),
    "10.1.2.3:1": ("10.1.2.3", 1),
    "[::1]:65535": ("::1", 65535),
    "[2001:DB8::0001]:80": ("2001:db8::1", 80),
    "localhost:9": ("localhost", 9),
    "Peer-1.Example.ORG:443": ("peer-1.example.org", 443),
    "example.org.:443": ("example.org", 443),
    "xn--bcher-kva.example:5": ("xn--bcher-kva.example", 5),
}

MALFORMED = [
    "", "x", ":", "host:", ":80", "host:0", "host:65536", "host:99999", "host:-1", "host:+80",
    "host:8 0", "host:080000", "host:٨٠", "a b:1", "-bad.example:1", "bad-.example:1",
    "a..b:1", "a_b:1", "1.2.3:80", "127.1:80", "0x7f.0.0.1:80", "0x0:80", "1.2.3.04:80",
    "::1:80", "[::1]80", "[127.0.0.1]:80", "[fe80::1%eth0]:80", "[::1]", "é.example:1",
    "a" * 64 + ".example:1", ".".join(["a" * 60] * 5) + ":1", "h:" + "1" * 300,
]

UNUSABLE = ["0.0.0.0:7470", "0.1.2.3:5", "[::]:5", "224.0.0.1:5", "[ff02::1]:5",
            "255.255.255.255:5", "240.0.0.1:5", "[::ffff:0.0.0.0]:5"]


@pytest.mark.parametrize("text", GOOD)
def test_good_addresses_parse_to_their_canonical_form(text):
    addr = PeerAddr.parse(text)
    assert (addr.host, addr.port) == GOOD[text]
    assert PeerAddr.parse(str(addr)) == addr


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_addresses_are_refused(text):
    with pytest.raises(AddressError) as info:
        PeerAddr.parse(text)
    assert not isinstance(info.value, UnusableAddress), text


@pytest.mark.parametrize("text", UNUSABLE)
def test_addresses_that_reach_no_single_peer_are_unusable(text):
    with pytest.raises(UnusableAddress):
        PeerAddr.parse(text)


@pytest.mark.parametrize("value", [None, 7470, b"127.0.0.1:1", ["127.0.0.1:1"]])
def test_only_text_is_an_address(value):
    with pytest.raises(AddressError):
        PeerAddr.parse(value)


def test_the_type_holds_only_valid_values():
    with pytest.raises(AddressError):
        PeerAddr("LOCALHOST", 1)  # not canonical
    with pytest.raises(AddressError):
        PeerAddr("127.0.0.1", 0)
    with pytest.raises(UnusableAddress):
        PeerAddr("0.0.0.0", 1)
    addr = PeerAddr("::1", 5)
    assert str(addr) == "[::1]:5"
    with pytest.raises(dataclasses.FrozenInstanceError):
        addr.port = 6  # type: ignore[misc]


def test_listening_addresses_may_be_wildcards_and_port_zero():
    assert split_host_port("0.0.0.0:0", bind=True) == ("0.0.0.0", 0)
    assert split_addr("[::]:7470") == ("::", 7470)
    assert format_host_port("::", 7470) == "[::]:7470"
    assert format_host_port("127.0.0.1", 1) == "127.0.0.1:1"
    for text in ("x", "host:65536", "::1:80"):
        with pytest.raises(ValueError):
            split_addr(text)
