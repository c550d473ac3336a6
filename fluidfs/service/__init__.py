"""The host side: what we do for peers who store shards and records with us."""
