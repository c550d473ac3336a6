"""The web page's security edge and API, against a real node in this process (fluidfs/web/).

A real ``Node`` (real LMDB, real trio) runs its services with the page on a free
loopback port; requests go over real HTTP (``http.client`` in a worker thread). Nothing
is mounted: files are written and snapshots made through the node's own FUSE operations.
The refusals each failed before the guard existed (there was no page to refuse).
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import stat
import tarfile
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from fluidfs import control, keys
from fluidfs.fs.tree import ROOT_INO
from fluidfs.node.node import Node, NodeConfig
from fluidfs.statedir import StateDir
from fluidfs.web.guard import COOKIE, CSP, CSRF_HEADER
from fluidfs.web.token import csrf_token, read_url

CTX = pyfuse3.RequestContext()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    cookies: list[str] = field(default_factory=list)

    def json(self):
        return json.loads(self.body)


@dataclass
class Site:
    """The node and its page: ``get``/``post`` speak real HTTP to it."""

    node: Node
    url: str  # as printed at mount: with ?token=
    host: str
    port: int
    token: str

    def _request(self, method: str, path: str, headers: dict, body: bytes | None) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, data,
                         [v for k, v in r.getheaders() if k.lower() == "set-cookie"])
        finally:
            conn.close()

    async def request(self, method: str, path: str, *, login: bool = True,
                      headers: dict | None = None, body: bytes | None = None) -> Reply:
        sent = dict(headers or {})
        if login:
            sent.setdefault("Cookie", f"{COOKIE}={self.token}")
        return await trio.to_thread.run_sync(self._request, method, path, sent, body)

    async def get(self, path: str, **kw) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, payload: dict, *, csrf: bool = True, **kw) -> Reply:
        headers = dict(kw.pop("headers", {}))
        headers["Content-Type"] = "application/json"
        if csrf:
            headers[CSRF_HEADER] = csrf_token(self.token)
        return await self.request("POST", path, headers=headers,
                                  body=json.dumps(payload).encode(), **kw)

    # --- writing through the node's FUSE operations ---------------------------------------

    async def write(self, parent: int, name: str, data: bytes) -> int:
        fi, attr = await self.node.ops.create(parent, name.encode(), 0o640, os.O_RDWR, CTX)
        await self.node.ops.write(fi.fh, 0, data)
        await self.node.ops.release(fi.fh)
        return attr.st_ino

    async def read(self, path: str) -> bytes:
        ino = ROOT_INO
        for part in path.strip("/").split("/"):
            ino = (await self.node.ops.lookup(ino, part.encode(), CTX)).st_ino
        fi = await self.node.ops.open(ino, os.O_RDONLY, CTX)
        size = (await self.node.ops.getattr(ino)).st_size
        data = await self.node.ops.read(fi.fh, 0, size + 1)
        await self.node.ops.release(fi.fh)
        return data


@asynccontextmanager
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """A node with its page on a free port, running its services in this trio run."""
    ring = keys.KeyRing(keys.generate())
    state = StateDir(tmp_path / "state")
    node = Node(NodeConfig(ring, state, block_size=64 * 1024, web="127.0.0.1:0",
                           web_refresh=0.5))
    try:
        await node.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(node.data.run)
            await nursery.start(node.run_services)
            url = read_url(state.path)
            assert url is not None
            parsed = urllib.parse.urlsplit(url)
            token = urllib.parse.parse_qs(parsed.query)["token"][0]
            yield Site(node, url, parsed.hostname, parsed.port, token)
            nursery.cancel_scope.cancel()
    finally:
        node.close()


async def test_token_file_is_private_and_the_printed_url_logs_in_once(tmp_path) -> None:
    async with site(tmp_path) as s:
        token_file = s.node.config.state.path / "web-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() == s.token
        login = await s.get(f"/?token={s.token}&x=1", login=False)
        assert login.status == 303
        assert login.headers["location"] == "/?x=1", "the token leaves the address bar"
        (cookie,) = login.cookies
        assert cookie.startswith(f"{COOKIE}={s.token}")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = await s.get("/")
        assert page.status == 200 and b"/static/app.js" in page.body
        assert page.headers["content-security-policy"] == CSP
        assert "http" not in CSP, "nothing may come from another origin"
        assert page.headers["x-frame-options"] == "DENY"
        script = await s.get("/static/app.js")
        assert script.status == 200 and b"fetch(" in script.body
        assert b"http://" not in script.body and b"https://" not in script.body


async def test_refused_without_the_token(tmp_path) -> None:
    async with site(tmp_path) as s:
        for path in ("/", "/api/status", "/api/keyfile", "/static/app.js", "/api/session"):
            reply = await s.get(path, login=False)
            assert reply.status == 401, path
            assert s.token.encode() not in reply.body
        wrong = await s.get("/?token=" + "A" * 43, login=False)
        assert wrong.status == 401 and not wrong.cookies
        cookie = await s.get("/api/status", login=False, headers={"Cookie": f"{COOKIE}=nope"})
        assert cookie.status == 401
        bearer = await s.get("/api/status", login=False,
                             headers={"Authorization": f"Bearer {s.token}"})
        assert bearer.status == 200, "scripts may send the token as a bearer header"


async def test_refused_with_a_foreign_host(tmp_path) -> None:
    """DNS rebinding: a page of evil.example resolved to 127.0.0.1 sends its own Host."""
    async with site(tmp_path) as s:
        for host in (f"evil.example:{s.port}", "evil.example", f"127.0.0.1:{s.port + 1}",
                     f"localhost.evil.example:{s.port}"):
            reply = await s.get("/api/status", headers={"Host": host})
            assert reply.status == 421, host
            assert b"peer_id" not in reply.body
        login = await s.get(f"/?token={s.token}", login=False,
                            headers={"Host": f"evil.example:{s.port}"})
        assert login.status == 421 and not login.cookies
        assert (await s.get("/api/status", headers={"Host": f"localhost:{s.port}"})).status == 200


async def test_state_changes_need_the_csrf_check(tmp_path) -> None:
    async with site(tmp_path) as s:
        before = (await s.get("/api/status")).json()
        assert not before["keyfile_saved"]
        assert "keyfile" in [w["kind"] for w in before["overview"]["warnings"]]
        no_csrf = await s.post("/api/keyfile/saved", {}, csrf=False)
        assert no_csrf.status == 403
        wrong = await s.post("/api/keyfile/saved", {}, csrf=False,
                             headers={CSRF_HEADER: "0" * 64})
        assert wrong.status == 403
        cross = await s.post("/api/keyfile/saved", {},
                             headers={"Origin": "http://evil.example"})
        assert cross.status == 403
        no_login = await s.post("/api/keyfile/saved", {}, login=False)
        assert no_login.status == 401
        get = await s.get("/api/keyfile/saved")
        assert get.status == 405, "GET never changes state"
        assert not (await s.get("/api/status")).json()["keyfile_saved"]
        ok = await s.post("/api/keyfile/saved", {},
                          headers={"Origin": f"http://127.0.0.1:{s.port}"})
        assert ok.status == 200
        after = (await s.get("/api/status")).json()
        assert after["keyfile_saved"]
        assert "keyfile" not in [w["kind"] for w in after["overview"]["warnings"]]


async def test_page_status_is_the_status_command_answer(tmp_path) -> None:
    """/api/status and `fluidfs status --json` (the control socket) are one function."""
    async with site(tmp_path) as s:
        await s.write(ROOT_INO, "a", b"x" * 100_000)
        await s.node.data.seal_all()
        page = (await s.get("/api/status")).json()
        socket_reply = await trio.to_thread.run_sync(
            lambda: control.call(s.node.config.state.control, "status"))
        socket_reply.pop("ok")
        assert page.keys() == socket_reply.keys()
        moving = {"upload_rate", "repair_rate", "disk_free", "commit", "memory", "meta_store"}
        for key in page.keys() - moving:
            assert page[key] == socket_reply[key], key
        assert page["files"] == 1
        assert page["overview"]["level"] == "danger"
        assert page["overview"]["sentence"] == "1 file exists only on this machine: no peers yet."
        peers = await s.get("/api/peers")
        assert peers.json() == {"peers": []}


async def test_browse_download_tar_and_restore_a_snapshot(tmp_path) -> None:
    async with site(tmp_path) as s:
        ops = s.node.ops
        docs = (await ops.mkdir(ROOT_INO, b"docs", 0o750, CTX)).st_ino
        big = os.urandom(300_000)
        await s.write(docs, "big.bin", big)
        await s.write(docs, "note.txt", b"hello")
        result = await s.node.commits.commit(user_changed=True)
        snap = result.snapshot
        listed = (await s.get("/api/snapshots")).json()["snapshots"]
        assert [x["name"] for x in listed] == [snap]
        root = (await s.get(f"/api/browse?snapshot={snap}&path=/")).json()["entries"]
        assert [(e["name"], e["type"]) for e in root] == [("docs", "dir")]
        inside = (await s.get(f"/api/browse?snapshot={snap}&path=/docs")).json()["entries"]
        assert {e["name"]: e["size"] for e in inside} == {"big.bin": len(big), "note.txt": 5}
        file = await s.get(f"/api/download?snapshot={snap}&path=/docs/big.bin")
        assert file.status == 200 and file.body == big
        assert "big.bin" in file.headers["content-disposition"]
        tar = await s.get(f"/api/download?snapshot={snap}&path=/docs")
        with tarfile.open(fileobj=io.BytesIO(tar.body)) as archive:
            assert archive.getmember("docs").isdir()
            assert archive.getmember("docs").mode == 0o750
            assert archive.extractfile("docs/big.bin").read() == big
            assert archive.extractfile("docs/note.txt").read() == b"hello"
        for bad in ("/docs/../..", "/nothing"):
            missing = await s.get(f"/api/browse?snapshot={snap}&path={bad}")
            assert missing.status == 404
        assert (await s.get("/api/browse?snapshot=nope&path=/")).status == 404

        await ops.unlink(docs, b"big.bin", CTX)
        restored = await s.post("/api/restore", {"snapshot": snap, "path": "/docs/big.bin"})
        assert restored.status == 200, restored.body
        assert restored.json() == {"restored_to": "/docs/big.bin"}
        assert await s.read("docs/big.bin") == big
        again = await s.post("/api/restore", {"snapshot": snap, "path": "/docs/note.txt"})
        assert again.json() == {"restored_to": f"/docs/note.txt.restored-{snap}"}
        assert await s.read("docs/note.txt") == b"hello"
        assert s.node.commits.changes_pending, "a restore is a change for the next commit"
        folder = await s.post("/api/restore", {"snapshot": snap, "path": "/docs"})
        assert folder.status == 409
        no_csrf = await s.post("/api/restore", {"snapshot": snap, "path": "/docs/big.bin"},
                               csrf=False)
        assert no_csrf.status == 403


async def test_restore_makes_missing_folders_again(tmp_path) -> None:
    async with site(tmp_path) as s:
        ops = s.node.ops
        sub = (await ops.mkdir(ROOT_INO, b"old", 0o700, CTX)).st_ino
        await s.write(sub, "f", b"data")
        snap = (await s.node.commits.commit(user_changed=True)).snapshot
        await ops.unlink(sub, b"f", CTX)
        await ops.rmdir(ROOT_INO, b"old", CTX)
        reply = await s.post("/api/restore", {"snapshot": snap, "path": "/old/f"})
        assert reply.json() == {"restored_to": "/old/f"}
        assert await s.read("old/f") == b"data"
        attrs = await ops.lookup(ROOT_INO, b"old", CTX)
        assert stat.S_IMODE(attrs.st_mode) == 0o700


async def test_keyfile_export_and_qr(tmp_path) -> None:
    async with site(tmp_path) as s:
        text = (await s.get("/api/keyfile")).body.decode()
        assert keys.loads(text).root == s.node.config.keyring.keyfile.root
        qr = await s.get("/api/keyfile.svg")
        assert qr.status == 200 and qr.headers["content-type"].startswith("image/svg+xml")
        assert b"<svg" in qr.body


async def test_downloading_the_keyfile_silences_the_never_exported_warning(tmp_path) -> None:
    async with site(tmp_path) as s:
        def kinds(reply) -> list[str]:
            return [w["kind"] for w in reply.json()["overview"]["warnings"]]

        await s.get("/api/keyfile.svg")  # looking at the code is not keeping a copy
        assert "keyfile" in kinds(await s.get("/api/status"))
        refused = await s.get("/api/keyfile", login=False)
        assert refused.status == 401
        assert "keyfile" in kinds(await s.get("/api/status"))
        assert (await s.get("/api/keyfile")).status == 200
        after = await s.get("/api/status")
        assert after.json()["keyfile_saved"] and "keyfile" not in kinds(after)


async def test_a_mount_is_ready_once_the_page_is_bound_not_once_its_stack_serves(
    tmp_path, monkeypatch
) -> None:
    """`fluidfs mount` returns when the node says it is ready. That waited for the page
    to serve, so for its stack (Starlette, Hypercorn: a quarter of a CPU-second, more
    from a cold disk) to load after the mount was open, and a fresh machine's `mount &&
    ls` waited for it (issue 16). Now the page's socket is bound and its address
    published at once, the mount is ready, and the stack serves on that socket after.
    Before: ready came only after the page served."""
    from fluidfs.web.site import Page

    events: list[str] = []
    run = Page.run

    async def recorded(self, *, task_status=trio.TASK_STATUS_IGNORED, **kw):
        class Started:
            def started(self, value=None) -> None:
                events.append("serving")
                task_status.started(value)

        await run(self, task_status=Started(), **kw)

    monkeypatch.setattr(Page, "run", recorded)
    ring = keys.KeyRing(keys.generate())
    state = StateDir(tmp_path / "state")
    node = Node(NodeConfig(ring, state, block_size=64 * 1024, web="127.0.0.1:0"))
    ready = trio.Event()

    def on_ready() -> None:
        events.append("ready")
        events.append(f"url {read_url(state.path) is not None}")
        ready.set()

    try:
        await node.start()
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(node.run_services, web_beside=True))
            await nursery.start(node._ready_once_web_up, on_ready)
            await ready.wait()
            parsed = urllib.parse.urlsplit(read_url(state.path))
            token = urllib.parse.parse_qs(parsed.query)["token"][0]
            page = Site(node, "", parsed.hostname, parsed.port, token)
            reply = await page.get("/api/status")  # waits in the backlog until it serves
            assert reply.status == 200, reply
            assert events == ["ready", "url True", "serving"], events
            nursery.cancel_scope.cancel()
    finally:
        node.close()
