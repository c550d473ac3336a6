"""Serving the page in the node's nursery: Hypercorn's trio worker on the node's loop.

Hypercorn's ``worker_serve`` (what ``hypercorn.trio.serve`` calls) is given a socket we
bind ourselves (web/listen.py), so a port in use is seen before serving and port 0
works (tests); the node may bind it before this module's stack is even imported.

``WebServer.run`` binds (unless given a bound socket), publishes ``<state>/web`` (the
page's address, without the token: `fluidfs mount` prints it with the token from
``<state>/web-token``), reports the bound address to the nursery and serves until
cancelled. A port already taken is a warning, not a failed mount: the backup matters
more than its page.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from fluidfs.peers.address import split_host_port
from fluidfs.web.listen import bind_page, page_url, unpublish

log = logging.getLogger(__name__)

__all__ = ["WebServer", "page_url"]


@dataclass
class WebServer:
    """Runs one ASGI app on host:port until cancelled."""

    bind: str  # HOST:PORT (port 0: any free one)
    state: Path  # where the address is published

    async def run(
        self, make_app, *, sock: socket.socket | None = None,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind (or serve on *sock*, listening on ``bind`` already), build the app for
        the bound port (``make_app(host, port)``), serve."""
        if sock is None:
            sock = bind_page(self.bind, self.state)
            if sock is None:
                task_status.started(None)
                return
        host = split_host_port(self.bind, bind=True)[0]
        bound = sock.getsockname()[1]
        config = Config()
        config.bind = [f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("fluidfs.web.hypercorn")
        config.graceful_timeout = 1.0
        app: ASGIApp = make_app(host, bound)
        try:
            await worker_serve(
                wrap_app(app, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=Sockets([], [sock], []),
                task_status=task_status,
            )
        finally:
            unpublish(self.state)
            sock.close()
