"""The seven requests of a small-file create, called on ``Node.ops`` directly (no kernel).

    PYTHONPATH=CHECKOUT python contrib/bench/create_handlers.py FILES

Run by ``bench_create.py --handlers`` once per checkout: it prints the process CPU
microseconds per file of the handlers alone (sealing included), the load-independent
part of the mount's cost. The requests are the kernel's for ``open(O_CREAT)``,
``write`` and ``close`` of a 200 B file (lookup, create, getxattr
security.capability, write, setattr of the times, release, getattr of the parent),
with a checkpoint after each file as the FUSE loop has between requests.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import trio

from fluidfs import keys
from fluidfs.fs.tree import ROOT_INO
from fluidfs.node.node import Node, NodeConfig
from fluidfs.statedir import StateDir

CTX = pyfuse3.RequestContext()
FIELDS = ["update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
          "update_gid", "update_size"]


async def absent(ops, parent: int, name: bytes) -> None:
    """The lookup the kernel sends before creating *name*: a negative entry (inode 0)
    expected, or ENOENT from a checkout before negative entries."""
    try:
        entry = await ops.lookup(parent, name, CTX)
    except pyfuse3.FUSEError:
        return
    if entry.st_ino:
        raise RuntimeError(f"{name!r} exists")


async def main(files: int, size: int = 200, per_dir: int = 100) -> None:
    with tempfile.TemporaryDirectory(prefix="fluidfs-create-handlers-") as tmp:
        ring = keys.KeyRing(keys.generate())
        node = Node(NodeConfig(ring, StateDir(Path(tmp) / "state"), cache_size=1 << 20))
        await node.start()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(node.data.run)
                ops = node.ops
                payload = os.urandom(size)
                times = SimpleNamespace(**{f: f in ("update_mtime", "update_ctime")
                                           for f in FIELDS})
                attr = pyfuse3.EntryAttributes()
                folder = ROOT_INO
                started = time.process_time()
                for i in range(files):
                    if i % per_dir == 0:
                        name = b"d%05d" % (i // per_dir)
                        await absent(ops, ROOT_INO, name)
                        folder = (await ops.mkdir(ROOT_INO, name, 0o755, CTX)).st_ino
                    name = b"f%07d" % i
                    await absent(ops, folder, name)
                    fi, entry = await ops.create(folder, name, 0o644, os.O_WRONLY, CTX)
                    with contextlib.suppress(pyfuse3.FUSEError):  # ENOATTR
                        await ops.getxattr(entry.st_ino, b"security.capability", CTX)
                    await ops.write(fi.fh, 0, payload)
                    attr.st_mtime_ns = attr.st_ctime_ns = time.time_ns()
                    await ops.setattr(entry.st_ino, attr, times, None, CTX)
                    await ops.release(fi.fh)
                    await ops.getattr(folder, CTX)
                    await trio.lowlevel.checkpoint()
                spent = time.process_time() - started
                nursery.cancel_scope.cancel()
        finally:
            node.close()
    print(f"{spent / files * 1e6:.1f}")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
