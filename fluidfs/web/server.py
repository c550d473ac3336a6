"""Serving the page in the node's nursery: Hypercorn's trio worker on the node's loop.

Hypercorn's ``worker_serve`` (what ``hypercorn.trio.serve`` calls) is given sockets we
bind ourselves, so a port in use is seen before serving and port 0 works (tests).

``WebServer.run`` binds, publishes ``<state>/web`` (the page's address, without the
token: `fluidfs mount` prints it with the token from ``<state>/web-token``), reports the
bound address to the nursery and serves until cancelled. A port already taken is a
warning, not a failed mount: the backup matters more than its page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp

from fluidfs.peers.address import split_host_port
from fluidfs.web.token import ADDRESS_FILE

log = logging.getLogger(__name__)



def page_url(host: str, port: int) -> str:
    """The page's base URL for a server bound to host:port (wildcards shown as loopback)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


@dataclass
class WebServer:
    """Runs one ASGI app on host:port until cancelled."""

    bind: str  # HOST:PORT (port 0: any free one)
    state: Path  # where the address is published

    def split(self) -> tuple[str, int]:
        """(host, port) of ``bind``."""
        host, port = split_host_port(self.bind, bind=True)
        return host, port

    async def run(self, make_app, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, build the app for the bound port (``make_app(host, port)``), serve."""
        host, port = self.split()
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("fluidfs.web.hypercorn")
        config.graceful_timeout = 1.0
        try:
            sockets = config.create_sockets()
        except OSError as exc:
            log.warning("web page not started: cannot listen on %s: %s", self.bind, exc)
            (self.state / ADDRESS_FILE).unlink(missing_ok=True)
            task_status.started(None)
            return
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)  # worker_serve listens only on sockets it made
        bound = sockets.insecure_sockets[0].getsockname()[1]
        app: ASGIApp = make_app(host, bound)
        url = page_url(host, bound)
        _publish(self.state, url)
        log.info("web page at %s", url)
        try:
            await worker_serve(
                wrap_app(app, config.wsgi_max_body_size, "asgi"),
                config,
                sockets=sockets,
                task_status=task_status,
            )
        finally:
            (self.state / ADDRESS_FILE).unlink(missing_ok=True)
            for sock in sockets.insecure_sockets:
                sock.close()


def _publish(state: Path, url: str) -> None:
    tmp = state / f".{ADDRESS_FILE}.tmp"
    tmp.write_text(url + "\n", encoding="ascii")
    tmp.replace(state / ADDRESS_FILE)
