"""Persistent state: LMDB environments and their tables."""
