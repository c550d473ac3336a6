"""Keeping the tree on the network and bringing it back: commits, publishing, lease, restore."""
