"""The local control socket: how `fluidfs peers`, `fluidfs status` reach a running node.

``<state>/control.sock`` is a Unix stream socket inside the 0700 state directory,
so only the owner can talk to the node. It is created under the node's umask (077,
set when a node process starts: cli/nodeargs.py setup_node_process), never chmodded after the
bind: the directory is made private before the socket exists, so there is no moment
at which another user could connect. Protocol version 1:
one JSON object per line each way — a request ``{"v": 1, "cmd": str, ...}`` and
a reply ``{"ok": true, ...}`` or ``{"ok": false, "error": str}``. Requests are
capped at 64 KiB. The commands are in node/handlers.py (peers, status, check) and
remount/control.py (sync, snapshots, forget); ``ControlError`` is raised only there, at
the edge, never by the parts they ask.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio

# trio is imported only by the serving side: the CLI's client (``call``) runs in a fresh
# process for every `fluidfs sync` or `status`, where importing trio cost ~0.2 s of CPU.

log = logging.getLogger(__name__)

VERSION = 1
MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The node could not be reached or refused the request."""


async def serve(path: Path, handlers: dict[str, Handler], *, task_status=None) -> None:
    """Serve control requests on *path* until cancelled (``nursery.start`` it to know when
    the socket is listening)."""
    import trio

    parent = path.parent
    if stat.S_IMODE(os.stat(parent).st_mode) & 0o077:
        os.chmod(parent, 0o700)  # before the socket exists: nobody else can reach it
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)
    if task_status is not None:
        task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _serve_one(stream, handlers), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _serve_one(stream: trio.SocketStream, handlers: dict[str, Handler]) -> None:
    async with stream:
        buf = b""
        while b"\n" not in buf:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
            if len(buf) > MAX_REQUEST:
                await _send(stream, {"ok": False, "error": "request too large"})
                return
        try:
            request = json.loads(buf.split(b"\n", 1)[0])
            if not isinstance(request, dict) or request.get("v") != VERSION:
                raise ValueError("bad request")
            handler = handlers.get(request.get("cmd"))
            if handler is None:
                raise ValueError(f"unknown command {request.get('cmd')!r}")
        except ValueError as exc:
            await _send(stream, {"ok": False, "error": str(exc)})
            return
        try:
            reply = {"ok": True, **await handler(request)}
        except ControlError as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %s failed", request.get("cmd"))
            reply = {"ok": False, "error": f"internal error: {exc}"}
        await _send(stream, reply)


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    import trio

    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(json.dumps(message).encode() + b"\n")


def call(path: Path, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """Send one request to the node behind *path* (blocking; for the CLI)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ControlError(f"no fluidfs node is running with state in {path.parent}") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"not allowed to talk to the node at {path}") from None
    with sock:
        sock.sendall(json.dumps({"v": VERSION, "cmd": cmd, **args}).encode() + b"\n")
        data = b""
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise ControlError("the node did not answer in time") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError("the node sent a malformed reply") from None
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "request failed"))
    return reply
