"""A recording TCP forwarder for lab tests: every byte either way goes to a file.

    python tests/relaytap.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT OUT

Put in front of a relay's peer port, it sees everything the relay forwards on the
streams that pass it. It writes OUT.ready once it listens. The lab kills it at teardown.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import trio


async def main(host: str, port: int, target_host: str, target_port: int, out: Path) -> None:
    sink = out.open("ab", buffering=0)

    async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
        try:
            while data := await src.receive_some(65536):
                sink.write(data)
                await dst.send_all(data)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def forward(client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(target_host, target_port)
        except OSError:
            return
        async with upstream, client, trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(trio.serve_tcp, forward, port, host=host))
        Path(f"{out}.ready").touch()


if __name__ == "__main__":
    h, p, th, tp, o = sys.argv[1:6]
    trio.run(main, h, int(p), th, int(tp), Path(o))
