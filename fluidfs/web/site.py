"""The page as one part of the node: its collaborators in, a running server out."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from fluidfs import control, keysaved
from fluidfs.fs.layered import LayeredOperations
from fluidfs.fs.snapcopy import SnapshotCopy
from fluidfs.fs.snapshots import SnapshotView
from fluidfs.web.api import WebApi
from fluidfs.web.app import build_app
from fluidfs.web.browse import Browser
from fluidfs.web.guard import allowed_hosts
from fluidfs.web.server import WebServer
from fluidfs.web.token import csrf_token, load_or_create

log = logging.getLogger(__name__)


@dataclass
class Page:
    """The web page of a mounted node (docs/web.md)."""

    bind: str  # HOST:PORT
    state: Path  # the state directory: token, address, keyfile acknowledgement
    handlers: dict[str, control.Handler]  # the control socket's handlers
    view: SnapshotView
    ops: LayeredOperations
    keyfile_text: Callable[[], str]
    refresh: float  # seconds between the page's status polls
    invalidate: Callable[[int, bytes], None] = lambda _parent, _name: None

    def api(self, token: str) -> WebApi:
        """The API over the node's parts."""
        return WebApi(
            self.handlers,
            Browser(self.view),
            SnapshotCopy(self.ops, self.view, invalidate=self.invalidate),
            self.keyfile_text,
            lambda: keysaved.mark_saved(self.state),
            csrf_token(token),
            self.refresh,
        )

    async def run(
        self, *, sock: socket.socket | None = None, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled (on *sock* if it was bound already: web/listen.py); a
        failure of the page is logged and never ends the node."""
        token = load_or_create(self.state)
        api = self.api(token)
        started = False

        def make_app(host: str, port: int):
            return build_app(api, token, allowed_hosts(host, port))

        class Started:
            def started(self, value=None) -> None:
                nonlocal started
                started = True
                task_status.started(value)

        try:
            await WebServer(self.bind, self.state).run(
                make_app, sock=sock, task_status=Started())
        except Exception:
            log.exception("the web page stopped")
            if not started:
                task_status.started(None)
