"""The command line: one module per command family, around one options table.

- ``main``: builds the parser from ``options`` and runs the chosen command's family.
- ``options`` (the table) and ``argtypes`` (text to values and back).
- Families: ``keyfile`` (init, key), ``mount`` (mount, unmount), ``serve`` (serve,
  testnet), ``inspect`` (id, peers, status, check), ``snapshots`` (sync, snapshots,
  forget).
- Shared by them: ``common`` (exit codes, one-line failures), ``firstrun`` (state
  directory and keyfile on a first run), ``nodeargs`` (arguments to a node's settings),
  ``nodecall`` (the running node's control socket).
"""
