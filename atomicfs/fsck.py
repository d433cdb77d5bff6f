"""`atomicfs fsck`: a read-only check of a filesystem at rest.

Reads the newest superblock and the snapshot, replays the log in memory (without writing),
and checks what the result must satisfy: a connected tree, link counts, directory parents,
extents inside the data area and used once, nothing mapped beyond end of file, valid
atomicfs attributes. Exit 0 clean, 1 damage found, 2 not an atomicfs (or unreadable).
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field

from atomicfs import owner
from atomicfs import format as fmt
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, DeviceError, NotAtomicfs, UserError
from atomicfs.journal import read_snapshot, read_superblock, replay
from atomicfs.mkfs import too_small
from atomicfs.metadata import (XATTR_ATOMIC_STRICT, XATTR_ATOMIC_UNIT, XATTR_WRITETHROUGH,
                               Metadata)
from atomicfs.options import check_atomic_unit


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inodes: int = 0
    files: int = 0
    directories: int = 0
    used_blocks: int = 0
    total_blocks: int = 0
    log_batches: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


def fsck(target: str) -> FsckReport:
    """Check target; NotAtomicfs/UserError when it cannot be checked at all."""
    small = too_small(target)
    if small:
        raise NotAtomicfs(small)
    try:
        dev = Device.open(target, readonly=True)
    except UserError as exc:
        raise NotAtomicfs(str(exc)) from None
    try:
        return _check(dev)
    except DeviceError as exc:
        raise NotAtomicfs(f"{target}: read error: {exc}") from None
    finally:
        dev.close()


def _check(dev: Device) -> FsckReport:
    rep = FsckReport()
    sb = read_superblock(dev)
    rep.notes += owner.fsck_notes(dev, sb)
    rep.total_blocks = sb.total_blocks - sb.data_start
    md = Metadata(sb.block_size)
    try:
        snapshot, snap_extents = read_snapshot(dev, sb)
        md.load(snapshot)
    except CorruptFilesystem as exc:
        rep.problems.append(f"metadata snapshot: {exc}")
        return rep
    try:
        result = replay(dev, sb, md, write_home=False)
    except CorruptFilesystem as exc:
        rep.problems.append(f"log: {exc}")
        return rep
    rep.log_batches = result.batches
    if result.batches:
        rep.notes.append(f"log holds {result.batches} batches ({result.records} records) "
                         "that the next mount replays")
    _check_tree(md, rep)
    _check_space(sb, md, snap_extents, rep)
    return rep


def _check_tree(md: Metadata, rep: FsckReport) -> None:
    rep.inodes = len(md.inodes)
    root = md.inodes.get(fmt.ROOT_INO)
    if root is None or not root.is_dir:
        rep.problems.append("the root directory is missing")
        return
    refs: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for inode in md.inodes.values():
        if inode.is_dir:
            rep.directories += 1
        elif inode.is_reg:
            rep.files += 1
        if inode.is_symlink and inode.target is None:
            rep.problems.append(f"symlink {inode.ino} has no target")
        if stat.S_IFMT(inode.mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK,
                                           stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
                                           stat.S_IFBLK):
            rep.problems.append(f"inode {inode.ino} has an invalid type {inode.mode:o}")
        _check_settings(inode, rep)
        for name, ino in (inode.entries or {}).items():
            child = md.inodes.get(ino)
            if child is None:
                rep.problems.append(f"entry {name!r} in directory {inode.ino} names missing "
                                    f"inode {ino}")
                continue
            if len(name) > 255 or b"/" in name or not name:
                rep.problems.append(f"directory {inode.ino} has an invalid name {name!r}")
            refs[ino] = refs.get(ino, 0) + 1
            if child.is_dir:
                subdirs[inode.ino] = subdirs.get(inode.ino, 0) + 1
                if child.parent != inode.ino:
                    rep.problems.append(f"directory {ino} is in {inode.ino} but records "
                                        f"parent {child.parent}")
    for inode in md.inodes.values():
        n = refs.get(inode.ino, 0)
        if inode.ino == fmt.ROOT_INO:
            if n:
                rep.problems.append("the root directory is linked from a directory")
            continue
        if inode.is_dir:
            if n > 1:
                rep.problems.append(f"directory {inode.ino} has {n} names")
            if n == 0 and inode.nlink:
                rep.problems.append(f"directory {inode.ino} is not in any directory")
            want = 2 + subdirs.get(inode.ino, 0)
            if n and inode.nlink != want:
                rep.problems.append(f"directory {inode.ino} has link count {inode.nlink}, "
                                    f"expected {want}")
        elif n == 0 and inode.nlink == 0:
            rep.notes.append(f"inode {inode.ino} is unlinked but was open; the next mount "
                             "removes it")
        elif inode.nlink != n:
            rep.problems.append(f"inode {inode.ino} has link count {inode.nlink} but {n} "
                                "names")
    want_root = 2 + subdirs.get(fmt.ROOT_INO, 0)
    if root.nlink != want_root:
        rep.problems.append(f"the root directory has link count {root.nlink}, expected "
                            f"{want_root}")
    reachable = set()
    stack = [fmt.ROOT_INO]
    while stack:
        ino = stack.pop()
        if ino in reachable:
            continue
        reachable.add(ino)
        node = md.inodes.get(ino)
        if node is not None and node.entries:
            stack.extend(node.entries.values())
    for inode in md.inodes.values():
        if inode.ino not in reachable and inode.nlink:
            rep.problems.append(f"inode {inode.ino} cannot be reached from the root")


def _check_settings(inode, rep: FsckReport) -> None:  # type: ignore[no-untyped-def]
    value = inode.xattrs.get(XATTR_ATOMIC_UNIT)
    if value is not None:
        try:
            check_atomic_unit(int(value))
        except ValueError:
            rep.problems.append(f"inode {inode.ino} has an invalid atomic unit {value!r}")
    for name in (XATTR_WRITETHROUGH, XATTR_ATOMIC_STRICT):
        value = inode.xattrs.get(name)
        if value is not None and value not in (b"0", b"1"):
            rep.problems.append(f"inode {inode.ino} has an invalid {name.decode()} {value!r}")


def _check_space(sb: fmt.Superblock, md: Metadata, snap_extents: list[tuple[int, int]],
                 rep: FsckReport) -> None:
    owner: dict[int, str] = {}
    bs = sb.block_size

    def claim(dblock: int, count: int, who: str) -> None:
        if dblock < sb.data_start or dblock + count > sb.total_blocks:
            rep.problems.append(f"{who} maps blocks {dblock}+{count} outside the data area")
            return
        for b in range(dblock, dblock + count):
            prev = owner.get(b)
            if prev is not None:
                rep.problems.append(f"block {b} is used by both {prev} and {who}")
                return
            owner[b] = who

    for dblock, count in snap_extents:
        claim(dblock, count, "the metadata snapshot")
    for inode in md.inodes.values():
        if inode.extents is None:
            continue
        eof_block = (inode.size + bs - 1) // bs
        for f, d, c in inode.extents:
            claim(d, c, f"inode {inode.ino}")
            if f + c > eof_block:
                rep.problems.append(f"inode {inode.ino} maps block {f + c - 1} beyond its "
                                    f"size {inode.size}")
    rep.used_blocks = len(owner)
