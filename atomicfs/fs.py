"""pyfuse3 Operations: names, inodes, permissions, errno; data goes to the page cache.

Kernel caching mode. Files are opened in the kernel's page-cache mode with keep_cache and
without writeback caching: every write() still reaches the daemon synchronously, as one
request per write up to 1 MiB (so the daemon sees the application's write boundaries, which
the atomic-folio policy depends on); O_DSYNC, O_SYNC and RWF_DSYNC arrive as the open flags
plus an fsync after the write; shared writable mmap works (SQLite's WAL index needs it).
direct_io handles would lose all three (the kernel neither passes RWF_DSYNC nor fsyncs
after a direct write, and refuses shared mmap), so they are not used. The kernel cache
cannot go stale, because every change to a file's data passes through the kernel.

Permissions are checked by the kernel (default_permissions); this layer keeps owners,
modes and times as ext4 does, and returns ext4's errno values.

Name operations and the life of inodes are namespace.py's, the user.atomicfs.* attributes
(settings, statistics, control) control.py's, open handles handles.py's; every other layer
is reached through the Volume's facade.

A request handler that fails unexpectedly fails only its request (EIO, logged with the
traceback); the daemon goes on serving.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import time
from typing import Any, Callable, Sequence

import pyfuse3

from atomicfs import format as fmt
from atomicfs import fuseconn, fuseloop
from atomicfs.control import PREFIX, SETTINGS, Control, InjectedDaemonFault
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.filemap import UNCACHED_READ_MIN
from atomicfs.handles import Handles
from atomicfs.metadata import DIRENT_SNAP, SYMLINK_SNAP, XATTR_SNAP, Inode
from atomicfs.namespace import NAME_MAX, NEW_INODE_SNAP, Namespace
from atomicfs.volume import LOG_ROOM, Volume

log = logging.getLogger(__name__)

PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
MAX_FILE_BLOCKS = fmt.MAX_FILE_BLOCKS
# Names and attributes change only through this mount's kernel: the daemon never renames or
# removes a name on its own, and what it changes of an inode by itself (atime after a read,
# mtime, ctime and blocks after a write, ctime after setxattr) the kernel invalidates when it
# sends that request. So its dentries and attributes cannot go stale, and a name walked or
# stat'ed again within 10 s costs no LOOKUP or GETATTR round trip.
ATTR_TIMEOUT = 10.0
ENTRY_TIMEOUT = 10.0
SUIDGID = stat.S_ISUID | stat.S_ISGID
SETATTR_FIELDS = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime",
                  "update_mtime", "update_ctime")


def privs_to_clear(node: Inode, caller: fuseconn.Caller) -> int:
    """The setuid/setgid bits a write, truncate or chown by `caller` clears (the kernel's
    setattr_should_drop_suidgid): setuid; setgid when group-executable, or else when the
    caller is not in the file's group."""
    bits = node.mode & stat.S_ISUID
    if node.mode & stat.S_ISGID and (node.mode & stat.S_IXGRP or
                                     not caller.in_group(node.gid)):
        bits |= stat.S_ISGID
    return bits


def fuse_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSError and device/log failures into FUSE errors with the right errno, and any
    other exception into EIO for this request alone (pyfuse3 would let it end the main
    loop, and with it the daemon)."""
    name = fn.__name__

    async def wrapper(self: "AtomicFS", *args: Any, **kwargs: Any) -> Any:
        try:
            # tracked by the watchdog: a request that hangs says what it waits for
            with self.vol.watchdog.track(name, str(args[0]) if args else "", fuse=True):
                self.control.check_fault(name)
                return await fuseloop.serve(fn(self, *args, **kwargs))
        except (pyfuse3.FUSEError, InjectedDaemonFault):
            raise
        except NoSpace:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except DeviceError as exc:  # LogFailed too
            log.error("%s: I/O error: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed unexpectedly; the request gets EIO", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class AtomicFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, vol: Volume, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.vol = vol
        self.md = vol.md
        self.filemap = vol.filemap  # the data calls (read, write, truncate)
        self.handles = Handles(vol)
        self.control = Control(vol, self.handles, os.getuid())
        self.ns = Namespace(vol, self.control)
        self.max_file_size = MAX_FILE_BLOCKS * vol.bs
        vol.update_meta_reserve()  # the loaded metadata may be larger than the minimum
        self._on_ready = on_ready

    # --------------------------------------------------------------------- helpers

    def init(self) -> None:
        if self._on_ready is not None:
            self._on_ready()

    def _get(self, ino: int) -> Inode:
        inode = self.md.inodes.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return inode

    def _dir(self, ino: int) -> Inode:
        inode = self._get(ino)
        if not inode.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _attr(self, inode: Inode) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = inode.mode
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        e.st_rdev = inode.rdev
        bs = self.vol.bs
        if inode.is_dir:
            e.st_size = max(bs, (len(inode.entries or ()) * 32 + bs - 1) // bs * bs)
            blocks = e.st_size // 512
        elif inode.is_symlink:
            e.st_size = len(inode.target or b"")
            blocks = 0
        else:
            e.st_size = inode.size
            blocks = 0
            if inode.extents is not None:
                blocks = inode.extents.mapped_blocks * (bs // 512)
                # delayed allocation: count reserved blocks too
                blocks += self.vol.reserved_blocks(inode) * (bs // 512)
        e.st_blocks = blocks
        e.st_blksize = max(bs, self.vol.effective_unit(inode))
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns
        e.st_birthtime_ns = inode.btime_ns
        return e

    # ------------------------------------------------------------------ namespace

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            inode = parent
        elif name == b"..":
            inode = self._get(parent.parent)
        else:
            inode = self.ns.child(parent, name)
        inode.lookups += 1
        return self._attr(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        await fuseloop.serve(self._forget(inode_list))

    async def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            inode = self.md.inodes.get(ino)
            if inode is None:
                continue
            inode.lookups -= n
            if inode.lookups <= 0 and inode.nlink == 0:
                try:
                    await self.ns.maybe_delete(inode)
                except OSError as exc:  # DeviceError, LogFailed too
                    log.error("cannot remove inode %d: %s", ino, exc)
                except Exception:  # forget has no reply to fail: log, keep serving
                    log.exception("cannot remove inode %d", ino)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(self._get(inode))

    @fuse_errors
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        kill = fuseconn.kill_suidgid()  # before any await (see fuseconn)
        await self.vol.prepare_change()
        node = self._get(inode)
        self.vol.check_writable()
        now = time.time_ns()
        if fields.update_size:
            if not node.is_reg:
                raise pyfuse3.FUSEError(errno.EISDIR if node.is_dir else errno.EINVAL)
            if attr.st_size > self.max_file_size:
                raise pyfuse3.FUSEError(errno.EFBIG)
            await self._truncate(node, attr.st_size)
            node.mtime_ns = node.ctime_ns = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
            node.ctime_ns = now
        if fields.update_uid:
            node.uid = attr.st_uid
            node.ctime_ns = now
        if fields.update_gid:
            node.gid = attr.st_gid
            node.ctime_ns = now
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
            node.ctime_ns = now
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
            node.ctime_ns = now
        if fields.update_ctime:
            node.ctime_ns = attr.st_ctime_ns
        if not any(getattr(fields, f) for f in SETATTR_FIELDS):
            node.ctime_ns = now  # chown(path, -1, -1): the kernel sends nothing to set
        if kill and node.mode & SUIDGID:  # chown, or truncate without CAP_FSETID
            node.mode &= ~privs_to_clear(node, kill)
            node.ctime_ns = now
        self.md.log_inode(node)
        return self._attr(node)

    async def _kill_suidgid(self, node: Inode, caller: fuseconn.Caller) -> None:
        """Clear the setuid/setgid bits a write or open(O_TRUNC) by a caller without
        CAP_FSETID clears (the kernel flags it under FUSE_HANDLE_KILLPRIV_V2, and leaves it
        to us), and tell the kernel, whose copy of the mode no reply refreshes."""
        bits = privs_to_clear(node, caller)
        if not bits:
            return
        await self.vol.prepare_change()
        node.mode &= ~bits
        node.ctime_ns = time.time_ns()
        self.md.log_inode(node)
        try:
            pyfuse3.invalidate_inode(node.ino, attr_only=True)
        except OSError as exc:  # the kernel forgot the inode: nothing cached to refresh
            log.debug("invalidating inode %d after clearing setuid: %s", node.ino, exc)

    async def _truncate(self, inode: Inode, size: int) -> None:
        if size == inode.size:
            return
        m = self.vol.mapping(inode)
        await self.filemap.truncate(inode, m, size)
        bs = self.vol.bs
        if size < inode.size:
            self.md.truncate_extents(inode, (size + bs - 1) // bs)
        self.md.set_size(inode, size)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._get(inode)
        if not node.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target or b""

    @fuse_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.vol.prepare_change(growth=NEW_INODE_SNAP + len(name))
        parent = self._dir(parent_inode)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                        stat.S_IFBLK):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        inode = self.ns.new_inode(parent, name, mode, ctx, rdev=rdev)
        return self._attr(inode)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.vol.prepare_change(growth=NEW_INODE_SNAP + len(name))
        parent = self._dir(parent_inode)
        inode = self.ns.new_inode(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        return self._attr(inode)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.vol.prepare_change(LOG_ROOM + len(target), NEW_INODE_SNAP + len(name)
                                      + SYMLINK_SNAP + len(target))
        parent = self._dir(parent_inode)
        if len(target) >= PATH_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        inode = self.ns.new_inode(parent, name, stat.S_IFLNK | 0o777, ctx, target=target)
        return self._attr(inode)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.vol.prepare_change(growth=DIRENT_SNAP + len(new_name))
        node = self._get(inode)
        self.ns.link(node, self._dir(new_parent_inode), new_name)
        return self._attr(node)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        await self.vol.prepare_change()
        await self.ns.unlink(self._dir(parent_inode), name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        await self.vol.prepare_change()
        await self.ns.rmdir(self._dir(parent_inode), name)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.vol.prepare_change(2 * LOG_ROOM, len(name_new) - len(name_old))
        old_dir = self._dir(parent_inode_old)
        new_dir = self._dir(parent_inode_new)
        await self.ns.rename(old_dir, name_old, new_dir, name_new, flags, ctx)

    # -------------------------------------------------------------------- files

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        # before any await (see fuseconn); the kernel flags only O_TRUNC opens
        kill = fuseconn.kill_suidgid() if flags & os.O_TRUNC else None
        node = self._get(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR) or flags & os.O_TRUNC:
            self.vol.check_writable()
        if kill and node.mode & SUIDGID:  # O_TRUNC without CAP_FSETID
            await self._kill_suidgid(node, kill)
        if flags & os.O_TRUNC and node.is_reg and node.size:
            await self.vol.prepare_change()
            await self._truncate(node, 0)
            node.mtime_ns = node.ctime_ns = time.time_ns()
            self.md.log_inode(node)
        return pyfuse3.FileInfo(fh=self.handles.open(node, flags), keep_cache=True,
                                direct_io=False)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        await self.vol.prepare_change(growth=NEW_INODE_SNAP + len(name))
        parent = self._dir(parent_inode)
        existing = self.md.lookup(parent, name) if len(name) <= NAME_MAX else None
        if existing is not None:  # the kernel sends create only for missing names
            raise pyfuse3.FUSEError(errno.EEXIST)
        inode = self.ns.new_inode(parent, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        fi = pyfuse3.FileInfo(fh=self.handles.open(inode, flags), keep_cache=True,
                              direct_io=False)
        return fi, self._attr(inode)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self.handles[fh]
        inode = h.inode
        m = self.vol.mapping(inode)
        if h.direct or size >= UNCACHED_READ_MIN:
            # O_DIRECT bypasses the cache, and the kernel caches what its readahead asks
            # for: neither needs a second copy here (see FileMap.read_uncached).
            data = await self.filemap.read_uncached(inode, m, off, size)
        else:
            data = await self.filemap.read(inode, m, off, size)
        self._touch_atime(inode)
        return data

    def _touch_atime(self, inode: Inode) -> None:
        """Access time after a read, by the mount's policy: relatime (the default) updates
        it when older than mtime/ctime or a day old, noatime never; nodiratime leaves
        directories alone."""
        opts = self.vol.opts
        if opts.atime == "noatime" or (opts.nodiratime and inode.is_dir):
            return
        now = time.time_ns()
        if inode.atime_ns <= max(inode.mtime_ns, inode.ctime_ns) or \
                now - inode.atime_ns > 86400 * 10**9:
            inode.atime_ns = now
            self.md.mark_dirty(inode)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        inode = h.inode
        self.vol.check_writable()
        kill = fuseconn.kill_suidgid() if inode.mode & SUIDGID else None  # before any await
        if kill:
            await self._kill_suidgid(inode, kill)
        if off + len(buf) > self.max_file_size:  # as generic_write_checks: clip, or EFBIG
            if off >= self.max_file_size:
                raise pyfuse3.FUSEError(errno.EFBIG)
            buf = buf[:self.max_file_size - off]
        m = self.vol.mapping(inode)
        atomic, mode = self.control.write_semantics(h, off, len(buf))
        strict = self.vol.strict_of(inode)
        for attempt in (0, 1):
            try:
                n = await self.filemap.write(inode, m, off, buf,
                                             writethrough=mode is not None,
                                             durable=mode == "durable", strict=strict,
                                             atomic=atomic)
                break
            except NoSpace:
                if attempt or not await self.vol.make_room():
                    raise pyfuse3.FUSEError(errno.ENOSPC) from None
        self.vol.update_meta_reserve()
        return n

    async def flush(self, fh: int) -> None:
        # Nothing to do at close(): ENOSYS makes the kernel stop sending FLUSH (it still
        # writes back and checks errors itself first), one round trip fewer per close.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @fuse_errors
    async def release(self, fh: int) -> None:
        h = self.handles.release(fh)
        if h is None:
            return
        self.control.closed(h.inode)
        if h.inode.nlink == 0:
            try:
                await self.ns.maybe_delete(h.inode)
            except OSError as exc:  # DeviceError, LogFailed too
                log.error("cannot remove inode %d: %s", h.inode.ino, exc)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        inode = h.inode
        self.vol.check_writable()
        failed = False
        try:
            await self.vol.fsync(inode, datasync)
        except DeviceError as exc:  # LogFailed too
            log.warning("fsync of inode %d failed: %s", inode.ino, exc)
            failed = True
        if self.handles.new_error(h):
            failed = True
        if failed:
            raise pyfuse3.FUSEError(errno.EIO)

    # ------------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return self.handles.opendir(self._dir(inode))

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self.handles.dirs[fh]
        node = dh.inode
        if start_id == 0 or not dh.entries:
            # A stable listing for this pass, so that concurrent changes neither skip nor
            # repeat entries.
            dh.entries = [(b".", node.ino), (b"..", node.parent or node.ino)]
            dh.entries += sorted((node.entries or {}).items())
        for i in range(start_id, len(dh.entries)):
            name, ino = dh.entries[i]
            child = self.md.inodes.get(ino)
            if child is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(child), i + 1):
                break
            if name not in (b".", b".."):
                child.lookups += 1
        self._touch_atime(node)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.handles.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.vol.commit()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.vol.bs
        s.f_frsize = self.vol.bs
        s.f_blocks, s.f_bfree, s.f_bavail = self.vol.space()
        s.f_files = 1 << 32
        s.f_ffree = (1 << 32) - len(self.md.inodes)
        s.f_favail = s.f_ffree
        s.f_namemax = NAME_MAX
        return s

    # ------------------------------------------------------------------------ xattrs

    def _xattr_allowed(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext,
                       write: bool) -> None:
        if len(name) > XATTR_NAME_MAX:
            raise pyfuse3.FUSEError(errno.ERANGE)
        ns = name.split(b".", 1)[0]
        if ns == b"user":
            if not (inode.is_reg or inode.is_dir):
                raise pyfuse3.FUSEError(errno.EPERM if write else errno.ENODATA)
        elif ns == b"trusted":
            if ctx.uid != 0:
                raise pyfuse3.FUSEError(errno.EPERM if write else errno.ENODATA)
        elif ns == b"security":
            pass
        else:  # system.* (POSIX ACLs) and unknown namespaces
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._get(inode)
        if name.startswith(PREFIX):
            virtual = self.control.getxattr(node, name, ctx)
            if virtual is not None:
                return virtual
        self._xattr_allowed(node, name, ctx, write=False)
        value = node.xattrs.get(name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        node = self._get(inode)
        return [n for n in node.xattrs if not n.startswith(b"trusted.") or ctx.uid == 0]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        node = self._get(inode)
        if name.startswith(PREFIX) and await self.control.setxattr(node, name, value, ctx):
            return
        await self.vol.prepare_change(LOG_ROOM + len(name) + len(value),
                                      XATTR_SNAP + len(name) + len(value))
        self._xattr_allowed(node, name, ctx, write=True)
        if len(value) > XATTR_SIZE_MAX:
            raise pyfuse3.FUSEError(errno.E2BIG)
        setting = name in SETTINGS
        if setting:
            value = self.control.validate_setting(node, name, value)
        old = node.xattrs.get(name)
        self.vol.metadata_room(len(value) - len(old) if old is not None
                               else XATTR_SNAP + len(name) + len(value))
        if setting:
            await self.control.apply_setting(node, name, value)
        self.md.set_xattr(node, name, value)
        node.ctime_ns = time.time_ns()
        self.md.log_inode(node)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes,
                          ctx: pyfuse3.RequestContext) -> None:
        await self.vol.prepare_change()
        node = self._get(inode)
        self.vol.check_writable()
        self._xattr_allowed(node, name, ctx, write=True)
        if name not in node.xattrs:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name in SETTINGS:
            await self.control.apply_setting(node, name, None)
        self.md.del_xattr(node, name)
        node.ctime_ns = time.time_ns()
        self.md.log_inode(node)
