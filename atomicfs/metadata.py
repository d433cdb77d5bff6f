"""Inodes, directories, extended attributes and extent maps, held in memory.

Every structural change is made by one private helper that both normal operation and log
replay call, and normal operation then emits the same change as a log record to its sink.
So the state after replaying the log is, by construction, the state the running filesystem
had. Attribute changes driven by data writes (size, mtime) are frequent; they only mark the
inode dirty and are logged as one INODE record when the next log batch is sealed
(`flush_dirty`).

The whole metadata is also serialised as a snapshot (the same record stream) at each
checkpoint.
"""
from __future__ import annotations

import bisect
import stat
from typing import Iterator, Protocol

from atomicfs import format as fmt
from atomicfs.errors import CorruptFilesystem


XATTR_ATOMIC_UNIT = b"user.atomicfs.atomic_unit"
XATTR_WRITETHROUGH = b"user.atomicfs.writethrough"
XATTR_ATOMIC_STRICT = b"user.atomicfs.atomic_strict"
INHERITED_XATTRS = (XATTR_ATOMIC_UNIT, XATTR_WRITETHROUGH, XATTR_ATOMIC_STRICT)

Extent = tuple[int, int]  # (device block, count)

# Bytes each piece of state takes in a snapshot (`Metadata.serialize`), so that the size of
# the next snapshot is known at any time without building it.
INODE_SNAP = len(fmt.rec_inode((0,) * len(fmt.INODE_FMT.format[1:])))
DIRENT_SNAP = len(fmt.rec_dirent_add(0, b"", 0))  # plus the name
EXTENT_SNAP = len(fmt.rec_extent_set(0, 0, 0, 0))
XATTR_SNAP = len(fmt.rec_xattr_set(0, b"", b""))  # plus name and value
SYMLINK_SNAP = len(fmt.rec_symlink(0, b""))  # plus the target
HEADER_SNAP = len(fmt.rec_next_ino(0))


class MetadataSink(Protocol):
    """Where metadata changes go: the journal, and the allocator for released blocks."""

    def record(self, rec: bytes) -> None: ...

    def release(self, extents: list[Extent]) -> None: ...


class ExtentMap:
    """Sorted, non-overlapping map of file blocks to device blocks."""

    __slots__ = ("_f", "_d", "_c")

    def __init__(self) -> None:
        self._f: list[int] = []
        self._d: list[int] = []
        self._c: list[int] = []

    def __len__(self) -> int:
        return len(self._f)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(zip(self._f, self._d, self._c))

    @property
    def mapped_blocks(self) -> int:
        return sum(self._c)

    def lookup(self, fblock: int) -> tuple[int | None, int]:
        """(device block or None for a hole, number of blocks this answer holds for)."""
        i = bisect.bisect_right(self._f, fblock) - 1
        if i >= 0 and fblock < self._f[i] + self._c[i]:
            off = fblock - self._f[i]
            return self._d[i] + off, self._c[i] - off
        nxt = self._f[i + 1] if i + 1 < len(self._f) else None
        return None, (nxt - fblock) if nxt is not None else (1 << 62)

    def runs(self, fblock: int, count: int) -> Iterator[tuple[int, int | None, int]]:
        """(file block, device block or None, length) covering [fblock, fblock+count)."""
        end = fblock + count
        while fblock < end:
            dblock, n = self.lookup(fblock)
            n = min(n, end - fblock)
            yield fblock, dblock, n
            fblock += n

    def map(self, fblock: int, dblock: int, count: int) -> list[Extent]:
        """Map [fblock, fblock+count) to dblock..; returns device extents it replaced."""
        freed = self.unmap(fblock, count)
        i = bisect.bisect_left(self._f, fblock)
        # merge with the previous extent when both file and device addresses continue
        if i > 0 and self._f[i - 1] + self._c[i - 1] == fblock and \
                self._d[i - 1] + self._c[i - 1] == dblock:
            self._c[i - 1] += count
            i -= 1
        else:
            self._f.insert(i, fblock)
            self._d.insert(i, dblock)
            self._c.insert(i, count)
        if i + 1 < len(self._f) and self._f[i] + self._c[i] == self._f[i + 1] and \
                self._d[i] + self._c[i] == self._d[i + 1]:
            self._c[i] += self._c[i + 1]
            del self._f[i + 1], self._d[i + 1], self._c[i + 1]
        return freed

    def unmap(self, fblock: int, count: int | None = None) -> list[Extent]:
        """Remove mappings in [fblock, fblock+count) (to the end if count is None)."""
        end = fblock + count if count is not None else 1 << 62
        freed: list[Extent] = []
        i = max(0, bisect.bisect_right(self._f, fblock) - 1)
        while i < len(self._f) and self._f[i] < end:
            f, d, c = self._f[i], self._d[i], self._c[i]
            if f + c <= fblock:
                i += 1
                continue
            lo, hi = max(f, fblock), min(f + c, end)
            freed.append((d + (lo - f), hi - lo))
            pieces = []
            if f < lo:
                pieces.append((f, d, lo - f))
            if hi < f + c:
                pieces.append((hi, d + (hi - f), f + c - hi))
            del self._f[i], self._d[i], self._c[i]
            for pf, pd, pc in pieces:
                self._f.insert(i, pf)
                self._d.insert(i, pd)
                self._c.insert(i, pc)
                i += 1
        return freed

    def device_extents(self) -> list[Extent]:
        return list(zip(self._d, self._c))


class Inode:
    """One file, directory, symlink or special file."""

    __slots__ = ("ino", "mode", "uid", "gid", "nlink", "size", "disk_size", "atime_ns",
                 "mtime_ns", "ctime_ns", "btime_ns", "rdev", "generation", "flags", "entries",
                 "parent",
                 "target", "extents", "xattrs", "atomic_unit", "writethrough",
                 "atomic_strict", "lookups", "opens")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = self.gid = 0
        self.nlink = 0
        self.size = 0
        # The size the log and snapshots record: it grows only as far as the data has
        # reached the device (or the log), so a crash never leaves a file whose tail reads
        # as zeros where unwritten data was (ext4's i_disksize, XFS's di_size).
        self.disk_size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = self.btime_ns = 0
        self.rdev = 0
        self.generation = 0
        self.flags = 0
        self.entries: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.parent = 0
        self.target: bytes | None = None
        self.extents: ExtentMap | None = ExtentMap() if stat.S_ISREG(mode) else None
        self.xattrs: dict[bytes, bytes] = {}
        # Parsed copies of the atomicfs xattrs (-1: not set on this inode).
        self.atomic_unit = -1
        self.writethrough = -1
        self.atomic_strict = -1
        self.lookups = 0  # kernel references (lookup counts), not persisted
        self.opens = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def record_fields(self) -> tuple[int, ...]:
        return (self.ino, self.mode, self.uid, self.gid, self.nlink, self.disk_size,
                self.atime_ns, self.mtime_ns, self.ctime_ns, self.btime_ns, self.rdev,
                self.generation, self.flags)

    def set_fields(self, f: tuple[int, ...]) -> None:
        (_, mode, self.uid, self.gid, self.nlink, self.size, self.atime_ns, self.mtime_ns,
         self.ctime_ns, self.btime_ns, self.rdev, self.generation, self.flags) = f
        self.disk_size = self.size
        if stat.S_IFMT(mode) != stat.S_IFMT(self.mode):
            raise CorruptFilesystem(f"inode {self.ino} changes its type")
        self.mode = mode


def parse_flag_xattr(value: bytes) -> int:
    return 1 if value.strip() == b"1" else 0


class Metadata:
    """All inodes of one filesystem, with their changes emitted to a sink."""

    def __init__(self, block_size: int, sink: MetadataSink | None = None) -> None:
        self.block_size = block_size
        self.sink = sink
        self.inodes: dict[int, Inode] = {}
        self.next_ino = fmt.ROOT_INO + 1
        self._dirty: set[int] = set()
        self._size_dirty: set[int] = set()  # subset whose size changed (fdatasync needs it)
        self.snapshot_bytes = HEADER_SNAP  # what serialize() would return, kept current
        self.records_emitted = 0
        self.bytes_emitted = 0

    # --------------------------------------------------------------------- emission

    def _emit(self, rec: bytes) -> None:
        if self.sink is not None:
            self.sink.record(rec)
            self.records_emitted += 1
            self.bytes_emitted += len(rec)

    def _release(self, extents: list[Extent]) -> None:
        if extents and self.sink is not None:
            self.sink.release(extents)

    def data_written(self, inode: Inode, end: int) -> None:
        """Data up to file offset end reached the device or the log: the recorded size may
        follow the file's size that far."""
        size = min(inode.size, end)
        if size > inode.disk_size:
            inode.disk_size = size
            self.mark_dirty(inode, size_changed=True)

    def set_size(self, inode: Inode, size: int) -> None:
        """A truncate: the file's size is size; the recorded size shrinks with it, and grows
        only if all data up to the old size is recorded (the rest is a hole)."""
        if size < inode.size:
            inode.disk_size = min(inode.disk_size, size)
        elif inode.disk_size >= inode.size:
            inode.disk_size = size
        inode.size = size

    def mark_dirty(self, inode: Inode, size_changed: bool = False) -> None:
        """The inode's attributes changed; log them with the next batch."""
        self._dirty.add(inode.ino)
        if size_changed:
            self._size_dirty.add(inode.ino)

    def is_dirty(self, ino: int) -> bool:
        return ino in self._dirty

    def size_dirty(self, ino: int) -> bool:
        """Is a size change of this inode not logged yet (what fdatasync must commit)?"""
        return ino in self._size_dirty

    @property
    def any_dirty(self) -> bool:
        return bool(self._dirty)

    def flush_dirty(self) -> int:
        """Emit an INODE record for every dirty inode; returns how many."""
        n = 0
        for ino in sorted(self._dirty):
            inode = self.inodes.get(ino)
            if inode is not None:
                self._emit(fmt.rec_inode(inode.record_fields()))
                n += 1
        self._dirty.clear()
        self._size_dirty.clear()
        return n

    def log_inode(self, inode: Inode) -> None:
        """Emit the inode's attributes now (structural changes log them at once)."""
        self._dirty.discard(inode.ino)
        self._size_dirty.discard(inode.ino)
        self._emit(fmt.rec_inode(inode.record_fields()))

    # ------------------------------------------------------------ lookups and queries

    def get(self, ino: int) -> Inode:
        return self.inodes[ino]

    def lookup(self, parent: Inode, name: bytes) -> Inode | None:
        assert parent.entries is not None
        ino = parent.entries.get(name)
        return self.inodes[ino] if ino is not None else None

    @property
    def root(self) -> Inode:
        return self.inodes[fmt.ROOT_INO]

    def is_ancestor(self, maybe_ancestor: Inode, inode: Inode) -> bool:
        """True if maybe_ancestor is inode or one of its parent directories."""
        cur = inode
        seen = 0
        while True:
            if cur.ino == maybe_ancestor.ino:
                return True
            if cur.ino == fmt.ROOT_INO or seen > len(self.inodes):
                return False
            cur = self.inodes[cur.parent]
            seen += 1

    # --------------------------------------------------------------- state helpers
    # Each helper changes memory only; both mutations and replay go through them.

    def _set_inode(self, fields: tuple[int, ...]) -> Inode:
        ino, mode = fields[0], fields[1]
        inode = self.inodes.get(ino)
        if inode is None:
            inode = Inode(ino, mode)
            if ino == fmt.ROOT_INO:
                inode.parent = ino  # as make_root: no DIRENT record ever names the root
            self._insert_inode(inode)
            if ino >= self.next_ino:
                self.next_ino = ino + 1
        inode.set_fields(fields)
        return inode

    def _insert_inode(self, inode: Inode) -> None:
        self.inodes[inode.ino] = inode
        self.snapshot_bytes += INODE_SNAP

    def _del_inode(self, ino: int) -> list[Extent]:
        inode = self.inodes.pop(ino, None)
        if inode is None:
            raise CorruptFilesystem(f"deleting missing inode {ino}")
        self._dirty.discard(ino)
        self._size_dirty.discard(ino)
        if inode.entries:
            raise CorruptFilesystem(f"deleting non-empty directory {ino}")
        self.snapshot_bytes -= INODE_SNAP + sum(XATTR_SNAP + len(n) + len(v)
                                                for n, v in inode.xattrs.items())
        if inode.target is not None:
            self.snapshot_bytes -= SYMLINK_SNAP + len(inode.target)
        if inode.extents is None:
            return []
        self.snapshot_bytes -= EXTENT_SNAP * len(inode.extents)
        return inode.extents.device_extents()

    def _add_dirent(self, parent_ino: int, name: bytes, ino: int) -> None:
        parent = self.inodes.get(parent_ino)
        child = self.inodes.get(ino)
        if parent is None or parent.entries is None:
            raise CorruptFilesystem(f"directory entry in non-directory {parent_ino}")
        if child is None:
            raise CorruptFilesystem(f"directory entry {name!r} names missing inode {ino}")
        if name not in parent.entries:
            self.snapshot_bytes += DIRENT_SNAP + len(name)
        parent.entries[name] = ino
        if child.is_dir:
            child.parent = parent_ino

    def _del_dirent(self, parent_ino: int, name: bytes) -> None:
        parent = self.inodes.get(parent_ino)
        if parent is None or parent.entries is None or name not in parent.entries:
            raise CorruptFilesystem(f"removing missing entry {name!r} of {parent_ino}")
        del parent.entries[name]
        self.snapshot_bytes -= DIRENT_SNAP + len(name)

    def _set_extent(self, ino: int, fblock: int, dblock: int, count: int) -> list[Extent]:
        inode = self.inodes.get(ino)
        if inode is None or inode.extents is None:
            raise CorruptFilesystem(f"extent for missing or non-regular inode {ino}")
        if count == 0 or fblock + count > fmt.MAX_FILE_BLOCKS:
            raise CorruptFilesystem(f"inode {ino}: invalid extent {fblock}+{count}")
        before = len(inode.extents)
        freed = inode.extents.map(fblock, dblock, count)
        self.snapshot_bytes += EXTENT_SNAP * (len(inode.extents) - before)
        return freed

    def _trunc_extents(self, ino: int, fblock: int) -> list[Extent]:
        inode = self.inodes.get(ino)
        if inode is None or inode.extents is None:
            raise CorruptFilesystem(f"truncating extents of missing inode {ino}")
        before = len(inode.extents)
        freed = inode.extents.unmap(fblock)
        self.snapshot_bytes += EXTENT_SNAP * (len(inode.extents) - before)
        return freed

    def _set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            raise CorruptFilesystem(f"xattr for missing inode {ino}")
        old = inode.xattrs.get(name)
        self.snapshot_bytes += len(value) - (len(old) if old is not None
                                             else -(XATTR_SNAP + len(name)))
        inode.xattrs[name] = value
        self._parse_special(inode, name, value)

    def _del_xattr(self, ino: int, name: bytes) -> None:
        inode = self.inodes.get(ino)
        if inode is None or name not in inode.xattrs:
            raise CorruptFilesystem(f"removing missing xattr {name!r} of {ino}")
        self.snapshot_bytes -= XATTR_SNAP + len(name) + len(inode.xattrs[name])
        del inode.xattrs[name]
        self._parse_special(inode, name, None)

    @staticmethod
    def _parse_special(inode: Inode, name: bytes, value: bytes | None) -> None:
        if name == XATTR_ATOMIC_UNIT:
            try:
                inode.atomic_unit = int(value) if value is not None else -1
            except ValueError:  # only damage can store this; check_metadata reports it
                inode.atomic_unit = 0
        elif name == XATTR_WRITETHROUGH:
            # 1: durable write-through; 2: the RFC's (no cache flush); 0: off
            inode.writethrough = (2 if value.strip() == b"2" else parse_flag_xattr(value)) \
                if value is not None else -1
        elif name == XATTR_ATOMIC_STRICT:
            inode.atomic_strict = parse_flag_xattr(value) if value is not None else -1

    def _set_symlink(self, ino: int, target: bytes) -> None:
        inode = self.inodes.get(ino)
        if inode is None or not inode.is_symlink:
            raise CorruptFilesystem(f"symlink target for non-symlink {ino}")
        if inode.target is not None:
            self.snapshot_bytes -= SYMLINK_SNAP + len(inode.target)
        self.snapshot_bytes += SYMLINK_SNAP + len(target)
        inode.target = target

    # ---------------------------------------------------------------------- replay

    def apply(self, r: fmt.Record) -> list[Extent]:
        """Apply one decoded record; returns device extents it released."""
        t, a = r.rtype, r.args
        if t == fmt.REC_INODE:
            self._set_inode(a)
        elif t == fmt.REC_INODE_DEL:
            return self._del_inode(a[0])
        elif t == fmt.REC_DIRENT_ADD:
            self._add_dirent(a[0], a[1], a[2])
        elif t == fmt.REC_DIRENT_DEL:
            self._del_dirent(a[0], a[1])
        elif t == fmt.REC_EXTENT_SET:
            return self._set_extent(*a)
        elif t == fmt.REC_EXTENT_TRUNC:
            return self._trunc_extents(*a)
        elif t == fmt.REC_XATTR_SET:
            self._set_xattr(*a)
        elif t == fmt.REC_XATTR_DEL:
            self._del_xattr(*a)
        elif t == fmt.REC_SYMLINK:
            self._set_symlink(*a)
        elif t == fmt.REC_NEXT_INO:
            self.next_ino = max(self.next_ino, a[0])
        elif t == fmt.REC_DATA:
            pass  # data records are the journal's business
        else:  # pragma: no cover - decode_records rejects unknown types
            raise CorruptFilesystem(f"unknown record type {t}")
        return []

    # ------------------------------------------------------------------- snapshots

    def serialize(self) -> bytes:
        """The whole metadata as a record stream (inodes first, then what refers to them)."""
        parts: list[bytes] = [fmt.rec_next_ino(self.next_ino)]
        inodes = sorted(self.inodes.values(), key=lambda i: i.ino)
        for inode in inodes:
            parts.append(fmt.rec_inode(inode.record_fields()))
        for inode in inodes:
            if inode.target is not None:
                parts.append(fmt.rec_symlink(inode.ino, inode.target))
            for name, value in inode.xattrs.items():
                parts.append(fmt.rec_xattr_set(inode.ino, name, value))
            if inode.extents is not None:
                for f, d, c in inode.extents:
                    parts.append(fmt.rec_extent_set(inode.ino, f, d, c))
            if inode.entries:
                for name, child in inode.entries.items():
                    parts.append(fmt.rec_dirent_add(inode.ino, name, child))
        return b"".join(parts)

    def load(self, stream: bytes) -> None:
        """Apply a snapshot record stream to empty metadata."""
        for r in fmt.decode_records(stream):
            self.apply(r)

    # ------------------------------------------------------------------ mutations

    def new_inode(self, mode: int, uid: int, gid: int, now: int, rdev: int = 0) -> Inode:
        ino = self.next_ino
        self.next_ino += 1
        inode = Inode(ino, mode)
        inode.uid, inode.gid, inode.rdev = uid, gid, rdev
        inode.atime_ns = inode.mtime_ns = inode.ctime_ns = inode.btime_ns = now
        inode.nlink = 2 if inode.is_dir else 1
        self._insert_inode(inode)
        self.log_inode(inode)
        return inode

    def make_root(self, uid: int, gid: int, mode: int, now: int) -> Inode:
        root = Inode(fmt.ROOT_INO, stat.S_IFDIR | mode)
        root.uid, root.gid, root.nlink = uid, gid, 2
        root.atime_ns = root.mtime_ns = root.ctime_ns = root.btime_ns = now
        root.parent = fmt.ROOT_INO
        self._insert_inode(root)
        self.log_inode(root)
        return root

    def add_entry(self, parent: Inode, name: bytes, child: Inode, now: int) -> None:
        """Link child under parent/name (name must be free); updates counts and times."""
        self._add_dirent(parent.ino, name, child.ino)
        self._emit(fmt.rec_dirent_add(parent.ino, name, child.ino))
        if child.is_dir:
            parent.nlink += 1
        parent.mtime_ns = parent.ctime_ns = now
        self.log_inode(parent)

    def remove_entry(self, parent: Inode, name: bytes, now: int) -> Inode:
        """Unlink parent/name; the child's link count drops (see `drop_link`)."""
        child = self.lookup(parent, name)
        assert child is not None
        self._del_dirent(parent.ino, name)
        self._emit(fmt.rec_dirent_del(parent.ino, name))
        if child.is_dir:
            parent.nlink -= 1
        parent.mtime_ns = parent.ctime_ns = now
        self.log_inode(parent)
        return child

    def set_symlink(self, inode: Inode, target: bytes) -> None:
        self._set_symlink(inode.ino, target)
        self._emit(fmt.rec_symlink(inode.ino, target))

    def delete_inode(self, inode: Inode) -> None:
        """Remove an unreferenced inode and release its blocks."""
        freed = self._del_inode(inode.ino)
        self._emit(fmt.rec_inode_del(inode.ino))
        self._release(freed)

    def map_extent(self, inode: Inode, fblock: int, dblock: int, count: int) -> None:
        freed = self._set_extent(inode.ino, fblock, dblock, count)
        self._emit(fmt.rec_extent_set(inode.ino, fblock, dblock, count))
        self._release(freed)

    def truncate_extents(self, inode: Inode, fblock: int) -> None:
        """Unmap every block from fblock on."""
        assert inode.extents is not None
        if not any(f + c > fblock for f, _, c in inode.extents):
            return
        freed = self._trunc_extents(inode.ino, fblock)
        self._emit(fmt.rec_extent_trunc(inode.ino, fblock))
        self._release(freed)

    def set_xattr(self, inode: Inode, name: bytes, value: bytes) -> None:
        self._set_xattr(inode.ino, name, value)
        self._emit(fmt.rec_xattr_set(inode.ino, name, value))

    def del_xattr(self, inode: Inode, name: bytes) -> None:
        self._del_xattr(inode.ino, name)
        self._emit(fmt.rec_xattr_del(inode.ino, name))


def iter_tree(md: Metadata) -> Iterator[tuple[bytes, Inode]]:
    """Every (path, inode) reachable from the root, depth first."""
    stack: list[tuple[bytes, Inode]] = [(b"/", md.root)]
    while stack:
        path, inode = stack.pop()
        yield path, inode
        if inode.entries:
            for name, ino in sorted(inode.entries.items(), reverse=True):
                child = md.inodes.get(ino)
                if child is not None:
                    sep = b"" if path == b"/" else b"/"
                    stack.append((path + sep + name, child))
