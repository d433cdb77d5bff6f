"""Open files and directories: the FUSE handles, their open flags and the writeback-error
sequence each file handle has seen (errseq, as Linux reports a writeback error once per
descriptor)."""
from __future__ import annotations

import os

from atomicfs.metadata import Inode
from atomicfs.volume import Volume


class Handle:
    __slots__ = ("inode", "flags", "err_seq", "writethrough", "direct")

    def __init__(self, inode: Inode, flags: int, err_seq: int, writethrough: bool) -> None:
        self.inode = inode
        self.flags = flags
        self.err_seq = err_seq
        self.writethrough = writethrough  # O_DSYNC/O_SYNC: durable write-through
        # O_DIRECT: each write reaches the device (or the log) before it returns, as on a
        # kernel filesystem; the RFC's write-through (no cache flush) does exactly that.
        self.direct = bool(flags & os.O_DIRECT)


class DirHandle:
    __slots__ = ("inode", "entries")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.entries: list[tuple[bytes, int]] = []


class Handles:
    """The open file and directory handles of one mount (`handles[fh]` is a file's)."""

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.files: dict[int, Handle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    def __getitem__(self, fh: int) -> Handle:
        return self.files[fh]

    def _alloc_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def open(self, inode: Inode, flags: int) -> int:
        err_seq = self.vol.errseq_sample(inode) if inode.is_reg else 0
        sync = bool(flags & (os.O_DSYNC | os.O_SYNC))
        fh = self._alloc_fh()
        self.files[fh] = Handle(inode, flags, err_seq, sync)
        inode.opens += 1
        return fh

    def release(self, fh: int) -> Handle | None:
        """Close a file handle; the handle, or None if it was not open."""
        h = self.files.pop(fh, None)
        if h is not None:
            h.inode.opens -= 1
        return h

    def opendir(self, inode: Inode) -> int:
        fh = self._alloc_fh()
        self.dirs[fh] = DirHandle(inode)
        return fh

    def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    def new_error(self, h: Handle) -> bool:
        """Whether a writeback error was recorded since this handle last looked; if so it
        has now seen it (and so has the file)."""
        seq = self.vol.errseq_check(h.inode, h.err_seq)
        if seq is None:
            return False
        h.err_seq = seq
        return True

    def writethrough_open(self, inode: Inode) -> bool:
        """Whether the file is open with O_DSYNC or O_SYNC."""
        return any(h.writethrough for h in self.files.values() if h.inode is inode)
