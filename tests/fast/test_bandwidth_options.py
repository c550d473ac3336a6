"""`--limit-upload` / `--limit-download`: what a user types, and what the node then limits.

The convention is rclone's ``--bwlimit``: a bare number is KiB/s, K/M/G are binary bytes
per second; bits are spelled out (``20Mbit``, decimal as ISPs count them).
"""

from __future__ import annotations

import pytest

from fluidfs.cli.main import build_parser

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("512", 512 * KIB),  # bare: KiB/s, as rclone
        ("512K", 512 * KIB),
        ("512k", 512 * KIB),
        ("2M", 2 * MIB),
        ("2MiB", 2 * MIB),
        ("2MB/s", 2 * MIB),
        ("1.5G", int(1.5 * GIB)),
        ("4096B", 4096),
        ("20Mbit", 20 * 10**6 // 8),
        ("20mbit/s", 20 * 10**6 // 8),
        ("800kbit", 800 * 10**3 // 8),
        ("1Gbit", 10**9 // 8),
    ],
)
def test_limits_parse_as_rclone_does(text: str, rate: int) -> None:
    for command in (["mount", "/mnt/x"], ["serve"]):
        args = build_parser().parse_args([*command, "--limit-upload", text,
                                          "--limit-download", text])
        assert (args.limit_upload, args.limit_download) == (rate, rate)


def test_no_limit_unless_asked() -> None:
    args = build_parser().parse_args(["serve"])
    assert args.limit_upload is None and args.limit_download is None
    args = build_parser().parse_args(["serve", "--limit-upload", "off"])
    assert args.limit_upload is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("fast", "not a bandwidth: 'fast'"),
        ("-1M", "not a bandwidth"),
        ("20Mbyte", "not a bandwidth"),
        ("10X", "not a bandwidth"),
        ("", "not a bandwidth"),
        ("0", "below 1K"),
        ("100B", "below 1K"),
        ("4kbit", "below 1K"),
    ],
)
def test_bad_limits_are_refused_with_a_reason(text: str, says: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", f"--limit-upload={text}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--limit-upload" in err and says in err


def test_help_says_the_units() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    text = " ".join(commands.choices["mount"].format_help().split())
    assert "bare number is KiB/s" in text and "20Mbit" in text


def test_the_node_limits_its_peer_traffic_at_the_given_rates(tmp_path) -> None:
    """The parsed limits reach the node's token buckets (NodeConfig -> Connections)."""
    from fluidfs import keys
    from fluidfs.cli.nodeargs import serve_config
    from fluidfs.node.node import Node
    from fluidfs.statedir import StateDir

    args = build_parser().parse_args(
        ["serve", "--limit-upload", "512K", "--limit-download", "20Mbit", "--no-upnp"]
    )
    ring = keys.KeyRing(keys.generate())
    node = Node(serve_config(args, ring, StateDir(tmp_path / "state")))
    try:
        assert node.conns.bandwidth.up.rate == 512 * KIB
        assert node.conns.bandwidth.down.rate == 20 * 10**6 // 8
    finally:
        node.close()
