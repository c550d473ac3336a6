"""The running node: the composition root and what only it does.

- ``node``: builds every part over one state directory and wires them (Node);
- ``config``: NodeConfig, what a node needs to start;
- ``session``: the FUSE session (open, serve, close, unmount on signals);
- ``status``: the figures behind `fluidfs status`;
- ``handlers``: the control requests peers, add_peer, status and check;
- ``supervise``: background loops restarted with back-off when they fail;
- ``logsetup``: the node process's logging.
"""
