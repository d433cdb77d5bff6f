"""The directory tree: names, links and the life of inodes, with POSIX's rules and ext4's
errno values (as Linux's namei.c checks a name operation before the filesystem makes it).

fs.py resolves inode numbers and calls `Volume.prepare_change` (which may wait) before
any of these; from the first lookup they depend on to the change itself nothing here
awaits, except the removal of an inode nobody references any more, which comes last.
"""
from __future__ import annotations

import errno
import stat
import time

import pyfuse3

from atomicfs import format as fmt
from atomicfs.control import SETTINGS, Control
from atomicfs.metadata import DIRENT_SNAP, INODE_SNAP, SYMLINK_SNAP, XATTR_SNAP, Inode
from atomicfs.volume import Volume

NAME_MAX = 255
MAX_LINKS = 65000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # leave a whiteout (a 0/0 character device) at the old name: overlayfs
# Snapshot bytes a new inode adds besides its name: inode, entry, inherited attributes.
NEW_INODE_SNAP = INODE_SNAP + DIRENT_SNAP + len(SETTINGS) * (XATTR_SNAP + 32)


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise pyfuse3.FUSEError(errno.EINVAL)


class Namespace:
    def __init__(self, vol: Volume, control: Control) -> None:
        self.vol = vol
        self.md = vol.md
        self.control = control  # what a new inode inherits

    def child(self, parent: Inode, name: bytes) -> Inode:
        """The inode parent/name names; ENAMETOOLONG before ENOENT, as ext4 answers."""
        if len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        found = self.md.lookup(parent, name)
        if found is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return found

    def new_inode(self, parent: Inode, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
                  rdev: int = 0, target: bytes | None = None) -> Inode:
        """Create an inode and link it under parent/name (the name must be free)."""
        self.vol.check_writable()
        check_name(name)
        if parent.nlink == 0:
            raise pyfuse3.FUSEError(errno.ENOENT)  # the directory was removed
        if name in (parent.entries or {}):
            raise pyfuse3.FUSEError(errno.EEXIST)
        self.vol.metadata_room(NEW_INODE_SNAP + len(name) +
                               (SYMLINK_SNAP + len(target) if target is not None else 0))
        now = time.time_ns()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:  # BSD group semantics of setgid directories
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = self.md.new_inode(mode, ctx.uid, gid, now, rdev)
        if target is not None:
            self.md.set_symlink(inode, target)
        self.control.inherit(parent, inode)
        self.md.add_entry(parent, name, inode, now)
        inode.lookups += 1
        return inode

    async def maybe_delete(self, inode: Inode) -> None:
        """Remove an inode nobody references any more (no name, no lookups, no opens)."""
        if inode.nlink == 0 and inode.lookups <= 0 and inode.opens <= 0 and \
                inode.ino in self.md.inodes and inode.ino != fmt.ROOT_INO:
            await self.vol.delete_inode(inode)

    def link(self, node: Inode, parent: Inode, new_name: bytes) -> None:
        self.vol.check_writable()
        check_name(new_name)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EPERM)
        if node.nlink == 0:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if node.nlink >= MAX_LINKS:
            raise pyfuse3.FUSEError(errno.EMLINK)
        if new_name in (parent.entries or {}):
            raise pyfuse3.FUSEError(errno.EEXIST)
        self.vol.metadata_room(DIRENT_SNAP + len(new_name))
        now = time.time_ns()
        node.nlink += 1
        node.ctime_ns = now
        self.md.log_inode(node)
        self.md.add_entry(parent, new_name, node, now)
        node.lookups += 1

    async def _drop_link(self, inode: Inode, now: int) -> None:
        """One name of inode is gone."""
        inode.nlink = 0 if inode.is_dir else inode.nlink - 1
        inode.ctime_ns = now
        self.md.log_inode(inode)
        await self.maybe_delete(inode)

    async def unlink(self, parent: Inode, name: bytes) -> None:
        self.vol.check_writable()
        child = self.child(parent, name)
        if child.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        now = time.time_ns()
        self.md.remove_entry(parent, name, now)
        await self._drop_link(child, now)

    async def rmdir(self, parent: Inode, name: bytes) -> None:
        self.vol.check_writable()
        if name == b".":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if name == b"..":
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        child = self.child(parent, name)
        if not child.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if child.entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        now = time.time_ns()
        self.md.remove_entry(parent, name, now)
        await self._drop_link(child, now)

    async def rename(self, old_dir: Inode, name_old: bytes, new_dir: Inode, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.vol.check_writable()
        check_name(name_new)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or \
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT):
            raise pyfuse3.FUSEError(errno.EINVAL)
        src = self.child(old_dir, name_old)
        dst = self.md.lookup(new_dir, name_new)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            self._check_move(src, new_dir)
            self._check_move(dst, old_dir)
            self._exchange(old_dir, name_old, src, new_dir, name_new, dst, time.time_ns())
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
            self.vol.metadata_room((len(name_new) - len(name_old) if dst is None else 0) +
                                   (NEW_INODE_SNAP + len(name_old) if flags & RENAME_WHITEOUT
                                    else 0))
        now = time.time_ns()
        self.md.remove_entry(old_dir, name_old, now)
        if dst is not None:
            self.md.remove_entry(new_dir, name_new, now)
        self.md.add_entry(new_dir, name_new, src, now)
        src.ctime_ns = now
        self.md.log_inode(src)
        if flags & RENAME_WHITEOUT:
            whiteout = self.new_inode(old_dir, name_old, stat.S_IFCHR, ctx, rdev=0)
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
