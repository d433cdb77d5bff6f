"""A plain pyfuse3 passthrough filesystem: every request goes to a directory of the host
(kernel XFS in the bench), with no caching of its own and no writeback cache, in the same
FUSE mode as atomicfs (kernel page cache with keep_cache). It is what a FUSE filesystem
costs without atomicfs's work: the pgbench row's second reference.

    python bench/passthrough.py SOURCE MOUNTPOINT

It runs as root and serves every user (allow_other, default_permissions): what a caller
creates is chowned to the caller, as a kernel filesystem would own it. Inode numbers are
the host's; the daemon keeps one path per inode (enough for a database's data directory:
no hard links across directories are needed).
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from typing import Any, Callable, Sequence

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
TIMEOUT = 1.0


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {ROOT: os.path.realpath(source)}
        self.lookups: dict[int, int] = {}
        self.fds: dict[int, int] = {}  # fh is the host descriptor itself

    # ------------------------------------------------------------------ helpers

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attr(self, st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(e, name, getattr(st, name))
        e.st_ino = ino
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.generation = 0
        e.attr_timeout = e.entry_timeout = TIMEOUT
        return e

    def _remember(self, path: str, st: os.stat_result) -> int:
        ino = ROOT if path == self.paths[ROOT] else st.st_ino
        self.paths[ino] = path
        self.lookups[ino] = self.lookups.get(ino, 0) + 1
        return ino

    def _entry(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self._attr(st, self._remember(path, st))

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    @staticmethod
    def _own(path: str, ctx: pyfuse3.RequestContext) -> None:
        os.lchown(path, ctx.uid, ctx.gid)

    # ------------------------------------------------------------------ names

    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        return self._entry(self._child(parent, name))

    async def forget(self, inodes: Sequence[tuple[int, int]]) -> None:
        for ino, n in inodes:
            left = self.lookups.get(ino, 0) - n
            if left > 0 or ino == ROOT:
                self.lookups[ino] = max(left, 0)
            else:
                self.lookups.pop(ino, None)
                self.paths.pop(ino, None)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(self._path(inode))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self._attr(st, inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, attr.st_mode & 0o7777)
            if fields.update_uid or fields.update_gid:
                os.lchown(path, attr.st_uid if fields.update_uid else -1,
                          attr.st_gid if fields.update_gid else -1)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                         follow_symlinks=False)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return await self.getattr(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
                    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent, name)
        try:
            os.mkdir(path, mode)
            self._own(path, ctx)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self._entry(path)

    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(parent, name)
        try:
            os.symlink(target, path)
            self._own(path, ctx)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self._entry(path)

    async def link(self, inode: int, new_parent: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent, new_name)
        try:
            os.link(self._path(inode), path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return self._entry(path)

    async def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.unlink(self._child(parent, name))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def rmdir(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.rmdir(self._child(parent, name))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
        try:
            ino = os.lstat(old).st_ino
            os.rename(old, new)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        if self.paths.get(ino) == old:
            self.paths[ino] = new
        if os.path.isdir(new):  # the paths below a renamed directory move with it
            for k, p in list(self.paths.items()):
                if p.startswith(old + "/"):
                    self.paths[k] = new + p[len(old):]

    # ------------------------------------------------------------------ files

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent, name)
        try:
            fd = os.open(path, flags | os.O_CREAT, mode & 0o7777)
            self._own(path, ctx)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._entry(path)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(fh)

    # ------------------------------------------------------------------ directories

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._path(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        base = self._path(fh)
        entries = sorted((e.inode(), e.name) for e in os.scandir(base))
        for ino, name in entries:
            if ino <= start_id:
                continue
            path = os.path.join(base, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name),
                                         self._attr(st, self._remember(path, st)), ino):
                self.lookups[ino] -= 1  # not handed out after all
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ attributes
    # Passed through, so the kernel asks for security.capability before every write, as it
    # asks atomicfs (a FUSE filesystem without getxattr is asked once, never again).

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self._path(inode),
                                                     follow_symlinks=False)]

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(self._path(inode), name, value, follow_symlinks=False)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext
                          ) -> None:
        os.removexattr(self._path(inode), name, follow_symlinks=False)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.paths[ROOT])
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax"):
            setattr(out, name, getattr(sv, name))
        return out


def _fuse_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """OSError from the host becomes the FUSE error of its errno (pyfuse3 would end its
    main loop on any other exception)."""
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    return wrapper


for _name, _fn in list(vars(Passthrough).items()):
    if not _name.startswith("_") and callable(_fn):
        setattr(Passthrough, _name, _fuse_errors(_fn))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, mountpoint = args
    os.umask(0)  # the kernel applied the caller's umask already
    options: Any = set(pyfuse3.default_options)
    options |= {"fsname=passthrough", "subtype=passthrough", "allow_other",
                "default_permissions"}
    pyfuse3.init(Passthrough(source), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
