"""atomicfs: a FUSE filesystem with buffered atomic writes and write-through writes."""

__version__ = "0.1.0"
