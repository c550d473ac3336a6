"""Keeping the tree on the network and bringing it back: commits, publishing, lease, restore.

Each module is one part, handed its collaborators by the node (node/node.py):

- ``schedule``: when the next automatic commit is due and why (a state machine, no I/O);
- ``commits``: the commit loop (waits on events and deadlines) and commits on request;
- ``publisher``: root records, and when a commit counts as published;
- ``leasekeeper``: renewing the writer lease, turning read-only on losing it;
- ``gate``: the checks before a mount (lease, newest root, the fresh-state quorum);
- ``dialer``: reaching the keyfile's bootstrap and pinned peers;
- ``restore``: adopting a root record's commit, then the background restore;
- ``control``: sync, snapshots, forget and status requests (the control-socket edge);
- ``options``: RemountOptions and RemountError.
"""
