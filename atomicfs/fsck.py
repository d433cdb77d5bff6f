"""`atomicfs fsck`: check a filesystem at rest, and with `--repair` rebuild what it can.

The check is the mount's own recovery (recovery.py) without writing: the newest superblock
slot, the snapshot (or the previous checkpoint's when the newest is unreadable), the log
replayed in memory, then `check_metadata`. It also reports superblock slots that do not
hold a valid superblock and a kept previous snapshot that cannot be read (the fallback is
gone). Exit 0 clean, 1 damage found, 2 not an atomicfs (or unreadable).

Repair fixes the metadata in memory (each fix is reported), then writes it as a new
checkpoint through the same code a mount uses: that also rewrites the other superblock slot
and makes the current snapshot the new fallback. Then it checks again from the disk; the
report's `clean` is the state after the repair.
"""
from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

import trio

from atomicfs import owner
from atomicfs import format as fmt
from atomicfs.consistency import NAME_MAX, PATH_MAX, VALID_TYPES, check_metadata, reachable
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, DeviceError, NotAtomicfs, UserError
from atomicfs.metadata import (XATTR_ATOMIC_STRICT, XATTR_ATOMIC_UNIT, XATTR_WRITETHROUGH,
                               Inode, Metadata)
from atomicfs.mkfs import too_small
from atomicfs.options import MountOptions, check_atomic_unit
from atomicfs.recovery import Recovered, recover, when
from atomicfs.replay import write_data_home
from atomicfs.superblock import read_superblock

LOST_FOUND = b"lost+found"


@dataclass
class FsckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # what --repair changed
    inodes: int = 0
    files: int = 0
    directories: int = 0
    used_blocks: int = 0
    total_blocks: int = 0
    log_batches: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems


def fsck(target: str, repair: bool = False) -> FsckReport:
    """Check target (and repair it); NotAtomicfs/UserError when it cannot be checked at
    all. After a repair the report describes the repaired filesystem, with `fixes`."""
    small = too_small(target)
    if small:
        raise NotAtomicfs(small)
    try:
        dev = owner.open_device(target, readonly=not repair)
    except UserError as exc:
        raise NotAtomicfs(str(exc)) from None
    try:
        rep = _check(dev)
        if repair and rep.problems:
            fixes = _repair(dev)
            rep = _check(dev)
            rep.fixes = fixes
        return rep
    except DeviceError as exc:
        raise NotAtomicfs(f"{target}: read error: {exc}") from None
    finally:
        dev.close()


def repair(target: str) -> FsckReport:
    """`atomicfs fsck --repair` (and fsck.atomicfs -y/-p/-a): the report after repairing."""
    return fsck(target, repair=True)


def _check(dev: Device) -> FsckReport:
    rep = FsckReport()
    sb = read_superblock(dev)
    rep.notes += owner.fsck_notes(dev, sb)
    rep.total_blocks = sb.total_blocks - sb.data_start
    try:
        rec = recover(dev, sb)
    except CorruptFilesystem as exc:
        text = str(exc)
        rep.problems.append(f"log: {text}" if text.startswith("log batch")
                            else f"metadata snapshot: {text}")
        return rep
    rep.problems += rec.slot_problems
    if rec.kept_problem:
        rep.problems.append(rec.kept_problem)
    if rec.fallback:
        rep.problems.append(f"metadata snapshot: {rec.fallback}; the previous checkpoint's "
                            "snapshot is used instead")
        rep.problems += [f"lost: {line}" for line in rec.lost]
    if rec.sb.prev_snap_block and not rec.kept_problem:
        rep.notes.append(f"the previous checkpoint ({when(rec.sb.prev_ckpt_time_ns)}) is "
                         "kept as the fallback")
    result = rec.result
    rep.log_batches = result.batches
    if result.batches and not rec.fallback:
        rep.notes.append(f"log holds {result.batches} batches ({result.records} records) "
                         "that the next mount replays")
    chk = rec.check
    rep.problems += chk.problems
    rep.notes += [f"inode {ino} is unlinked but was open; the next mount removes it"
                  for ino in chk.unlinked_open]
    rep.inodes, rep.files, rep.directories = chk.inodes, chk.files, chk.directories
    rep.used_blocks = chk.used_blocks
    return rep


# --------------------------------------------------------------------------- repair

def _repair(dev: Device) -> list[str]:
    """Fix what the check found and write the result as a new checkpoint."""
    fixes: list[str] = []
    sb = read_superblock(dev)
    try:
        rec = recover(dev, sb, salvage=True)
    except CorruptFilesystem as exc:
        raise UserError(f"{dev.path}: cannot repair: {exc}") from None
    fixes += [f"rewrote {line.split(':')[0]}" for line in rec.slot_problems]
    if rec.lost and not rec.fallback:
        fixes += [f"dropped {line}" for line in rec.lost]
    elif rec.lost:
        fixes += [f"dropped {line}" for line in rec.lost if "snapshot that do not" in line]
    if rec.kept_problem:
        fixes.append("wrote a new checkpoint; the current snapshot is the new fallback")
    if rec.fallback:
        fixes.append("made the previous checkpoint's snapshot the current one")
    md = rec.md
    for _ in range(8):  # each round may uncover more (a dropped inode orphans its names)
        round_fixes = fix_metadata(rec.sb, md, rec.snap_extents, rec.kept_extents)
        fixes += round_fixes
        if not round_fixes:
            break
    rec.check = check_metadata(rec.sb, md, rec.snap_extents, rec.kept_extents)
    if rec.check.problems:
        raise UserError(f"{dev.path}: cannot repair: {rec.check.problems[0]}")
    dev.owner = owner.Owner.claim(dev, rec.sb, "fsck --repair")  # released by dev.close()
    write_data_home(dev, rec.sb, md, rec.result)
    trio.run(_write_checkpoint, dev, rec)
    return fixes


async def _write_checkpoint(dev: Device, rec: Recovered) -> None:
    """Write rec's metadata as a checkpoint, as a mount that changes nothing would."""
    from atomicfs.volume import Volume
    vol = Volume.from_recovered(dev, rec, MountOptions())
    vol.needs_checkpoint = False  # the two below
    async with trio.open_nursery() as nursery:
        await vol.start(nursery)
        # Twice: the first checkpoint's predecessor (the damaged snapshot) would otherwise
        # stay on as the fallback; after the second both kept snapshots are repaired ones.
        await vol.checkpointer.checkpoint()
        await vol.checkpointer.checkpoint()
        if not await vol.shutdown():
            raise UserError(f"{dev.path}: cannot write the repaired metadata")
        nursery.cancel_scope.cancel()


def fix_metadata(sb: fmt.Superblock, md: Metadata, snap_extents: list[tuple[int, int]],
                 kept_extents: list[tuple[int, int]]) -> list[str]:
    """One round of fixes in memory (md has no sink); returns what was done."""
    fixes: list[str] = []
    root = md.inodes.get(fmt.ROOT_INO)
    if root is None or not root.is_dir:
        if root is not None:
            _drop_inode(md, root, fixes, "the root is not a directory")
        now = time.time_ns()
        md.make_root(0, 0, 0o755, now)
        fixes.append("created a new, empty root directory")
    max_size = fmt.MAX_FILE_BLOCKS * md.block_size
    for inode in list(md.inodes.values()):
        _fix_inode(md, inode, max_size, fixes)
    _fix_space(sb, md, snap_extents, kept_extents, fixes)
    _fix_entries(md, fixes)
    _fix_orphans(md, fixes)
    _fix_counts(md, fixes)
    return fixes


def _drop_inode(md: Metadata, inode: Inode, fixes: list[str], why: str) -> None:
    if inode.entries:
        for name in list(inode.entries):
            md._del_dirent(inode.ino, name)  # its children go to lost+found
    md._del_inode(inode.ino)
    fixes.append(f"removed inode {inode.ino} ({why})")


def _fix_inode(md: Metadata, inode: Inode, max_size: int, fixes: list[str]) -> None:
    if stat.S_IFMT(inode.mode) not in VALID_TYPES or inode.ino > fmt.MAX_INO:
        _drop_inode(md, inode, fixes, "invalid type or number")
        return
    if inode.is_symlink and (not inode.target or len(inode.target) >= PATH_MAX):
        _drop_inode(md, inode, fixes, "symlink without a valid target")
        return
    if inode.size < 0 or inode.size > max_size:
        end = 0
        if inode.extents is not None:
            end = max((f + c for f, _, c in inode.extents), default=0) * md.block_size
        fixes.append(f"inode {inode.ino}: size {inode.size} past the maximum, set to {end}")
        inode.size = inode.disk_size = end
    value = inode.xattrs.get(XATTR_ATOMIC_UNIT)
    if value is not None:
        try:
            check_atomic_unit(int(value))
        except ValueError:
            md._del_xattr(inode.ino, XATTR_ATOMIC_UNIT)
            fixes.append(f"inode {inode.ino}: removed invalid atomic unit {value!r}")
    for name in (XATTR_WRITETHROUGH, XATTR_ATOMIC_STRICT):
        value = inode.xattrs.get(name)
        ok = (b"0", b"1", b"2") if name == XATTR_WRITETHROUGH else (b"0", b"1")
        if value is not None and value not in ok:
            md._del_xattr(inode.ino, name)
            fixes.append(f"inode {inode.ino}: removed invalid {name.decode()} {value!r}")


def _fix_space(sb: fmt.Superblock, md: Metadata, snap_extents: list[tuple[int, int]],
               kept_extents: list[tuple[int, int]], fixes: list[str]) -> None:
    """Unmap extents outside the data area or on blocks already claimed (the first
    claimant keeps them); a file whose blocks reach past its size grows to cover them."""
    claimed = check_metadata(sb, Metadata(md.block_size), snap_extents, kept_extents).alloc
    assert claimed is not None
    bs = md.block_size
    for inode in sorted(md.inodes.values(), key=lambda i: i.ino):
        if inode.extents is None:
            continue
        for f, d, c in list(inode.extents):
            bad = c <= 0 or d < sb.data_start or d + c > sb.total_blocks
            if not bad and claimed.is_used(d, c):
                bad = True
            if bad:
                inode.extents.unmap(f, c)
                fixes.append(f"inode {inode.ino}: unmapped file blocks {f}+{c} (device "
                             f"blocks {d}+{c} outside the data area or used twice)")
            else:
                claimed.mark_used(d, c)
        end = max((f + c for f, _, c in inode.extents), default=0)
        if end > (inode.size + bs - 1) // bs:
            fixes.append(f"inode {inode.ino}: size {inode.size} set to {end * bs} to cover "
                         "its mapped blocks")
            inode.size = inode.disk_size = end * bs


def _fix_entries(md: Metadata, fixes: list[str]) -> None:
    """Remove entries naming missing inodes, invalid names and extra names of
    directories; point each directory's parent at the directory holding it."""
    named_dirs: set[int] = set()
    for parent in sorted((i for i in md.inodes.values() if i.entries),
                         key=lambda i: i.ino):
        assert parent.entries is not None
        for name, ino in list(parent.entries.items()):
            child = md.inodes.get(ino)
            why = None
            if child is None:
                why = f"names missing inode {ino}"
            elif len(name) > NAME_MAX or b"/" in name or b"\0" in name or not name or \
                    name in (b".", b".."):
                why = "invalid name"
            elif ino == fmt.ROOT_INO:
                why = "names the root"
            elif child.is_dir and ino in named_dirs:
                why = f"second name of directory {ino}"
            if why:
                md._del_dirent(parent.ino, name)
                fixes.append(f"removed entry {name!r} from directory {parent.ino} ({why})")
                continue
            if child is not None and child.is_dir:
                named_dirs.add(ino)
                if child.parent != parent.ino:
                    child.parent = parent.ino
                    fixes.append(f"directory {ino}: parent set to {parent.ino}")


def _fix_orphans(md: Metadata, fixes: list[str]) -> None:
    """Link inodes that have links but cannot be reached into /lost+found (as ext4 does),
    named by inode number; a cycle of directories is cut where it is linked in."""
    lost = reachable(md)
    orphans = [i for i in sorted(md.inodes) if i not in lost and md.inodes[i].nlink]
    if not orphans:
        return
    root = md.root
    assert root.entries is not None
    lf_ino = root.entries.get(LOST_FOUND)
    lf = md.inodes.get(lf_ino) if lf_ino is not None else None
    if lf is None or not lf.is_dir:
        if lf_ino is not None:
            md._del_dirent(root.ino, LOST_FOUND)
        lf = md.new_inode(stat.S_IFDIR | 0o700, 0, 0, time.time_ns())
        md._add_dirent(root.ino, LOST_FOUND, lf.ino)
        fixes.append("created /lost+found")
    assert lf.entries is not None
    # Only the top of each unreachable subtree: linking it brings its children back.
    for ino in orphans:
        if ino in reachable(md):
            continue
        inode = md.inodes[ino]
        if inode.is_dir:  # leave the directory it sat in (a cycle) before linking it
            for parent in md.inodes.values():
                if parent.entries and ino in parent.entries.values() and parent is not lf:
                    for name in [n for n, i in parent.entries.items() if i == ino]:
                        md._del_dirent(parent.ino, name)
        name = f"#{ino}".encode()
        md._add_dirent(lf.ino, name, ino)
        fixes.append(f"linked unreachable inode {ino} as /lost+found/{name.decode()}")


def _fix_counts(md: Metadata, fixes: list[str]) -> None:
    refs: dict[int, int] = {}
    subdirs: dict[int, int] = {}
    for inode in md.inodes.values():
        for ino in (inode.entries or {}).values():
            refs[ino] = refs.get(ino, 0) + 1
            child = md.inodes.get(ino)
            if child is not None and child.is_dir:
                subdirs[inode.ino] = subdirs.get(inode.ino, 0) + 1
    for inode in md.inodes.values():
        n = refs.get(inode.ino, 0)
        if inode.is_dir:
            want = 2 + subdirs.get(inode.ino, 0) if (n or inode.ino == fmt.ROOT_INO) else 0
        else:
            want = n
        if n == 0 and inode.nlink == 0:
            continue  # unlinked but open at the crash: the next mount removes it
        if inode.nlink != want:
            fixes.append(f"inode {inode.ino}: link count {inode.nlink} set to {want}")
            inode.nlink = want
