"""The walk behind `fluidfs check` (fs/health.py): every regular file once, with its
path and block records, in batches of bounded size that leave the inode cache alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio
from inproc import LocalStore

from fluidfs import keys
from fluidfs.fs import health
from fluidfs.fs.health import TreeScan
from fluidfs.fs.tree import ROOT_INO

BS = 16 * 1024
RING = keys.KeyRing(keys.generate())


@pytest.fixture
def store(tmp_path: Path):
    made = LocalStore(tmp_path / "state", RING, BS)
    yield made
    made.close()


async def test_the_scan_finds_every_file_once_in_any_batch_size(store: LocalStore) -> None:
    want = {}
    for d in range(3):
        top = store.mkdir(ROOT_INO, f"d{d}")
        sub = store.mkdir(top, "sub")
        store.mkdir(sub, "empty")
        for f in range(4):
            ino = await store.create(top, f"f{f}", os.urandom(BS + f))
            want[f"/d{d}/f{f}"] = ino
            ino = await store.create(sub, f"g{f}")
            want[f"/d{d}/sub/g{f}"] = ino
    store.new_inode(ROOT_INO, "fifo", stat.S_IFIFO | 0o644)  # not a regular file
    for ino in range(2, 100):
        store.tree.uncache(ino)
    cached = dict(store.tree._cache)
    runs = []
    for batch in (1, 2, 5, 1000):
        scan = TreeScan(store.tree, store.blocks, batch)
        found = []
        while not scan.done:
            part = await trio.to_thread.run_sync(scan.next_batch)
            assert len(part) <= batch
            found += part
        runs.append([(f.path, f.ino) for f in found])
        assert {f.path: f.ino for f in found} == want
        for f in found:
            assert set(f.records) == {v[1:] for v in f.values if v[:1] == b"B"}
            assert all(store.blocks.load(b) == r for b, r in f.records.items())
    assert runs[0] == runs[1] == runs[2] == runs[3], "the same order whatever the batch"
    assert store.tree._cache == cached, "the walk leaves the inode cache alone"


async def test_check_reports_every_file(store: LocalStore, monkeypatch) -> None:
    monkeypatch.setattr(health, "WALK_BATCH", 2)
    d = store.mkdir(ROOT_INO, "d")
    await store.create(d, "data", os.urandom(2 * BS))
    await store.create(d, "empty")
    await store.create(ROOT_INO, "small", b"x")

    async def reachable(_holder: int) -> bool:
        return True

    results = await health.check(store.tree, store.blocks, reachable=reachable)
    assert {r.path: r.state for r in results} == {
        "/d/data": "local", "/d/empty": "empty", "/small": "inline",
    }
