"""fluidfs: a peer-to-peer encrypted backup filesystem."""

__version__ = "0.1.0"
