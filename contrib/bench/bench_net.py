"""Network throughput: shard-sized transfers between two processes over loopback.

Prints MB/s (1 MB = 10**6 bytes of payload) for, in the same run:

  raw TCP      trio SocketStream, 512 KiB writes, receiver discards
  channel      SecureChannel frames of 512 KiB (handshake excluded)
  RPC          StoreShard calls with one 512 KiB shard each, several in flight; the
               server decodes, validates and answers {stored: [id]} (discards the data)
  RPC get      RetrieveShard calls, several in flight, each answered with the same
               512 KiB shard: the direction of a restore (the client receives)

channel and RPC run once with each frame cipher (secretstream, and AES-256-GCM and
AEGIS-256 where the CPU has hardware AES), so they can be compared in one run.

and the ratio of each to raw TCP, with the CPU-seconds per GiB of payload of the
server (utime + stime from /proc over the case) and of the client (its process time),
from the best round: the server receives, except in "RPC get". A tree from before
AEGIS-256 frames runs without its rows, so the same script measures both sides of a
change. The server is a child process (killed by PID at exit).
Cases are interleaved round by round and the best round is kept, so a machine shared
with other jobs disturbs the ratio less.

``--mallopt`` raises glibc's mmap/trim thresholds in both processes. Without it every
fresh 512 KiB buffer (cbor2 output, received bytes) is mmap'd and page-faulted anew, and
page faults are expensive in VMs; the RPC figure then shows allocator cost, not ours.

    python contrib/bench/bench_net.py [--mib 256] [--inflight 8] [--offload BYTES|none|auto]
                                      [--mallopt] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time

import nacl.signing
import trio

from fluidfs.net import accept_channel, connect_channel, serve_connection
from fluidfs.net.channel import DEFAULT_OFFLOAD
from fluidfs.net.framecipher import aes_available

try:  # absent from trees before AEGIS-256 frames: paired runs against those skip it
    from fluidfs.net.framecipher import aegis_available
except ImportError:  # pragma: no cover - older trees
    def aegis_available() -> bool:
        return False
from fluidfs.net.messages import REQUEST_SCHEMAS
from fluidfs.net.rpc import RpcConnection

SHARD = 512 * 1024
SERVER_KEY = nacl.signing.SigningKey(b"S" * 32)
CLIENT_KEY = nacl.signing.SigningKey(b"C" * 32)


class Sink:
    """StoreShard that keeps nothing; RetrieveShard that always answers one shard."""

    schemas = REQUEST_SCHEMAS
    shard = os.urandom(SHARD)

    async def handle(self, peer_key: bytes, op: str, args: dict) -> dict:
        if op == "RetrieveShard":
            return {"data": self.shard}
        return {"stored": [s["id"] for s in args["shards"]], "refused": []}


# -- server process ----------------------------------------------------------------------


async def serve(mode: str, offload: int | str | None) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        if mode == "raw":
            total = 0
            while chunk := await stream.receive_some(1 << 20):
                total += len(chunk)
            return
        channel = await accept_channel(stream, SERVER_KEY, offload_bytes=offload)
        if mode == "channel":
            n = 0
            while True:
                msg = await channel.receive()
                if msg == b"done":
                    await channel.send(n.to_bytes(8, "big"))
                    break
                n += len(msg)
            await channel.aclose()
        else:
            await serve_connection(channel, Sink())

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handler, listeners)


# -- client side -------------------------------------------------------------------------


async def bench_raw(port: int, total: int) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = os.urandom(SHARD)
    t0 = time.perf_counter()
    for _ in range(total // SHARD):
        await stream.send_all(data)
    await stream.send_eof()
    await stream.receive_some(1)  # the server closes once it has read everything
    return time.perf_counter() - t0


def _cipher_args(cipher: str) -> dict:
    """connect_channel's offers for *cipher* (the server offers everything it can)."""
    args: dict = {"aes": cipher != "secretstream"}
    if aegis_available():
        args["aegis"] = cipher == "aegis256"
    return args


async def bench_channel(port: int, total: int, offload: int | str | None, cipher: str) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    channel = await connect_channel(stream, CLIENT_KEY, SERVER_KEY.verify_key.encode(),
                                    offload_bytes=offload, **_cipher_args(cipher))
    assert channel.cipher == cipher, channel.cipher
    data = os.urandom(SHARD)
    t0 = time.perf_counter()
    for _ in range(total // SHARD):
        await channel.send(data)
    await channel.send(b"done")
    got = int.from_bytes(await channel.receive(), "big")
    dt = time.perf_counter() - t0
    assert got == total // SHARD * SHARD, got
    await channel.aclose()
    return dt


async def bench_rpc(port: int, total: int, inflight: int, offload: int | str | None,
                    cipher: str, get: bool = False) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    channel = await connect_channel(stream, CLIENT_KEY, SERVER_KEY.verify_key.encode(),
                                    offload_bytes=offload, **_cipher_args(cipher))
    assert channel.cipher == cipher, channel.cipher
    conn = RpcConnection(channel)
    data = os.urandom(SHARD)
    count = total // SHARD
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            sid = i.to_bytes(32, "big")
            if get:
                r = await conn.call("RetrieveShard", {"id": sid})
                assert len(r["data"]) == SHARD
                continue
            r = await conn.call("StoreShard", {"shards": [{"id": sid, "data": data}]})
            assert r["stored"] == [sid]

    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        t0 = time.perf_counter()
        async with trio.open_nursery() as workers:
            for _ in range(inflight):
                workers.start_soon(worker)
        dt = time.perf_counter() - t0
        await conn.aclose()
    return dt


def tune_malloc() -> None:
    """Keep big freed buffers in the heap (glibc): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-1, 256 << 20)
    libc.mallopt(-3, 64 << 20)


def start_server(mode: str, offload: int | str | None, mallopt: bool
                 ) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, __file__, "--serve", mode, "--offload", str(offload).lower()]
    proc = subprocess.Popen(cmd + (["--mallopt"] if mallopt else []),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _cpu_of(pid: int) -> float:
    """utime + stime of process *pid*, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(mode: str, total: int, inflight: int, offload: int | str | None, mallopt: bool
             ) -> tuple[float, float, float]:
    """(MB/s, receiver CPU-s per GiB, sender CPU-s per GiB) of one round of *mode*."""
    kind, _, cipher = mode.partition("-")
    proc, port = start_server("rpc" if kind == "rpcget" else kind, offload, mallopt)
    try:
        server0, client0 = _cpu_of(proc.pid), time.process_time()
        if kind == "raw":
            dt = trio.run(bench_raw, port, total)
        elif kind == "channel":
            dt = trio.run(bench_channel, port, total, offload, cipher)
        else:
            dt = trio.run(bench_rpc, port, total, inflight, offload, cipher, kind == "rpcget")
        gib = total // SHARD * SHARD / (1 << 30)
        server_cpu = (_cpu_of(proc.pid) - server0) / gib
        client_cpu = (time.process_time() - client0) / gib
        return total // SHARD * SHARD / dt / 1e6, server_cpu, client_cpu
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="payload per case, MiB")
    ap.add_argument("--inflight", type=int, default=8, help="concurrent RPC calls")
    ap.add_argument("--offload", default=str(DEFAULT_OFFLOAD),
                    help="frames >= this many bytes are en/decrypted in a thread, 'none', "
                         "or 'auto' (the channel's per-cipher default)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N rounds per case")
    ap.add_argument("--mallopt", action="store_true", help="tune glibc malloc (see above)")
    ap.add_argument("--serve", choices=["raw", "channel", "rpc"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    named = {"none": None, "auto": "auto"}
    offload = named[args.offload] if args.offload in named else int(args.offload)
    if args.mallopt:
        tune_malloc()
    if args.serve:
        trio.run(serve, args.serve, offload)
        return
    total = args.mib * 1024 * 1024
    print(f"{args.mib} MiB per case, 512 KiB messages, best of {args.repeat}, "
          f"RPC {args.inflight} in flight, crypto offload >= {offload} bytes, "
          f"mallopt {'on' if args.mallopt else 'off'}")
    rows = {
        "raw": "raw trio TCP",
        "channel-secretstream": "channel, secretstream",
        "channel-aes256gcm": "channel, AES-256-GCM",
        "channel-aegis256": "channel, AEGIS-256",
        "rpc-secretstream": "RPC StoreShard, secretstream",
        "rpc-aes256gcm": "RPC StoreShard, AES-256-GCM",
        "rpc-aegis256": "RPC StoreShard, AEGIS-256",
        "rpcget-aes256gcm": "RPC get RetrieveShard, AES-GCM",
        "rpcget-aegis256": "RPC get RetrieveShard, AEGIS",
    }
    if not aes_available():
        rows = {mode: label for mode, label in rows.items() if "aes" not in mode}
    if not (aes_available() and aegis_available()):
        rows = {mode: label for mode, label in rows.items() if "aegis" not in mode}
    results = dict.fromkeys(rows, (0.0, 0.0, 0.0))
    for _ in range(args.repeat):
        for mode in results:
            got = run_case(mode, total, args.inflight, offload, args.mallopt)
            results[mode] = max(results[mode], got)  # the fastest round, with its CPU
    print(f"  {'':30s} {'':>13s}   {'':>11s}   CPU-s/GiB:   server  client")
    for mode, label in rows.items():
        mbps, server_cpu, client_cpu = results[mode]
        ratio = mbps / results["raw"][0]
        print(f"  {label:30s} {mbps:8.0f} MB/s   {ratio:6.1%} of raw   "
              f"{server_cpu:18.2f} {client_cpu:7.2f}")


if __name__ == "__main__":
    main()
