"""The page's listening socket and published address, without the web stack.

Binding is a few system calls; importing Starlette and Hypercorn takes a quarter of a
CPU-second (more from a cold disk). The node binds here as soon as the mount is open,
publishes the address, and says the mount is ready (`fluidfs mount` prints the page's
address and returns); the stack loads afterwards and serves on this socket. A browser
that connects meanwhile waits in the listen backlog.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from fluidfs.peers.address import split_host_port
from fluidfs.web.token import ADDRESS_FILE

log = logging.getLogger("fluidfs.web.server")

BACKLOG = 100  # Hypercorn's default


def listen(bind: str) -> socket.socket:
    """A non-blocking TCP socket listening on *bind* (HOST:PORT, port 0: any free one),
    set up as Hypercorn sets up its own; OSError if it cannot be bound."""
    host, port = split_host_port(bind, bind=True)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def page_url(host: str, port: int) -> str:
    """The page's base URL for a server bound to host:port (wildcards shown as loopback)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def publish(state: Path, url: str) -> None:
    """Publish the page's base URL in *state* (``read_url`` joins the token)."""
    tmp = state / f".{ADDRESS_FILE}.tmp"
    tmp.write_text(url + "\n", encoding="ascii")
    tmp.replace(state / ADDRESS_FILE)


def unpublish(state: Path) -> None:
    """The page no longer serves: remove its address."""
    (state / ADDRESS_FILE).unlink(missing_ok=True)


def bind_page(bind: str, state: Path) -> socket.socket | None:
    """The page's socket listening on *bind*, its address published in *state*; None
    (a warning logged, the address removed) if it cannot be bound: the backup matters
    more than its page."""
    try:
        sock = listen(bind)
    except OSError as exc:
        log.warning("web page not started: cannot listen on %s: %s", bind, exc)
        unpublish(state)
        return None
    url = page_url(split_host_port(bind, bind=True)[0], sock.getsockname()[1])
    publish(state, url)
    log.info("web page at %s", url)
    return sock
