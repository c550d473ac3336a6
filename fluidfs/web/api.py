"""The page's JSON API and downloads (the routes are listed in docs/web.md).

``/api/status``, ``/api/peers`` and ``/api/snapshots`` call the very control handlers
that answer ``fluidfs status --json``, ``fluidfs peers --json`` and ``fluidfs snapshots
--json`` (node/handlers.py, remount/control.py): one function each, two doors.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import segno
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from fluidfs import control
from fluidfs.fs.snapcopy import RestoreError, SnapshotCopy
from fluidfs.web.browse import Browser, NotFound, split_path, text

MAX_BODY = 16 * 1024  # a restore request is a name and a path


class JSON(Response):
    """JSON with every non-ASCII character escaped (names may hold undecodable bytes)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def _error(message: str, status: int) -> JSON:
    return JSON({"error": message}, status_code=status)


@dataclass
class WebApi:
    """What the page can ask of the node."""

    handlers: dict[str, control.Handler]  # the control socket's handlers
    browser: Browser
    copier: SnapshotCopy
    keyfile_text: Callable[[], str]
    mark_saved: Callable[[], float]
    csrf: str
    refresh: float  # seconds between the page's status polls

    def routes(self) -> list[Route]:
        """The API's routes."""
        return [
            Route("/api/session", self.session),
            Route("/api/status", self.relay("status")),
            Route("/api/peers", self.relay("peers")),
            Route("/api/snapshots", self.relay("snapshots")),
            Route("/api/browse", self.browse),
            Route("/api/download", self.download),
            Route("/api/restore", self.restore, methods=["POST"]),
            Route("/api/keyfile", self.keyfile),
            Route("/api/keyfile.svg", self.keyfile_qr),
            Route("/api/keyfile/saved", self.saved, methods=["POST"]),
        ]

    async def session(self, _request: Request) -> JSON:
        return JSON({"csrf": self.csrf, "refresh": self.refresh})

    def relay(self, name: str) -> Callable[[Request], Any]:
        """The route that answers with control handler *name*'s reply."""

        async def answer(_request: Request) -> JSON:
            try:
                reply = await self.handlers[name]({})
            except control.ControlError as exc:
                return _error(str(exc), 409)
            return JSON(reply)

        return answer

    async def browse(self, request: Request) -> JSON:
        snapshot = request.query_params.get("snapshot", "")
        try:
            ino = await self.browser.resolve(snapshot, split_path(request.query_params.get(
                "path", "")))
            if not self.browser.is_dir(ino):
                return _error("not a folder", 400)
            return JSON({"snapshot": snapshot, "entries": await self.browser.listing(ino)})
        except NotFound as exc:
            return _error(str(exc), 404)

    async def download(self, request: Request) -> Response:
        snapshot = request.query_params.get("snapshot", "")
        try:
            parts = split_path(request.query_params.get("path", ""))
            ino = await self.browser.resolve(snapshot, parts)
        except NotFound as exc:
            return _error(str(exc), 404)
        name = text(parts[-1]) if parts else snapshot
        if self.browser.is_dir(ino):
            return StreamingResponse(
                self.browser.tar(ino, name),
                media_type="application/x-tar",
                headers={"content-disposition": _attachment(name + ".tar")},
            )
        return StreamingResponse(
            self.browser.file(ino),
            media_type="application/octet-stream",
            headers={"content-disposition": _attachment(name),
                     "content-length": str(self.browser.size(ino))},
        )

    async def restore(self, request: Request) -> JSON:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _error("request too large", 413)
        try:
            asked = json.loads(body)
            snapshot, path = str(asked["snapshot"]), str(asked["path"])
            parts = split_path(path)
        except (ValueError, KeyError, TypeError):
            return _error('send {"snapshot": NAME, "path": "/folder/file"}', 400)
        except NotFound as exc:
            return _error(str(exc), 400)
        try:
            live = await self.copier.restore(os.fsencode(snapshot), parts)
        except RestoreError as exc:
            return _error(str(exc), 409)
        return JSON({"restored_to": "/" + "/".join(text(p) for p in live)})

    async def keyfile(self, _request: Request) -> Response:
        """The keyfile as a download; handing it out counts as exporting it (keysaved.py).
        The QR code does not: showing it is not keeping it, so that takes "I have saved it"."""
        text = self.keyfile_text()
        self.mark_saved()
        return Response(text, media_type="text/plain",
                        headers={"content-disposition": _attachment("fluidfs.key")})

    async def keyfile_qr(self, _request: Request) -> Response:
        out = io.BytesIO()
        segno.make(self.keyfile_text(), error="m").save(out, kind="svg", scale=4, border=2)
        return Response(out.getvalue(), media_type="image/svg+xml")

    async def saved(self, _request: Request) -> JSON:
        return JSON({"saved_at": self.mark_saved()})


def _attachment(name: str) -> str:
    """A Content-Disposition naming *name* safely (RFC 6266, UTF-8 form)."""
    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    encoded = quote(os.fsencode(name), safe="")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{encoded}"
