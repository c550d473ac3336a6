"""`fluidfs sync` keeps sending a root record that reached too few peers, within its time.

A real node with three in-process hosts keeping its records (tests/fast/test_conflicts.py's
machine); the hosts' record stores fail for a moment (their directory replaced by a file,
as a full or broken disk would), so the first publication falls short.
"""

from __future__ import annotations

from pathlib import Path

import trio
from test_conflicts import keyfile_hosts, machine, write_file

from fluidfs.fs.tree import ROOT_INO


async def test_sync_sends_a_short_root_record_again_until_it_lands(tmp_path: Path) -> None:
    async with keyfile_hosts(tmp_path) as (ring, hosts), machine(
        tmp_path / "a", ring, hosts, new=True
    ) as node:
        stores = [host.records.root for host in hosts]
        for store in stores:  # every PutRecord fails now
            store.rename(store.with_name("records.away"))
            store.write_bytes(b"")

        async def disks_come_back() -> None:
            await trio.sleep(3.0)
            for store in stores:
                store.unlink()
                store.with_name("records.away").rename(store)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(disks_come_back)
            await write_file(node, ROOT_INO, b"note.txt", b"written while peers fail")
            reply = await node.remount_requests.sync(30.0)
        assert reply["committed"] and reply["published"], reply
        assert reply["root_peers"] >= 2
