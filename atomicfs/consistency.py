"""What loaded metadata must satisfy before a mount may use it, and what fsck reports.

A snapshot or log batch whose checksum holds can still say impossible things (a bit flipped
before the checksum was computed, a bug, a hand-edited image). Mount and fsck run the same
`check_metadata`, so that whatever fsck calls clean mounts and whatever mount refuses fsck
names: a connected tree, link counts, directory parents, extents inside the data area, used
once and not beyond end of file, sizes within the maximum, valid atomicfs attributes.

The space check builds the free-space allocator as a side effect (a bitmap of every block in
use), which is what the mount needs next.
"""
from __future__ import annotations

import bisect
import stat
from dataclasses import dataclass, field

from atomicfs import format as fmt
from atomicfs.alloc import Allocator
from atomicfs.metadata import (EXTENT_SNAP, XATTR_ATOMIC_STRICT, XATTR_ATOMIC_UNIT,
                               XATTR_WRITETHROUGH, Extent, Inode, Metadata)
from atomicfs.options import check_atomic_unit

VALID_TYPES = (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
               stat.S_IFCHR, stat.S_IFBLK)
NAME_MAX = 255
PATH_MAX = 4096
MAX_LINKS = 65000  # as ext4's EXT4_LINK_MAX


@dataclass
class CheckResult:
    problems: list[str] = field(default_factory=list)
    inodes: int = 0
    files: int = 0
    directories: int = 0
    used_blocks: int = 0
    unlinked_open: list[int] = field(default_factory=list)  # nlink 0: the mount removes them
    alloc: Allocator | None = None


def check_metadata(sb: fmt.Superblock, md: Metadata, snap_extents: list[Extent],
                   kept_extents: list[Extent] | None = None,
                   kept_refs: list[list[tuple[int, int, int, int]]] | None = None
                   ) -> CheckResult:
    """Check md as loaded from disk; snap_extents (and kept_extents, blocks of a previous
    checkpoint that stay reserved) are claimed before any file. kept_refs: for each kept
    checkpoint, the extents (ino, file block, device block, count) its files map."""
    res = CheckResult()
    _check_tree(md, res)
    _check_space(sb, md, snap_extents, kept_extents or [], res)
    for refs in kept_refs or []:
        _check_fallback(md, refs, res)
    return res


def _check_fallback(md: Metadata, refs: list[tuple[int, int, int, int]],
                    res: CheckResult) -> None:
    """A block a kept checkpoint maps is not handed out again while that checkpoint is
    kept (alloc.py holds it), so a file that maps it now is the same file at the same
    offset; anything else means a fallback would show another file's data. (The extents
    of one snapshot do not overlap, so the one starting at or before d is the only
    candidate before those starting inside the range.)"""
    refs = sorted(refs, key=lambda r: r[2])
    starts = [r[2] for r in refs]
    for inode in md.inodes.values():
        if inode.extents is None:
            continue
        for f, d, c in inode.extents:
            i = max(0, bisect.bisect_right(starts, d) - 1)
            while i < len(refs) and refs[i][2] < d + c:
                r_ino, r_f, r_d, r_c = refs[i]
                i += 1
                lo, hi = max(d, r_d), min(d + c, r_d + r_c)
                if lo >= hi:
                    continue
                if r_ino != inode.ino or r_f - r_d != f - d:
                    res.problems.append(
                        f"blocks {lo}+{hi - lo} of inode {inode.ino} belonged to inode "
                        f"{r_ino} at a kept checkpoint: reused while it is the fallback")
                    return


def _check_inode(inode: Inode, max_size: int, res: CheckResult) -> None:
    what = f"inode {inode.ino}"
    if stat.S_IFMT(inode.mode) not in VALID_TYPES:
        res.problems.append(f"{what} has an invalid type {inode.mode:o}")
    if not fmt.ROOT_INO <= inode.ino <= fmt.MAX_INO:
        res.problems.append(f"{what} has an invalid inode number")
    if inode.size < 0 or inode.size > max_size:
        res.problems.append(f"{what} has size {inode.size}, past the maximum {max_size}")
    if inode.nlink > MAX_LINKS:
        res.problems.append(f"{what} has link count {inode.nlink}, past the maximum")
    if inode.is_symlink:
        if inode.target is None:
            res.problems.append(f"symlink {inode.ino} has no target")
        elif not inode.target or len(inode.target) >= PATH_MAX:
            res.problems.append(f"symlink {inode.ino} has an invalid target length")
    value = inode.xattrs.get(XATTR_ATOMIC_UNIT)
    if value is not None:
        try:
            check_atomic_unit(int(value))
        except ValueError:
            res.problems.append(f"{what} has an invalid atomic unit {value!r}")
    for name in (XATTR_WRITETHROUGH, XATTR_ATOMIC_STRICT):
        value = inode.xattrs.get(name)
        if value is not None and value not in (b"0", b"1"):
            res.problems.append(f"{what} has an invalid {name.decode()} {value!r}")


def _check_tree(md: Metadata, res: CheckResult) -> None:
    res.inodes = len(md.inodes)
    max_size = fmt.MAX_FILE_BLOCKS * md.block_size
    root = md.inodes.get(fmt.ROOT_INO)
    if root is None or not root.is_dir:
        res.problems.append("the root directory is missing")
        return
    refs: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for inode in md.inodes.values():
        if inode.is_dir:
            res.directories += 1
        elif inode.is_reg:
            res.files += 1
        _check_inode(inode, max_size, res)
        for name, ino in (inode.entries or {}).items():
            child = md.inodes.get(ino)
            if child is None:
                res.problems.append(f"entry {name!r} in directory {inode.ino} names missing "
                                    f"inode {ino}")
                continue
            if len(name) > NAME_MAX or b"/" in name or b"\0" in name or not name \
                    or name in (b".", b".."):
                res.problems.append(f"directory {inode.ino} has an invalid name {name!r}")
            refs[ino] = refs.get(ino, 0) + 1
            if child.is_dir:
                subdirs[inode.ino] = subdirs.get(inode.ino, 0) + 1
                if child.parent != inode.ino:
                    res.problems.append(f"directory {ino} is in {inode.ino} but records "
                                        f"parent {child.parent}")
    for inode in md.inodes.values():
        n = refs.get(inode.ino, 0)
        if inode.ino == fmt.ROOT_INO:
            if n:
                res.problems.append("the root directory is linked from a directory")
            continue
        if inode.is_dir:
            if n > 1:
                res.problems.append(f"directory {inode.ino} has {n} names")
            if n == 0 and inode.nlink:
                res.problems.append(f"directory {inode.ino} is not in any directory")
            want = 2 + subdirs.get(inode.ino, 0)
            if n and inode.nlink != want:
                res.problems.append(f"directory {inode.ino} has link count {inode.nlink}, "
                                    f"expected {want}")
        elif n == 0 and inode.nlink == 0:
            res.unlinked_open.append(inode.ino)
        elif inode.nlink != n:
            res.problems.append(f"inode {inode.ino} has link count {inode.nlink} but {n} "
                                "names")
    want_root = 2 + subdirs.get(fmt.ROOT_INO, 0)
    if root.nlink != want_root:
        res.problems.append(f"the root directory has link count {root.nlink}, expected "
                            f"{want_root}")
    for ino in sorted(set(md.inodes) - reachable(md)):
        if md.inodes[ino].nlink:
            res.problems.append(f"inode {ino} cannot be reached from the root")


def reachable(md: Metadata) -> set[int]:
    """Inode numbers reachable from the root through directory entries."""
    seen: set[int] = set()
    stack = [fmt.ROOT_INO]
    while stack:
        ino = stack.pop()
        if ino in seen:
            continue
        seen.add(ino)
        node = md.inodes.get(ino)
        if node is not None and node.entries:
            stack.extend(node.entries.values())
    return seen


def _check_space(sb: fmt.Superblock, md: Metadata, snap_extents: list[Extent],
                 kept_extents: list[Extent], res: CheckResult) -> None:
    """Every extent inside the data area and claimed once; nothing mapped past EOF."""
    alloc = Allocator(sb.total_blocks, sb.data_start)
    # a reservation also holds room for the extent records that will map its blocks
    alloc.extent_record_bytes = EXTENT_SNAP
    alloc.block_size = sb.block_size
    bs = sb.block_size
    owners: list[tuple[int, int, str]] = []  # only searched when a block is claimed twice

    def claim(dblock: int, count: int, who: str) -> None:
        if count <= 0 or dblock < sb.data_start or dblock + count > sb.total_blocks:
            res.problems.append(f"{who} maps blocks {dblock}+{count} outside the data area")
            return
        if alloc.is_used(dblock, count):
            other = next((o for d, c, o in owners if d < dblock + count and dblock < d + c),
                         "another extent of the same owner")
            res.problems.append(f"blocks {dblock}+{count} of {who} are also used by {other}")
            return
        alloc.mark_used(dblock, count)
        owners.append((dblock, count, who))

    for dblock, count in snap_extents:
        claim(dblock, count, "the metadata snapshot")
    for dblock, count in kept_extents:
        claim(dblock, count, "the previous metadata snapshot")
    for inode in md.inodes.values():
        if inode.extents is None:
            continue
        eof_block = (inode.size + bs - 1) // bs
        last_end = 0
        for f, d, c in inode.extents:
            claim(d, c, f"inode {inode.ino}")
            last_end = max(last_end, f + c)
        if last_end > eof_block:
            res.problems.append(f"inode {inode.ino} maps block {last_end - 1} beyond its "
                                f"size {inode.size}")
    res.used_blocks = alloc.total_blocks - alloc.free_blocks - sb.data_start
    res.alloc = alloc
