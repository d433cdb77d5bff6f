"""On-disk structures of atomicfs and their checksums.

Layout of a formatted target (block numbers in filesystem blocks, default 4 KiB):

    block 0, 1       superblock slots A and B; the valid one with the higher sequence wins
    block 2          the owner record (atomicfs.owner), when the superblock has
                     FLAG_OWNER_RECORD; images made before it start the log at block 2
    log_start ...    the log: a ring of checksummed batches (metadata records and atomic data)
    data_start ...   data blocks and metadata snapshots, handed out by the allocator

A *batch* is one sequential device write: a header area (batch header, then the metadata
record stream) padded to a block, followed by the payloads of its DATA records, each padded
to a block. One CRC32C covers the whole batch, so a batch torn by a crash is recognised and
dropped as a unit.

A *snapshot* (checkpoint) is the whole metadata, written as the same record stream into
blocks from the data area; its header block lists where the stream lies.

All integers are little-endian.
"""
from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Iterator

from atomicfs.errors import CorruptFilesystem
from atomicfs.native import crc32c

MAGIC = b"ATOMICFS"
VERSION = 1
MIN_SIZE = 64 << 20
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 65536
MAX_ATOMIC_UNIT = 1 << 20  # FUSE hands over at most 1 MiB per write request
SB_SLOTS = 2
OWNER_BLOCK = SB_SLOTS  # the block after the slots, with FLAG_OWNER_RECORD
FLAG_OWNER_RECORD = 1 << 0  # superblock flags: OWNER_BLOCK holds the owner record
ROOT_INO = 1

# ---------------------------------------------------------------------------- superblock

_SB = struct.Struct("<8sII16sIIQQQQIIQQQQQQQQ")
# Version 1 superblocks of this size and later also name the previous checkpoint, whose
# snapshot is kept on disk as a fallback: its first block, sequence, time and the log
# sequence number it covered up to. Slots of the older, shorter layout still mount.
_SB_PREV = struct.Struct("<QQQQ")
SB_SIZE_OLD = _SB.size
SB_SIZE = _SB.size + _SB_PREV.size
MAX_INO = (1 << 63) - 1
MAX_FILE_BLOCKS = (1 << 32) - 1  # as ext4 extents: 16 TiB - 4 KiB with 4 KiB blocks


@dataclass
class Superblock:
    uuid: bytes
    block_size: int
    total_blocks: int
    log_start: int
    log_blocks: int
    data_start: int
    atomic_unit: int = 0
    flags: int = 0
    seq: int = 0
    snap_block: int = 0
    snap_seq: int = 0
    log_tail: int = 0  # byte offset in the log where replay starts
    log_seq: int = 1  # sequence number of the batch expected at log_tail
    next_ino: int = 2
    ckpt_time_ns: int = 0
    mkfs_time_ns: int = 0
    prev_snap_block: int = 0  # 0: no previous checkpoint kept
    prev_snap_seq: int = 0
    prev_ckpt_time_ns: int = 0
    prev_log_seq: int = 0  # log_seq of the previous checkpoint

    @property
    def log_bytes(self) -> int:
        return self.log_blocks * self.block_size

    @property
    def log_offset(self) -> int:
        """Byte offset of the log region on the device."""
        return self.log_start * self.block_size

    @property
    def uuid_tag(self) -> int:
        return int.from_bytes(self.uuid[:8], "little")

    def pack(self) -> bytes:
        body = _SB.pack(MAGIC, VERSION, SB_SIZE, self.uuid, self.block_size, self.flags,
                        self.total_blocks, self.log_start, self.log_blocks, self.data_start,
                        self.atomic_unit, 0, self.seq, self.snap_block, self.snap_seq,
                        self.log_tail, self.log_seq, self.next_ino, self.ckpt_time_ns,
                        self.mkfs_time_ns)
        body += _SB_PREV.pack(self.prev_snap_block, self.prev_snap_seq,
                              self.prev_ckpt_time_ns, self.prev_log_seq)
        block = bytearray(MIN_BLOCK_SIZE)
        block[: len(body)] = body
        block[len(body): len(body) + 4] = struct.pack("<I", crc32c(body))
        return bytes(block)

    @classmethod
    def unpack(cls, raw: bytes) -> "Superblock":
        """Parse one slot; raise CorruptFilesystem if it is not a valid superblock."""
        if raw[:8] != MAGIC:
            raise CorruptFilesystem("no atomicfs magic")
        (_, version, size, uid, bs, flags, total, log_start, log_blocks, data_start, unit, _pad,
         seq, snap_block, snap_seq, log_tail, log_seq, next_ino, ckpt_ns,
         mkfs_ns) = _SB.unpack_from(raw)
        if version != VERSION:
            raise CorruptFilesystem(f"unsupported atomicfs format version {version}")
        if size not in (SB_SIZE_OLD, SB_SIZE):
            raise CorruptFilesystem("superblock size mismatch")
        (crc,) = struct.unpack_from("<I", raw, size)
        if crc != crc32c(raw[:size]):
            raise CorruptFilesystem("superblock checksum mismatch")
        prev = _SB_PREV.unpack_from(raw, _SB.size) if size == SB_SIZE else (0, 0, 0, 0)
        sb = cls(uuid=uid, block_size=bs, total_blocks=total, log_start=log_start,
                 log_blocks=log_blocks, data_start=data_start, atomic_unit=unit, flags=flags,
                 seq=seq, snap_block=snap_block, snap_seq=snap_seq, log_tail=log_tail,
                 log_seq=log_seq, next_ino=next_ino, ckpt_time_ns=ckpt_ns,
                 mkfs_time_ns=mkfs_ns, prev_snap_block=prev[0], prev_snap_seq=prev[1],
                 prev_ckpt_time_ns=prev[2], prev_log_seq=prev[3])
        sb.validate()
        return sb

    def validate(self) -> None:
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise CorruptFilesystem(f"bad block size {bs}")
        if not (SB_SLOTS <= self.log_start < self.log_start + self.log_blocks
                <= self.data_start < self.total_blocks):
            raise CorruptFilesystem("inconsistent geometry in superblock")
        if self.log_tail % bs or self.log_tail >= self.log_bytes:
            raise CorruptFilesystem("log tail outside the log")
        for what, block in (("snapshot", self.snap_block),
                            ("previous snapshot", self.prev_snap_block)):
            if block and not (self.data_start <= block < self.total_blocks):
                raise CorruptFilesystem(f"{what} pointer outside the data area")
        unit = self.atomic_unit
        if unit and (unit & (unit - 1) or not MIN_BLOCK_SIZE <= unit <= MAX_ATOMIC_UNIT):
            raise CorruptFilesystem(f"bad atomic unit {unit} in superblock")
        if not ROOT_INO < self.next_ino <= MAX_INO:
            raise CorruptFilesystem(f"bad next inode number {self.next_ino} in superblock")
        if self.log_seq < 1 or self.log_seq > MAX_INO:
            raise CorruptFilesystem("bad log sequence number in superblock")
        if self.prev_snap_block and (self.prev_snap_seq >= self.snap_seq or
                                     not 1 <= self.prev_log_seq <= self.log_seq):
            raise CorruptFilesystem("snapshot sequence numbers out of order in superblock")


def new_uuid() -> bytes:
    return uuidlib.uuid4().bytes


def default_log_blocks(total_blocks: int, block_size: int) -> int:
    """A sixteenth of the target, at least 8 MiB and at most 512 MiB."""
    size = total_blocks * block_size // 16
    size = max(8 << 20, min(512 << 20, size))
    return size // block_size


# ------------------------------------------------------------------------------ records

REC_INODE = 1
REC_INODE_DEL = 2
REC_DIRENT_ADD = 3
REC_DIRENT_DEL = 4
REC_EXTENT_SET = 5
REC_EXTENT_TRUNC = 6
REC_XATTR_SET = 7
REC_XATTR_DEL = 8
REC_SYMLINK = 9
REC_DATA = 10
REC_NEXT_INO = 11

REC_NAMES = {
    REC_INODE: "inode", REC_INODE_DEL: "inode_del", REC_DIRENT_ADD: "dirent_add",
    REC_DIRENT_DEL: "dirent_del", REC_EXTENT_SET: "extent_set",
    REC_EXTENT_TRUNC: "extent_trunc", REC_XATTR_SET: "xattr_set", REC_XATTR_DEL: "xattr_del",
    REC_SYMLINK: "symlink", REC_DATA: "data", REC_NEXT_INO: "next_ino",
}

_REC_HDR = struct.Struct("<BI")  # type, payload length
INODE_FMT = struct.Struct("<QIIIIQqqqqQII")
_INO = struct.Struct("<Q")
_DIRENT = struct.Struct("<QQH")  # parent, ino, name length
_DIRENT_DEL = struct.Struct("<QH")
_EXTENT = struct.Struct("<QQQI")  # ino, file block, device block, count
_EXTENT_TRUNC = struct.Struct("<QQ")
_XATTR = struct.Struct("<QHI")  # ino, name length, value length
_XATTR_DEL = struct.Struct("<QH")
_DATA = struct.Struct("<QQQII")  # ino, file block, device block, nblocks, payload offset


def rec(rtype: int, payload: bytes) -> bytes:
    return _REC_HDR.pack(rtype, len(payload)) + payload


def rec_inode(fields: tuple[int, ...]) -> bytes:
    return rec(REC_INODE, INODE_FMT.pack(*fields))


def rec_inode_del(ino: int) -> bytes:
    return rec(REC_INODE_DEL, _INO.pack(ino))


def rec_dirent_add(parent: int, name: bytes, ino: int) -> bytes:
    return rec(REC_DIRENT_ADD, _DIRENT.pack(parent, ino, len(name)) + name)


def rec_dirent_del(parent: int, name: bytes) -> bytes:
    return rec(REC_DIRENT_DEL, _DIRENT_DEL.pack(parent, len(name)) + name)


def rec_extent_set(ino: int, fblock: int, dblock: int, count: int) -> bytes:
    return rec(REC_EXTENT_SET, _EXTENT.pack(ino, fblock, dblock, count))


def rec_extent_trunc(ino: int, fblock: int) -> bytes:
    return rec(REC_EXTENT_TRUNC, _EXTENT_TRUNC.pack(ino, fblock))


def rec_xattr_set(ino: int, name: bytes, value: bytes) -> bytes:
    return rec(REC_XATTR_SET, _XATTR.pack(ino, len(name), len(value)) + name + value)


def rec_xattr_del(ino: int, name: bytes) -> bytes:
    return rec(REC_XATTR_DEL, _XATTR_DEL.pack(ino, len(name)) + name)


def rec_symlink(ino: int, target: bytes) -> bytes:
    return rec(REC_SYMLINK, _INO.pack(ino) + target)


def rec_next_ino(value: int) -> bytes:
    return rec(REC_NEXT_INO, _INO.pack(value))


def rec_data(ino: int, fblock: int, dblock: int, nblocks: int, payload_off: int) -> bytes:
    return rec(REC_DATA, _DATA.pack(ino, fblock, dblock, nblocks, payload_off))


DATA_REC_SIZE = _REC_HDR.size + _DATA.size


@dataclass
class Record:
    """A decoded record; fields depend on the type (see decode_records)."""

    rtype: int
    args: tuple


def decode_records(stream: bytes | memoryview) -> Iterator[Record]:
    """Decode a record stream; raise CorruptFilesystem on anything malformed."""
    mv = memoryview(stream)
    pos = 0
    end = len(mv)
    while pos < end:
        if end - pos < _REC_HDR.size:
            raise CorruptFilesystem("truncated record header")
        rtype, length = _REC_HDR.unpack_from(mv, pos)
        pos += _REC_HDR.size
        if length > end - pos:
            raise CorruptFilesystem("record runs past the end of its stream")
        body = mv[pos: pos + length]
        pos += length
        yield Record(rtype, _decode_body(rtype, body))


def _decode_body(rtype: int, body: memoryview) -> tuple:
    try:
        if rtype == REC_INODE:
            return INODE_FMT.unpack(body)
        if rtype in (REC_INODE_DEL, REC_NEXT_INO):
            return _INO.unpack(body)
        if rtype == REC_DIRENT_ADD:
            parent, ino, n = _DIRENT.unpack_from(body)
            name = bytes(body[_DIRENT.size: _DIRENT.size + n])
            _expect(len(name) == n and _DIRENT.size + n == len(body))
            return parent, name, ino
        if rtype == REC_DIRENT_DEL:
            parent, n = _DIRENT_DEL.unpack_from(body)
            name = bytes(body[_DIRENT_DEL.size:])
            _expect(len(name) == n)
            return parent, name
        if rtype == REC_EXTENT_SET:
            return _EXTENT.unpack(body)
        if rtype == REC_EXTENT_TRUNC:
            return _EXTENT_TRUNC.unpack(body)
        if rtype == REC_XATTR_SET:
            ino, n, vlen = _XATTR.unpack_from(body)
            _expect(_XATTR.size + n + vlen == len(body))
            name = bytes(body[_XATTR.size: _XATTR.size + n])
            return ino, name, bytes(body[_XATTR.size + n:])
        if rtype == REC_XATTR_DEL:
            ino, n = _XATTR_DEL.unpack_from(body)
            name = bytes(body[_XATTR_DEL.size:])
            _expect(len(name) == n)
            return ino, name
        if rtype == REC_SYMLINK:
            (ino,) = _INO.unpack_from(body)
            return ino, bytes(body[_INO.size:])
        if rtype == REC_DATA:
            return _DATA.unpack(body)
    except struct.error as exc:
        raise CorruptFilesystem(f"malformed {REC_NAMES.get(rtype, rtype)} record") from exc
    raise CorruptFilesystem(f"unknown record type {rtype}")


def _expect(cond: bool) -> None:
    if not cond:
        raise CorruptFilesystem("malformed record")


# -------------------------------------------------------------------------------- batches

BATCH_MAGIC = 0x4C534641  # "AFSL"
_BATCH = struct.Struct("<IHHQQQIIII")  # magic, version, flags, uuid tag, seq, pos,
#                                        total length, meta length, n_data, crc
BATCH_HEADER_SIZE = _BATCH.size


@dataclass
class BatchHeader:
    uuid_tag: int
    seq: int
    pos: int
    total_len: int
    meta_len: int
    n_data: int
    crc: int = 0

    def pack(self, crc: int = 0) -> bytes:
        return _BATCH.pack(BATCH_MAGIC, VERSION, 0, self.uuid_tag, self.seq, self.pos,
                           self.total_len, self.meta_len, self.n_data, crc)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> "BatchHeader | None":
        """Parse a batch header; None if this is not one (magic or version differ)."""
        if len(raw) < _BATCH.size:
            return None
        (magic, version, _flags, tag, seq, pos, total, meta, n_data,
         crc) = _BATCH.unpack_from(raw)
        if magic != BATCH_MAGIC or version != VERSION:
            return None
        return cls(tag, seq, pos, total, meta, n_data, crc)


CRC_FIELD_OFFSET = _BATCH.size - 4


def header_area_size(meta_len: int, block_size: int) -> int:
    return round_up(BATCH_HEADER_SIZE + meta_len, block_size)


# ------------------------------------------------------------------------------ snapshot

SNAP_MAGIC = b"AFSSNAP1"
_SNAP = struct.Struct("<8s16sQQQII")  # magic, uuid, sb seq, payload length, next ino,
#                                       extent count, payload crc
_SNAP_EXT = struct.Struct("<QI")


@dataclass
class SnapshotHeader:
    uuid: bytes
    seq: int
    length: int
    next_ino: int
    payload_crc: int
    extents: list[tuple[int, int]] = field(default_factory=list)  # (device block, count)

    @staticmethod
    def max_extents(block_size: int) -> int:
        return (block_size - _SNAP.size - 4) // _SNAP_EXT.size

    def pack(self, block_size: int) -> bytes:
        body = _SNAP.pack(SNAP_MAGIC, self.uuid, self.seq, self.length, self.next_ino,
                          len(self.extents), self.payload_crc)
        body += b"".join(_SNAP_EXT.pack(d, c) for d, c in self.extents)
        block = bytearray(block_size)
        block[: len(body)] = body
        block[len(body): len(body) + 4] = struct.pack("<I", crc32c(body))
        return bytes(block)

    @classmethod
    def unpack(cls, raw: bytes) -> "SnapshotHeader":
        if raw[:8] != SNAP_MAGIC:
            raise CorruptFilesystem("snapshot header magic missing")
        _, uid, seq, length, next_ino, n, pcrc = _SNAP.unpack_from(raw)
        if n > cls.max_extents(len(raw)):
            raise CorruptFilesystem("snapshot header lists too many extents")
        end = _SNAP.size + n * _SNAP_EXT.size
        (crc,) = struct.unpack_from("<I", raw, end)
        if crc != crc32c(raw[:end]):
            raise CorruptFilesystem("snapshot header checksum mismatch")
        exts = [_SNAP_EXT.unpack_from(raw, _SNAP.size + i * _SNAP_EXT.size) for i in range(n)]
        return cls(uid, seq, length, next_ino, pcrc, exts)


# ------------------------------------------------------------------------- foreign data

def identify_foreign(head: bytes) -> str | None:
    """Name a filesystem or container found in the first 128 KiB of a target, if any."""
    if len(head) >= 1082 and head[1080:1082] == b"\x53\xef":
        return "an ext2/ext3/ext4 filesystem"
    if head[:4] == b"XFSB":
        return "an XFS filesystem"
    if len(head) >= 65608 and head[65600:65608] == b"_BHRfS_M":
        return "a btrfs filesystem"
    if head[:6] == b"LUKS\xba\xbe":
        return "a LUKS container"
    if len(head) >= 4096 and head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap space"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and (
            head[54:59] == b"FAT12" or head[54:59] == b"FAT16" or head[82:87] == b"FAT32"):
        return "a FAT filesystem"
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return "a partition table or boot sector"
    return None


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m
