"""pyfuse3 Operations: names, inodes, permissions, handles; data goes to the page cache.

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

Virtual attributes serve the command line and the preload library: `user.atomicfs.stat`
(read, any file; JSON; the root's, which names the image and the options, only for root
and the mount's owner), `user.atomicfs.limits` (read, regular files: the statx
atomic-write limits) and `user.atomicfs.control` (write; on the root directory sync,
checkpoint, commit, flush, drop_caches, and the test knobs inject=, delay=, fault=; on a
regular file the write announcements of the preload library, see `_announce`). None is
listed.

A request handler that fails unexpectedly fails only its request (EIO, logged with the
traceback); the daemon goes on serving.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from typing import Any, Callable, Sequence

import pyfuse3
import trio

from atomicfs import format as fmt
from atomicfs.device import parse_inject
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.journal import LogFailed
from atomicfs.metadata import (DIRENT_SNAP, INHERITED_XATTRS, INODE_SNAP, SYMLINK_SNAP,
                               XATTR_ATOMIC_UNIT, XATTR_SNAP, XATTR_WRITETHROUGH, Inode)
from atomicfs.options import check_atomic_unit, parse_delay
from atomicfs.sizes import parse_size
from atomicfs.volume import Volume

log = logging.getLogger(__name__)

NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
MAX_FILE_BLOCKS = fmt.MAX_FILE_BLOCKS
XATTR_STAT = b"user.atomicfs.stat"
XATTR_CONTROL = b"user.atomicfs.control"
XATTR_LIMITS = b"user.atomicfs.limits"
MAX_ANNOUNCED = 1024  # open write announcements per file (one per writing thread, really)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # leave a whiteout (a 0/0 character device) at the old name: overlayfs
# Snapshot bytes a new inode adds besides its name: inode, entry, inherited attributes.
NEW_INODE_SNAP = INODE_SNAP + DIRENT_SNAP + len(INHERITED_XATTRS) * (XATTR_SNAP + 32)
SNAPSHOT_SLACK = 16  # blocks, for extents that writeback maps before the next checkpoint
LOG_ROOM = 2048  # log bytes a namespace change may add (inode and dirent records, names)
ATTR_TIMEOUT = 1.0
ENTRY_TIMEOUT = 1.0


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


class Announced:
    """A write the preload library announced before issuing it (RWF_ATOMIC,
    RWF_WRITETHROUGH, RWF_DSYNC): the write request at exactly (off, length) of the file
    gets these semantics, whichever thread's it is, until the announcer withdraws it."""

    __slots__ = ("off", "length", "atomic", "writethrough", "durable")

    def __init__(self, off: int, length: int, flags: str) -> None:
        self.off = off
        self.length = length
        self.atomic = "a" in flags
        self.writethrough = "w" in flags
        self.durable = "d" in flags


class DirHandle:
    __slots__ = ("inode", "entries")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.entries: list[tuple[bytes, int]] = []


# Test knobs of the control attribute: root only, on mounts started with a test knob or
# `testing` (MountOptions.testing).
KNOB_CONTROLS = ("inject", "delay", "fault")
FAULTS = ("request", "daemon")
SETATTR_FIELDS = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime",
                  "update_mtime", "update_ctime")


class InjectedFault(RuntimeError):
    """Raised on purpose by the `fault=` control, to test how failures are contained."""


def fuse_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSError and device/log failures into FUSE errors with the right errno, and any
    other exception into EIO for this request alone (pyfuse3 would let it end the main
    loop, and with it the daemon)."""
    name = fn.__name__

    async def wrapper(self: "AtomicFS", *args: Any, **kwargs: Any) -> Any:
        try:
            # tracked by the watchdog: a request that hangs says what it waits for
            with self.vol.watchdog.track(name, str(args[0]) if args else "", fuse=True):
                if self.fault_next_request:
                    self.fault_next_request = False
                    raise InjectedFault(f"fault injection in {name}")
                return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NoSpace:
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except (DeviceError, LogFailed) as exc:
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
        self.cache = vol.cache
        self.wb = vol.wb
        self.filemap = vol.filemap
        self.handles: dict[int, Handle] = {}
        self.announced: dict[int, dict[str, Announced]] = {}  # ino -> token -> write
        self.dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        self.max_file_size = MAX_FILE_BLOCKS * vol.bs
        self._update_meta_reserve()  # the loaded metadata may be larger than the minimum
        self._on_ready = on_ready
        self.nursery: trio.Nursery | None = None
        self.owner = os.getuid()  # who mounted it
        self.fault_next_request = False

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

    def _child(self, parent: Inode, name: bytes) -> Inode:
        """The inode parent/name names; ENAMETOOLONG before ENOENT, as ext4 answers."""
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        found = self.md.lookup(parent, name)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise pyfuse3.FUSEError(errno.EINVAL)

    def _alloc_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _check_writable(self) -> None:
        if self.vol.journal.failed is not None:
            raise pyfuse3.FUSEError(errno.EIO)

    def _metadata_fits(self, growth: int) -> bool:
        """Whether the metadata, grown by `growth` bytes, can still be checkpointed, now and
        ever after: a checkpoint writes the new snapshot while the current and the
        previous one (the fallback) live, and then frees only the previous one, so free
        space must hold the next snapshot three times less the two that will be freed
        (3 * next - current - previous). Without this the log fills and the filesystem
        stops."""
        if growth <= 0:
            return True
        a = self.vol.alloc
        bs = self.vol.bs
        nxt = 1 + (self.md.snapshot_bytes + growth + bs - 1) // bs + SNAPSHOT_SLACK
        kept = self.vol.checkpointer.kept_snapshot_blocks
        return 3 * nxt - kept <= a.free_blocks - a.reserved_blocks

    async def _make_metadata_room(self, growth: int) -> None:
        """Before a change that grows the metadata: when it does not fit, commit the log so
        that blocks of recent deletes become free (the check itself follows, without an
        await between it and the change)."""
        if not self._metadata_fits(growth):
            await self.vol.flusher.make_room()

    def _metadata_room(self, growth: int) -> None:
        """ENOSPC unless the growth fits (see `_metadata_fits`); file data may not use the
        room the metadata needs (the allocator's reserve follows its size)."""
        if not self._metadata_fits(growth):
            raise pyfuse3.FUSEError(errno.ENOSPC)
        self._update_meta_reserve()

    def _update_meta_reserve(self) -> None:
        """Keep file data out of the room the next snapshot needs (it grows between
        checkpoints; the journal only sizes the reserve at each checkpoint)."""
        self.vol.alloc.set_snapshot_estimate(self.md.snapshot_bytes, self.vol.bs)

    async def _prepare_change(self, nbytes: int = LOG_ROOM, growth: int = 0) -> None:
        """Before a metadata change: refuse when the log failed, keep the pending log batch
        within its size limit (a burst of changes would otherwise grow one batch past what
        the log can hold), and make room for `growth` more bytes of metadata. Call before
        any lookup the change depends on: this may wait."""
        self._check_writable()
        await self.vol.journal.wait_for_room(nbytes)
        await self._make_metadata_room(growth)
        self._check_writable()

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
                m = self.cache.mappings.get(inode.ino)
                if m is not None:  # delayed allocation: count reserved blocks too
                    blocks += sum(f.reserved.bit_count() for f in m.folios.values()) \
                        * (bs // 512)
        e.st_blocks = blocks
        e.st_blksize = max(bs, self.vol.effective_unit(inode))
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns
        e.st_birthtime_ns = inode.btime_ns
        return e

    def _now(self) -> int:
        return time.time_ns()

    def _new_inode(self, parent: Inode, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
                   rdev: int = 0, target: bytes | None = None) -> Inode:
        """Create an inode and link it under parent/name (the name must be free)."""
        self._check_writable()
        self._check_name(name)
        if parent.nlink == 0:
            raise pyfuse3.FUSEError(errno.ENOENT)  # the directory was removed
        if name in (parent.entries or {}):
            raise pyfuse3.FUSEError(errno.EEXIST)
        self._metadata_room(NEW_INODE_SNAP + len(name) +
                            (SYMLINK_SNAP + len(target) if target is not None else 0))
        now = self._now()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = self.md.new_inode(mode, ctx.uid, gid, now, rdev)
        if target is not None:
            self.md.set_symlink(inode, target)
        self._inherit_settings(parent, inode)
        self.md.add_entry(parent, name, inode, now)
        inode.lookups += 1
        return inode

    def _inherit_settings(self, parent: Inode, inode: Inode) -> None:
        """A directory's atomicfs attributes pass to what is created in it; a new file in a
        directory without a unit gets the mount's default unit."""
        if not (inode.is_reg or inode.is_dir):
            return
        for name in INHERITED_XATTRS:
            value = parent.xattrs.get(name)
            if value is not None:
                self.md.set_xattr(inode, name, value)
        if inode.atomic_unit == -1 and self.vol.opts.atomic_unit and inode.is_reg:
            self.md.set_xattr(inode, XATTR_ATOMIC_UNIT, str(self.vol.opts.atomic_unit).encode())

    async def _maybe_delete(self, inode: Inode) -> None:
        """Remove an inode nobody references any more (no name, no lookups, no opens)."""
        if inode.nlink == 0 and inode.lookups <= 0 and inode.opens <= 0 and \
                inode.ino in self.md.inodes and inode.ino != fmt.ROOT_INO:
            await self.filemap.drop_inode(inode)
            if inode.ino in self.md.inodes:
                self.md.delete_inode(inode)

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
            inode = self._child(parent, name)
        inode.lookups += 1
        return self._attr(inode)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            inode = self.md.inodes.get(ino)
            if inode is None:
                continue
            inode.lookups -= n
            if inode.lookups <= 0 and inode.nlink == 0:
                try:
                    await self._maybe_delete(inode)
                except (DeviceError, LogFailed, OSError) as exc:
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
        await self._prepare_change()
        node = self._get(inode)
        self._check_writable()
        now = self._now()
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
        self.md.log_inode(node)
        return self._attr(node)

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
        await self._prepare_change(growth=NEW_INODE_SNAP + len(name))
        parent = self._dir(parent_inode)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                        stat.S_IFBLK):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = 0
        inode = self._new_inode(parent, name, mode, ctx, rdev=rdev)
        return self._attr(inode)

    @fuse_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._prepare_change(growth=NEW_INODE_SNAP + len(name))
        parent = self._dir(parent_inode)
        inode = self._new_inode(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx)
        return self._attr(inode)

    @fuse_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._prepare_change(LOG_ROOM + len(target), NEW_INODE_SNAP + len(name)
                                   + SYMLINK_SNAP + len(target))
        parent = self._dir(parent_inode)
        if len(target) >= PATH_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        inode = self._new_inode(parent, name, stat.S_IFLNK | 0o777, ctx, target=target)
        return self._attr(inode)

    @fuse_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._prepare_change(growth=DIRENT_SNAP + len(new_name))
        node = self._get(inode)
        parent = self._dir(new_parent_inode)
        self._check_writable()
        self._check_name(new_name)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EPERM)
        if node.nlink == 0:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.nlink >= 65000:
            raise pyfuse3.FUSEError(errno.EMLINK)
        if new_name in (parent.entries or {}):
            raise pyfuse3.FUSEError(errno.EEXIST)
        self._metadata_room(DIRENT_SNAP + len(new_name))
        now = self._now()
        node.nlink += 1
        node.ctime_ns = now
        self.md.log_inode(node)
        self.md.add_entry(parent, new_name, node, now)
        node.lookups += 1
        return self._attr(node)

    async def _drop_link(self, inode: Inode, now: int) -> None:
        """One name of inode is gone."""
        inode.nlink = 0 if inode.is_dir else inode.nlink - 1
        inode.ctime_ns = now
        self.md.log_inode(inode)
        await self._maybe_delete(inode)

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        await self._prepare_change()
        parent = self._dir(parent_inode)
        self._check_writable()
        child = self._child(parent, name)
        if child.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        now = self._now()
        self.md.remove_entry(parent, name, now)
        await self._drop_link(child, now)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        await self._prepare_change()
        parent = self._dir(parent_inode)
        self._check_writable()
        if name == b".":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        child = self._child(parent, name)
        if not child.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if child.entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        now = self._now()
        self.md.remove_entry(parent, name, now)
        await self._drop_link(child, now)

    @fuse_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self._prepare_change(2 * LOG_ROOM, len(name_new) - len(name_old))
        old_dir = self._dir(parent_inode_old)
        new_dir = self._dir(parent_inode_new)
        self._check_writable()
        self._check_name(name_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or \
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT):
            raise pyfuse3.FUSEError(errno.EINVAL)
        src = self._child(old_dir, name_old)
        dst = self.md.lookup(new_dir, name_new)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            self._check_move(src, new_dir)
            self._check_move(dst, old_dir)
            now = self._now()
            self._exchange(old_dir, name_old, src, new_dir, name_new, dst, now)
            return
        if dst is not None:
            if flags & RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if dst.ino == src.ino:
                return  # both names are links to one inode: nothing to do (POSIX)
            if src.is_dir and not dst.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if dst.is_dir and dst.entries:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self._check_move(src, new_dir)
        # a longer name takes more room, replacing an entry frees some; a whiteout needs a
        # new inode: all checked before anything changes
        if dst is None or flags & RENAME_WHITEOUT:
            self._metadata_room((len(name_new) - len(name_old) if dst is None else 0) +
                                (NEW_INODE_SNAP + len(name_old) if flags & RENAME_WHITEOUT
                                 else 0))
        now = self._now()
        self.md.remove_entry(old_dir, name_old, now)
        if dst is not None:
            self.md.remove_entry(new_dir, name_new, now)
        self.md.add_entry(new_dir, name_new, src, now)
        src.ctime_ns = now
        self.md.log_inode(src)
        if flags & RENAME_WHITEOUT:
            whiteout = self._new_inode(old_dir, name_old, stat.S_IFCHR, ctx, rdev=0)
            whiteout.lookups -= 1  # the kernel gets no entry for it
        if dst is not None:
            await self._drop_link(dst, now)

    def _check_move(self, inode: Inode, new_parent: Inode) -> None:
        """A directory cannot move below itself."""
        if inode.is_dir and self.md.is_ancestor(inode, new_parent):
            raise pyfuse3.FUSEError(errno.EINVAL)

    def _exchange(self, d1: Inode, n1: bytes, i1: Inode, d2: Inode, n2: bytes, i2: Inode,
                  now: int) -> None:
        self.md.remove_entry(d1, n1, now)
        self.md.remove_entry(d2, n2, now)
        self.md.add_entry(d1, n1, i2, now)
        self.md.add_entry(d2, n2, i1, now)
        for inode in (i1, i2):
            inode.ctime_ns = now
            self.md.log_inode(inode)

    # -------------------------------------------------------------------- files

    def _open_handle(self, inode: Inode, flags: int) -> int:
        m = self.vol.mapping(inode) if inode.is_reg else None
        err_seq = 0
        if m is not None:
            # A descriptor sees errors recorded after it opened, and also the latest one
            # if nobody has seen it yet (Linux errseq_sample).
            err_seq = m.err_seq if m.err_seen else m.err_seq - 1
        sync = bool(flags & (os.O_DSYNC | os.O_SYNC))
        fh = self._alloc_fh()
        self.handles[fh] = Handle(inode, flags, err_seq, sync)
        inode.opens += 1
        return fh

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        node = self._get(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR) or flags & os.O_TRUNC:
            self._check_writable()
        if flags & os.O_TRUNC and node.is_reg and node.size:
            await self._prepare_change()
            await self._truncate(node, 0)
            node.mtime_ns = node.ctime_ns = self._now()
            self.md.log_inode(node)
        return pyfuse3.FileInfo(fh=self._open_handle(node, flags), keep_cache=True,
                                direct_io=False)

    @fuse_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        await self._prepare_change(growth=NEW_INODE_SNAP + len(name))
        parent = self._dir(parent_inode)
        existing = self.md.lookup(parent, name) if len(name) <= NAME_MAX else None
        if existing is not None:  # the kernel sends create only for missing names
            raise pyfuse3.FUSEError(errno.EEXIST)
        inode = self._new_inode(parent, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        fi = pyfuse3.FileInfo(fh=self._open_handle(inode, flags), keep_cache=True,
                              direct_io=False)
        return fi, self._attr(inode)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        h = self.handles[fh]
        inode = h.inode
        m = self.vol.mapping(inode)
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
        now = self._now()
        if inode.atime_ns <= max(inode.mtime_ns, inode.ctime_ns) or \
                now - inode.atime_ns > 86400 * 10**9:
            inode.atime_ns = now
            self.md.mark_dirty(inode)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        inode = h.inode
        self._check_writable()
        if off + len(buf) > self.max_file_size:  # as generic_write_checks: clip, or EFBIG
            if off >= self.max_file_size:
                raise pyfuse3.FUSEError(errno.EFBIG)
            buf = buf[:self.max_file_size - off]
        m = self.vol.mapping(inode)
        atomic, mode = self._write_semantics(h, off, len(buf))
        strict = self.vol.strict_of(inode)
        for attempt in (0, 1):
            try:
                n = await self.filemap.write(inode, m, off, buf,
                                             writethrough=mode is not None,
                                             durable=mode == "durable", strict=strict,
                                             atomic=atomic)
                break
            except NoSpace:
                if attempt or not await self.vol.flusher.make_room():
                    raise pyfuse3.FUSEError(errno.ENOSPC) from None
        self._update_meta_reserve()
        return n

    def _write_semantics(self, h: Handle, off: int, length: int) -> tuple[bool, str | None]:
        """Whether this write request is one atomic write, and its write-through mode
        ("durable", "rfc" or None), from the handle, the file and the announcements."""
        atomic = writethrough = durable = False
        for ann in self.announced.get(h.inode.ino, {}).values():
            if ann.off in (off, -1) and ann.length == length:
                atomic |= ann.atomic
                durable |= ann.durable
            if ann.off <= off and off + length <= ann.off + ann.length or \
                    ann.off == -1 and ann.length == length:  # a piece of a large write
                writethrough |= ann.writethrough
        if atomic:
            self.vol.counters.atomic_writes_announced += 1
        mode = self.vol.writethrough_mode(h.inode)
        if h.writethrough or durable:
            mode = "durable"
        elif mode is None and (h.direct or writethrough):
            mode = "rfc"
        return atomic, mode

    def _announce(self, node: Inode, cmd: str, arg: str) -> None:
        """The preload library's side channel, on a regular file (setxattr of
        user.atomicfs.control; FUSE's setxattr carries no file handle, so it is per file):

            write_begin=TOKEN:OFF:LEN:FLAGS   the write request at exactly (OFF, LEN)
                                              is atomic (a) and durable (d); requests
                                              within it are written through as the RFC
                                              defines it (w). OFF * (O_APPEND): any
                                              request of LEN bytes.
            write_end=TOKEN                   withdraw it (after the write returned)

        Race argument: an announcement is not consumed by the first matching request but
        stays until its announcer withdraws it, so another thread's write of the same range
        in between only gets the stronger semantics too (harmless), and the announcer's own
        write can never lose them. The kernel sends a page-cache write of whole pages up to
        max_write (1 MiB) as one request, so the announced write arrives whole; an atomic
        announcement the daemon cannot honour (not a power of two from the block size to
        1 MiB, offset not aligned to its length) is refused with EINVAL before the write."""
        per_file = self.announced.setdefault(node.ino, {})
        if cmd == "write_end":
            if per_file.pop(arg, None) is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if not per_file:
                del self.announced[node.ino]
            return
        token, off_s, len_s, flags = (arg.split(":") + ["", "", "", ""])[:4]
        if not (token and (off_s.isdigit() or off_s == "*") and len_s.isdigit()) or \
                set(flags) - set("awd"):
            raise pyfuse3.FUSEError(errno.EINVAL)
        off, length = int(off_s) if off_s != "*" else -1, int(len_s)
        if "a" in flags and (length & (length - 1) or not self.vol.bs <= length
                             <= fmt.MAX_ATOMIC_UNIT or off > 0 and off % length):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if len(per_file) >= MAX_ANNOUNCED and token not in per_file:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        per_file[token] = Announced(off, length, flags)

    def _limits(self, node: Inode) -> bytes:
        """statx atomic-write limits of a file, as the preload library reports them:
        unit_min, unit_max, segments_max, unit_max_opt. Any power of two from the block
        size to 1 MiB at an aligned offset is one write request and one write group (one
        log batch); the file's own unit (or the device's atomic limit) is what is fast."""
        unit = self.vol.effective_unit(node)
        # atomic_strict refuses writes that are not whole units: its minimum is the unit
        low = unit if unit and self.vol.strict_of(node) else self.vol.bs
        return f"{low} {fmt.MAX_ATOMIC_UNIT} 1 {unit}\n".encode()

    async def flush(self, fh: int) -> None:
        return None

    @fuse_errors
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        h.inode.opens -= 1
        if h.inode.opens <= 0:  # announcements of a writer that died before withdrawing
            self.announced.pop(h.inode.ino, None)
        if h.inode.nlink == 0:
            try:
                await self._maybe_delete(h.inode)
            except (DeviceError, LogFailed, OSError) as exc:
                log.error("cannot remove inode %d: %s", h.inode.ino, exc)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self.handles[fh]
        inode = h.inode
        if self.vol.journal.failed is not None:
            raise pyfuse3.FUSEError(errno.EIO)
        failed = False
        try:
            await self.wb.fsync(inode, datasync)
        except (DeviceError, LogFailed) as exc:
            log.warning("fsync of inode %d failed: %s", inode.ino, exc)
            failed = True
        m = self.cache.mappings.get(inode.ino)
        if m is not None and h.err_seq < m.err_seq:
            h.err_seq = m.err_seq
            m.err_seen = True
            failed = True
        if failed:
            raise pyfuse3.FUSEError(errno.EIO)

    # ------------------------------------------------------------------ directories

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._dir(inode)
        fh = self._alloc_fh()
        self.dirs[fh] = DirHandle(node)
        return fh

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self.dirs[fh]
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
        self.dirs.pop(fh, None)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.vol.journal.commit()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        a = self.vol.alloc
        s = pyfuse3.StatvfsData()
        s.f_bsize = self.vol.bs
        s.f_frsize = self.vol.bs
        s.f_blocks = a.data_blocks
        # Blocks held for the fallback checkpoint count as free: a write that needs them
        # gets them after the checkpoints make_room runs.
        s.f_bfree = max(0, a.free_blocks - a.reserved_blocks
                        - a.meta_reserve) + a.held_blocks
        s.f_bavail = a.available_blocks + a.held_blocks
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
        if name == XATTR_STAT:
            if node.ino == fmt.ROOT_INO and ctx.uid not in (0, self.owner):
                raise pyfuse3.FUSEError(errno.EACCES)
            return self._stat_json(node).encode()
        if name == XATTR_LIMITS and node.is_reg:
            return self._limits(node)
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
        if name == XATTR_CONTROL:
            await self._control(node, value, ctx)
            return
        if name == XATTR_STAT:
            raise pyfuse3.FUSEError(errno.EPERM)
        await self._prepare_change(LOG_ROOM + len(name) + len(value),
                                   XATTR_SNAP + len(name) + len(value))
        self._xattr_allowed(node, name, ctx, write=True)
        if len(value) > XATTR_SIZE_MAX:
            raise pyfuse3.FUSEError(errno.E2BIG)
        if name in INHERITED_XATTRS:
            value = self._validate_setting(node, name, value)
        old = node.xattrs.get(name)
        self._metadata_room(len(value) - len(old) if old is not None
                            else XATTR_SNAP + len(name) + len(value))
        if name in INHERITED_XATTRS:
            if name == XATTR_ATOMIC_UNIT and node.is_reg:
                await self._change_unit(node, int(value))
        self.md.set_xattr(node, name, value)
        node.ctime_ns = self._now()
        self.md.log_inode(node)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes,
                          ctx: pyfuse3.RequestContext) -> None:
        await self._prepare_change()
        node = self._get(inode)
        self._check_writable()
        self._xattr_allowed(node, name, ctx, write=True)
        if name not in node.xattrs:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if name == XATTR_ATOMIC_UNIT and node.is_reg and node.atomic_unit > 0:
            await self._change_unit(node, 0)
        self.md.del_xattr(node, name)
        node.ctime_ns = self._now()
        self.md.log_inode(node)

    def _validate_setting(self, node: Inode, name: bytes, value: bytes) -> bytes:
        """Check an atomicfs attribute; EINVAL (nothing changed) for invalid values."""
        text = value.strip(b"\0 \n")
        if name == XATTR_ATOMIC_UNIT:
            try:  # the size grammar of every option (16k, 16K, 16384); stored in bytes
                unit = parse_size(text.decode("ascii"))
                check_atomic_unit(unit, self.vol.bs)
            except ValueError:
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            if unit and self.vol.opts.atomic_path == "hardware" and \
                    not self.wb.hardware_ok(unit):
                raise pyfuse3.FUSEError(errno.EINVAL)
            return str(unit).encode()
        if text not in ((b"0", b"1", b"2") if name == XATTR_WRITETHROUGH else (b"0", b"1")):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return text

    async def _change_unit(self, node: Inode, unit: int) -> None:
        """A new folio size for a file: its dirty data goes out first, and its logged
        units are made home so that no log state refers to the old folio layout."""
        old = self.vol.effective_unit(node)
        if old == unit:
            return
        m = self.cache.mappings.get(node.ino)
        if m is not None:
            out = await self.wb.writeback_mapping(node, m, wait=True)
            if out.failed or m.dirty:
                raise pyfuse3.FUSEError(errno.EIO)
            if self.vol.journal.file_is_resident(node.ino):
                await self.vol.checkpointer.checkpoint()
            await self.cache.wait_unused(m)
            self.wb.settle_size(node, m)
            self.cache.drop_mapping(node.ino)

    async def _control(self, node: Inode, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        """Commands of the command line and of tests, on the root directory; the write
        announcements of the preload library on regular files (the kernel has checked
        that the caller may write the file)."""
        cmd, eq, arg = value.decode(errors="replace").strip(" \n\0").partition("=")
        if node.is_reg and cmd in ("write_begin", "write_end"):
            self._announce(node, cmd, arg)
            return
        if node.ino != fmt.ROOT_INO:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if ctx.uid not in (0, self.owner, node.uid):
            raise pyfuse3.FUSEError(errno.EPERM)
        if eq and cmd not in KNOB_CONTROLS:
            raise pyfuse3.FUSEError(errno.EINVAL)  # the other commands take no value
        if cmd in KNOB_CONTROLS:
            if ctx.uid != 0 or not self.vol.opts.testing:
                log.warning("control %s refused: a test knob, for root on mounts started "
                            "with a test knob or `testing`", cmd)
                raise pyfuse3.FUSEError(errno.EPERM)
            try:
                self._knob(cmd, arg)
            except ValueError as exc:
                log.warning("control %s refused: %s", cmd, exc)
                raise pyfuse3.FUSEError(errno.EINVAL) from None
        elif cmd == "sync":
            ok = await self.wb.sync_all()
            if self.vol.journal.failed is None:
                await self.vol.checkpointer.checkpoint()
            if not ok or self.vol.journal.failed is not None:
                raise pyfuse3.FUSEError(errno.EIO)
        elif cmd == "checkpoint":
            await self.vol.checkpointer.checkpoint()
        elif cmd == "commit":  # make everything logged so far durable
            await self.vol.journal.commit()
        elif cmd == "flush":  # background writeback of all dirty data, now
            await self.vol.flusher.flush_some(everything=True)
        elif cmd == "drop_caches":
            self.cache.evict(self.cache.limit)
        else:
            raise pyfuse3.FUSEError(errno.EINVAL)

    def _knob(self, cmd: str, arg: str) -> None:
        """A test knob, validated as the mount option of its name (ValueError)."""
        if cmd == "inject":
            self.vol.dev.set_inject(parse_inject(arg))
        elif cmd == "delay":
            self.vol.dev.set_delay(parse_delay(arg) / 1000.0)
        elif arg == "request":  # the next request fails unexpectedly
            self.fault_next_request = True
        elif arg == "daemon" and self.nursery is not None:  # the serving task dies
            self.nursery.start_soon(self._die)
        else:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {arg!r}")

    async def _die(self) -> None:
        raise InjectedFault("fault injection: the daemon's serving task is killed")

    def _stat_json(self, node: Inode) -> str:
        if node.ino == fmt.ROOT_INO:
            data = self.vol.mount_stats()
            data["file"] = self.vol.file_stats(node)
        else:
            wt_handles = any(h.writethrough for h in self.handles.values() if h.inode is node)
            data = self.vol.file_stats(node, wt_handles)
        return json.dumps(data, sort_keys=True)
