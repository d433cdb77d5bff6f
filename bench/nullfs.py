"""The transport's ceiling: a minimal pyfuse3 filesystem that discards writes and reads zeros.

It serves one directory in which any name can be created; files keep only their size.
It runs in the same FUSE mode as atomicfs (kernel page cache, keep_cache, no writeback
cache), so a side-by-side run measures what atomicfs costs on top of FUSE itself.

    python bench/nullfs.py MOUNTPOINT [--xattrs | --perm]

With --xattrs it answers getxattr (ENODATA: no attribute) as a filesystem with extended
attributes does. The kernel then asks for security.capability before every write, one more
round trip per write, as it does on atomicfs; without it the first getxattr gets ENOSYS and
the kernel never asks again.

With --perm it is mounted with default_permissions, as atomicfs is: the kernel checks
permissions itself and, since a create or unlink changes the directory's attributes, asks
for them (GETATTR) before the next create or unlink in it. That is the transport's ceiling
for the metadata rows; plain nullfs, which checks nothing, pays one round trip fewer.

Names and attributes are cached by the kernel as long as atomicfs lets it cache them
(ENTRY_TIMEOUT, ATTR_TIMEOUT: the same values, checked by tests/unit/test_bench_report.py),
so both answer the same requests.
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
ENTRY_TIMEOUT = 10.0  # = atomicfs.fs.ENTRY_TIMEOUT
ATTR_TIMEOUT = 10.0   # = atomicfs.fs.ATTR_TIMEOUT


class NullFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {}
        self.sizes: dict[int, int] = {}
        self.next_ino = ROOT + 1
        self.now = time.time_ns()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = (stat.S_IFDIR | 0o777) if ino == ROOT else (stat.S_IFREG | 0o666)
        e.st_nlink = 2 if ino == ROOT else 1
        e.st_size = self.sizes.get(ino, 0)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.now
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        return e

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode != ROOT and inode not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        ino = self.names.get(name)
        if parent != ROOT or ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        ino = self.names.get(name)
        if ino is None:
            ino = self.names[name] = self.next_ino
            self.next_ino += 1
            self.sizes[ino] = 0
        return pyfuse3.FileInfo(fh=ino, keep_cache=True), self._attr(ino)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            self.sizes[inode] = attr.st_size
        return self._attr(inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(max(0, min(size, self.sizes.get(fh, 0) - off)))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.sizes[fh]:
            self.sizes[fh] = off + len(buf)
        return len(buf)

    async def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ino = self.names.pop(name, None)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.sizes.pop(ino, None)

    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        return None

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self.names.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = 1 << 20
        s.f_namemax = 255
        return s


class NullXattrFS(NullFS):
    """NullFS that supports extended attributes (it has none)."""

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return []


def main() -> None:
    args = sys.argv[1:]
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in ("--xattrs", "--perm")):
        sys.exit("usage: nullfs.py MOUNTPOINT [--xattrs | --perm]")
    mountpoint = args[0]
    fs = NullXattrFS() if args[1:] == ["--xattrs"] else NullFS()
    opts = {"fsname=nullfs", "subtype=nullfs"}
    if args[1:] == ["--perm"]:
        opts.add("default_permissions")
    pyfuse3.init(fs, mountpoint, opts)
    try:
        trio.run(pyfuse3.main, 4, 64)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    os.umask(0)
    main()
