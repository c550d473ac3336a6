"""The Starlette app: the page's files, the API, behind the guard."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from fluidfs.web.api import WebApi
from fluidfs.web.guard import Guard

STATIC = Path(__file__).parent / "static"


def build_app(api: WebApi, token: str, hosts: frozenset[str]) -> ASGIApp:
    """The whole site: ``/`` (the page), ``/static/…`` and ``/api/…``, guarded."""

    async def index(_request) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app = Starlette(
        routes=[
            Route("/", index),
            *api.routes(),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ]
    )
    return Guard(app, token, hosts)
