"""The local web page: status, peers, snapshots and restore, keyfile export (docs/web.md).

An ASGI app (Starlette) served by Hypercorn's trio worker inside the node's own trio
run, so every request reads the node's parts directly, on the same loop: no second
process, no copy of the state. ``server.py`` runs it in the node's nursery,
``guard.py`` is the security edge (token, Host, CSRF, CSP), ``api.py`` the JSON API and
downloads, ``browse.py`` the snapshot walk and tar stream; ``static/`` is the page.
"""
