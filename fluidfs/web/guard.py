"""The security edge of the web page: every request passes here first.

1. ``Host`` must name this server (127.0.0.1, localhost or ::1 with our port, or the
   host it was bound to): a page on another site that rebinds its DNS name to 127.0.0.1
   sends its own name and is refused (421).
2. The token: the printed URL carries it once (``?token=``); the answer sets it as an
   HttpOnly, SameSite=Strict cookie and redirects to the same URL without it, so it does
   not stay in the address bar or the history. Scripts may send
   ``Authorization: Bearer TOKEN``. Anything else: 401.
3. Requests that change state (anything but GET and HEAD) also need the
   ``X-Fluidfs-CSRF`` header (a keyed hash of the token the page reads from
   ``/api/session``), and an ``Origin``, if sent, equal to our own: another site can
   neither read that value nor send a custom header without a CORS preflight we never
   answer. Refused with 403.
4. Every answer says that nothing comes from a remote origin (Content-Security-Policy),
   may not be framed, sniffed or cached, and sends no Referer.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import URL, MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fluidfs.web.token import csrf_token, same

COOKIE = "fluidfs_web"
CSRF_HEADER = "x-fluidfs-csrf"
SAFE_METHODS = frozenset({"GET", "HEAD"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values that name a server bound to host:port."""
    names = {*LOOPBACK, f"[{host}]" if ":" in host else host}
    names.discard("0.0.0.0")
    names.discard("[::]")
    return frozenset(f"{name}:{port}" for name in names)


@dataclass
class Guard:
    """ASGI middleware: Host, token and CSRF checks, and the security headers."""

    app: ASGIApp
    token: str
    hosts: Iterable[str]

    def __post_init__(self) -> None:
        self.hosts = frozenset(h.lower() for h in self.hosts)
        self.csrf = csrf_token(self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return  # no websockets
        refusal = self.check(Request(scope))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
            await send(message)

        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def check(self, request: Request) -> Response | None:
        """The refusal (or the login redirect) for *request*; None lets it through."""
        host = request.headers.get("host", "").lower()
        if host not in self.hosts:
            return PlainTextResponse("unknown Host: this page answers only to its own "
                                     "address", status_code=421)
        given = request.query_params.get("token")
        if given is not None and request.method in SAFE_METHODS:
            if not same(given, self.token):
                return PlainTextResponse("wrong token", status_code=401)
            return self._login(request.url)
        if not self._authorised(request):
            return PlainTextResponse(
                "not logged in: open the URL fluidfs printed at mount time "
                "(it carries the token once), or send Authorization: Bearer TOKEN",
                status_code=401,
            )
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            if origin is not None and origin.lower() != f"{request.url.scheme}://{host}":
                return PlainTextResponse("cross-origin request refused", status_code=403)
            if not same(request.headers.get(CSRF_HEADER), self.csrf):
                return PlainTextResponse("missing or wrong CSRF token", status_code=403)
        return None

    def _authorised(self, request: Request) -> bool:
        if same(request.cookies.get(COOKIE), self.token):
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and same(value.strip(), self.token)

    def _login(self, url: URL) -> Response:
        query = [(k, v) for k, v in urllib.parse.parse_qsl(url.query) if k != "token"]
        clean = url.replace(query=urllib.parse.urlencode(query))
        response = RedirectResponse(clean.path + (f"?{clean.query}" if clean.query else ""),
                                    status_code=303)
        response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")
        return response
