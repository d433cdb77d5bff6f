"""On-disk structures: superblock, records, batch and snapshot headers, foreign data."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from atomicfs import format as fmt
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, NotAtomicfs
from atomicfs.superblock import read_superblock, superblock_offset, write_superblock_sync
from atomicfs.mkfs import mkfs
from atomicfs.native import crc32c
from tests.unit.fsutil import scribble


def make_sb(**changes: int) -> fmt.Superblock:
    sb = fmt.Superblock(uuid=bytes(range(16)), block_size=4096, total_blocks=16384,
                        log_start=2, log_blocks=2048, data_start=2050, atomic_unit=16384,
                        flags=3, seq=7, snap_block=2050, snap_seq=7, log_tail=8192,
                        log_seq=42, next_ino=99, ckpt_time_ns=123, mkfs_time_ns=456)
    return dataclasses.replace(sb, **changes)


# ---------------------------------------------------------------------------- superblock


def test_superblock_round_trip() -> None:
    sb = make_sb()
    raw = sb.pack()
    assert len(raw) == fmt.MIN_BLOCK_SIZE
    assert fmt.Superblock.unpack(raw) == sb


def test_superblock_every_byte_of_the_body_is_checksummed() -> None:
    raw = make_sb().pack()
    body_end = fmt.SB_SIZE + 4  # fields, then the CRC
    for pos in range(body_end):
        damaged = bytearray(raw)
        damaged[pos] ^= 0x01
        with pytest.raises(CorruptFilesystem):
            fmt.Superblock.unpack(bytes(damaged))


def test_superblock_bad_magic_and_version() -> None:
    raw = bytearray(make_sb().pack())
    with pytest.raises(CorruptFilesystem, match="magic"):
        fmt.Superblock.unpack(bytes(8) + bytes(raw[8:]))
    raw[8:12] = struct.pack("<I", fmt.VERSION + 1)
    with pytest.raises(CorruptFilesystem, match="version"):
        fmt.Superblock.unpack(bytes(raw))


@pytest.mark.parametrize("changes", [
    {"block_size": 2048},
    {"block_size": 6144},  # not a power of two
    {"block_size": 131072},
    {"log_start": 1},  # overlaps the superblock slots
    {"log_blocks": 0},
    {"data_start": 2049},  # log runs into the data area
    {"data_start": 16384},  # no data area
    {"total_blocks": 2050},
    {"log_tail": 100},  # not block aligned
    {"log_tail": 2048 * 4096},  # past the log
    {"snap_block": 5},  # snapshot inside the log
    {"snap_block": 16384},
])
def test_superblock_geometry_validation(changes: dict[str, int]) -> None:
    sb = make_sb(**changes)
    with pytest.raises(CorruptFilesystem):
        sb.validate()
    with pytest.raises(CorruptFilesystem):  # the checksum holds; the geometry does not
        fmt.Superblock.unpack(sb.pack())


def test_superblock_of_the_older_shorter_layout_still_reads() -> None:
    """Images formatted before the previous-checkpoint fields existed still mount."""
    sb = make_sb()
    body = sb.pack()[: fmt.SB_SIZE_OLD]
    body = body[:12] + struct.pack("<I", fmt.SB_SIZE_OLD) + body[16:]
    raw = body + struct.pack("<I", crc32c(body))
    old = fmt.Superblock.unpack(raw + bytes(fmt.MIN_BLOCK_SIZE - len(raw)))
    assert old == sb and old.prev_snap_block == 0


@pytest.mark.parametrize("changes", [
    {"atomic_unit": 12288},  # not a power of two
    {"atomic_unit": 2 << 20},
    {"next_ino": 1},
    {"log_seq": 0},
    {"prev_snap_block": 5},
    {"prev_snap_block": 3000, "prev_snap_seq": 7, "prev_log_seq": 40},  # not older
    {"prev_snap_block": 3000, "prev_snap_seq": 6, "prev_log_seq": 43},
])
def test_superblock_field_validation(changes: dict[str, int]) -> None:
    with pytest.raises(CorruptFilesystem):
        fmt.Superblock.unpack(make_sb(**changes).pack())


def test_superblock_valid_edges() -> None:
    make_sb(prev_snap_block=3000, prev_snap_seq=6, prev_log_seq=42).validate()
    make_sb(snap_block=0).validate()  # no snapshot yet
    make_sb(log_tail=2047 * 4096).validate()
    make_sb(block_size=65536, log_tail=0).validate()


def _rewrite_slot(path: str, sb: fmt.Superblock) -> None:
    dev = Device.open(path)
    try:
        write_superblock_sync(dev, sb)
    finally:
        dev.close()


def _read_sb(path: str) -> fmt.Superblock:
    dev = Device.open(path, readonly=True)
    try:
        return read_superblock(dev)
    finally:
        dev.close()


def test_read_superblock_picks_the_higher_sequence(fs_image: str) -> None:
    sb = _read_sb(fs_image)
    assert sb.seq == 1  # mkfs writes seq 0 into slot 0 and seq 1 into slot 1
    newer = dataclasses.replace(sb, seq=2, next_ino=77)
    assert superblock_offset(newer) == 0
    _rewrite_slot(fs_image, newer)
    got = _read_sb(fs_image)
    assert (got.seq, got.next_ino) == (2, 77)
    newest = dataclasses.replace(sb, seq=3, next_ino=78)
    _rewrite_slot(fs_image, newest)
    got = _read_sb(fs_image)
    assert (got.seq, got.next_ino) == (3, 78)


@pytest.mark.parametrize("how", ["garbage", "zero-sector", "flip"])
def test_read_superblock_falls_back_when_the_newer_slot_is_torn(fs_image: str,
                                                                how: str) -> None:
    sb = _read_sb(fs_image)
    _rewrite_slot(fs_image, dataclasses.replace(sb, seq=2, next_ino=77))  # slot 0
    if how == "garbage":
        scribble(fs_image, 0, random.Random(1).randbytes(4096))
    elif how == "zero-sector":
        scribble(fs_image, 0, bytes(512))  # a torn write: the first sector never landed
    else:
        scribble(fs_image, 40, b"\xff")  # a flipped field inside the checksummed body
    got = _read_sb(fs_image)
    assert (got.seq, got.next_ino) == (1, sb.next_ino)


def test_read_superblock_slot_one_of_a_larger_block_size(tmp_path: Path) -> None:
    """With 8 KiB blocks slot B sits at 8 KiB; it is found when slot A is unreadable."""
    path = str(tmp_path / "big.img")
    mkfs(path, size=fmt.MIN_SIZE, block_size=8192)
    scribble(path, 0, bytes(4096))
    sb = _read_sb(path)
    assert (sb.block_size, sb.seq) == (8192, 1)


def test_read_superblock_ignores_a_slot_of_another_filesystem(fs_image: str,
                                                              tmp_path: Path) -> None:
    """Slot B of an older filesystem (other uuid) must not win over slot A."""
    other = str(tmp_path / "other.img")
    mkfs(other, size=fmt.MIN_SIZE)
    with open(other, "rb") as f:
        f.seek(4096)
        foreign_slot = f.read(4096)
    sb = _read_sb(fs_image)
    _rewrite_slot(fs_image, dataclasses.replace(sb, seq=2))  # slot 0 valid, seq 2
    foreign = fmt.Superblock.unpack(foreign_slot)
    foreign.seq = 5
    scribble(fs_image, 4096, foreign.pack())  # slot 1: valid but another uuid
    got = _read_sb(fs_image)
    assert got.uuid == sb.uuid and got.seq == 2


def test_read_superblock_both_slots_damaged(fs_image: str) -> None:
    scribble(fs_image, 100, b"\xff\xff")
    scribble(fs_image, 4096 + 100, b"\xff\xff")
    with pytest.raises(NotAtomicfs, match="damaged"):
        _read_sb(fs_image)


def test_read_superblock_zeros(tmp_path: Path) -> None:
    path = tmp_path / "zero.img"
    with open(path, "wb") as f:
        f.truncate(fmt.MIN_SIZE)
    with pytest.raises(NotAtomicfs, match="all zeros"):
        _read_sb(str(path))


def test_read_superblock_truncated_target(fs_image: str) -> None:
    os.truncate(fs_image, fmt.MIN_SIZE - 4096)
    with pytest.raises(NotAtomicfs, match="smaller"):
        _read_sb(fs_image)


@pytest.fixture
def ext4_image(tmp_path: Path) -> str:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    path = tmp_path / "ext4.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return str(path)


def test_identify_foreign_ext4(ext4_image: str) -> None:
    with open(ext4_image, "rb") as f:
        head = f.read(128 << 10)
    assert fmt.identify_foreign(head) == "an ext2/ext3/ext4 filesystem"
    with pytest.raises(NotAtomicfs, match="ext2/ext3/ext4"):
        _read_sb(ext4_image)


def test_identify_foreign_nothing() -> None:
    assert fmt.identify_foreign(bytes(128 << 10)) is None
    assert fmt.identify_foreign(b"") is None
    assert fmt.identify_foreign(random.Random(1).randbytes(1000).replace(b"\x55\xaa", b"")
                                [:500]) is None


def test_identify_foreign_other_signatures() -> None:
    head = bytearray(128 << 10)
    head[:4] = b"XFSB"
    assert fmt.identify_foreign(bytes(head)) == "an XFS filesystem"
    head = bytearray(128 << 10)
    head[65600:65608] = b"_BHRfS_M"
    assert fmt.identify_foreign(bytes(head)) == "a btrfs filesystem"
    head = bytearray(4096)
    head[4086:4096] = b"SWAPSPACE2"
    assert fmt.identify_foreign(bytes(head)) == "swap space"
    head = bytearray(512)
    head[510:512] = b"\x55\xaa"
    assert fmt.identify_foreign(bytes(head)) == "a partition table or boot sector"


# ------------------------------------------------------------------------------ records

INODE_FIELDS = (5, 0o100644, 1000, 1000, 1, 1 << 40, -1, 2, 3, 4, 0, 7, 0)

ALL_RECORDS: list[tuple[bytes, int, tuple]] = [
    (fmt.rec_inode(INODE_FIELDS), fmt.REC_INODE, INODE_FIELDS),
    (fmt.rec_inode_del(5), fmt.REC_INODE_DEL, (5,)),
    (fmt.rec_dirent_add(1, b"name\xff", 5), fmt.REC_DIRENT_ADD, (1, b"name\xff", 5)),
    (fmt.rec_dirent_add(1, b"", 5), fmt.REC_DIRENT_ADD, (1, b"", 5)),
    (fmt.rec_dirent_del(1, b"x" * 255), fmt.REC_DIRENT_DEL, (1, b"x" * 255)),
    (fmt.rec_extent_set(5, 1 << 33, 2050, 16), fmt.REC_EXTENT_SET, (5, 1 << 33, 2050, 16)),
    (fmt.rec_extent_trunc(5, 3), fmt.REC_EXTENT_TRUNC, (5, 3)),
    (fmt.rec_xattr_set(5, b"user.a", b"\0v\0"), fmt.REC_XATTR_SET, (5, b"user.a", b"\0v\0")),
    (fmt.rec_xattr_set(5, b"user.empty", b""), fmt.REC_XATTR_SET, (5, b"user.empty", b"")),
    (fmt.rec_xattr_del(5, b"user.a"), fmt.REC_XATTR_DEL, (5, b"user.a")),
    (fmt.rec_symlink(6, b"../target"), fmt.REC_SYMLINK, (6, b"../target")),
    (fmt.rec_next_ino(1234), fmt.REC_NEXT_INO, (1234,)),
    (fmt.rec_data(5, 8, 4096, 4, 8192), fmt.REC_DATA, (5, 8, 4096, 4, 8192)),
]


@pytest.mark.parametrize("raw, rtype, args", ALL_RECORDS,
                         ids=[f"{fmt.REC_NAMES[t]}-{i}" for i, (_, t, _) in
                              enumerate(ALL_RECORDS)])
def test_record_round_trip(raw: bytes, rtype: int, args: tuple) -> None:
    (rec,) = list(fmt.decode_records(raw))
    assert (rec.rtype, rec.args) == (rtype, args)


def test_every_record_type_is_covered() -> None:
    assert {t for _, t, _ in ALL_RECORDS} == set(fmt.REC_NAMES)


def test_record_stream_round_trip() -> None:
    stream = b"".join(raw for raw, _, _ in ALL_RECORDS)
    decoded = [(r.rtype, r.args) for r in fmt.decode_records(memoryview(stream))]
    assert decoded == [(t, a) for _, t, a in ALL_RECORDS]
    assert fmt.DATA_REC_SIZE == len(fmt.rec_data(1, 2, 3, 4, 5))


def _hdr(rtype: int, length: int) -> bytes:
    return struct.pack("<BI", rtype, length)


@pytest.mark.parametrize("stream", [
    b"\x01",  # truncated header
    b"\x01\x00\x00",
    _hdr(fmt.REC_INODE, 10) + bytes(5),  # length past the end
    _hdr(99, 0),  # unknown type
    _hdr(0, 0),
    _hdr(fmt.REC_INODE, fmt.INODE_FMT.size - 1) + bytes(fmt.INODE_FMT.size - 1),
    _hdr(fmt.REC_INODE, fmt.INODE_FMT.size + 1) + bytes(fmt.INODE_FMT.size + 1),
    _hdr(fmt.REC_INODE_DEL, 0),
    _hdr(fmt.REC_NEXT_INO, 9) + bytes(9),
    _hdr(fmt.REC_DIRENT_ADD, 18 + 3) + struct.pack("<QQH", 1, 2, 4) + b"abc",  # name short
    _hdr(fmt.REC_DIRENT_ADD, 18 + 5) + struct.pack("<QQH", 1, 2, 4) + b"abcde",  # trailing
    _hdr(fmt.REC_DIRENT_ADD, 4) + bytes(4),
    _hdr(fmt.REC_DIRENT_DEL, 10 + 2) + struct.pack("<QH", 1, 3) + b"ab",
    _hdr(fmt.REC_EXTENT_SET, 27) + bytes(27),
    _hdr(fmt.REC_EXTENT_TRUNC, 15) + bytes(15),
    _hdr(fmt.REC_XATTR_SET, 14 + 3) + struct.pack("<QHI", 1, 2, 2) + b"abc",
    _hdr(fmt.REC_XATTR_SET, 14 + 5) + struct.pack("<QHI", 1, 2, 2) + b"abcde",
    _hdr(fmt.REC_XATTR_DEL, 10 + 1) + struct.pack("<QH", 1, 2) + b"a",
    _hdr(fmt.REC_SYMLINK, 7) + bytes(7),
    _hdr(fmt.REC_DATA, 31) + bytes(31),
    fmt.rec_next_ino(3) + b"\x0b",  # a valid record, then a torn one
])
def test_malformed_streams_raise_corrupt(stream: bytes) -> None:
    with pytest.raises(CorruptFilesystem):
        list(fmt.decode_records(stream))


def test_truncated_streams_raise_corrupt_unless_cut_between_records() -> None:
    stream = b"".join(raw for raw, _, _ in ALL_RECORDS)
    boundaries = {0}
    pos = 0
    for raw, _, _ in ALL_RECORDS:
        pos += len(raw)
        boundaries.add(pos)
    for cut in range(len(stream)):
        if cut in boundaries:
            assert len(list(fmt.decode_records(stream[:cut]))) == \
                sorted(boundaries).index(cut)
        else:
            with pytest.raises(CorruptFilesystem):
                list(fmt.decode_records(stream[:cut]))


def test_random_garbage_only_ever_raises_corrupt() -> None:
    """Whatever the bytes, decoding yields records or raises CorruptFilesystem: replay
    and fsck rely on that to treat garbage as damage, not as a crash of the tool."""
    rng = random.Random(7)
    valid = b"".join(raw for raw, _, _ in ALL_RECORDS)
    for i in range(3000):
        if i % 2:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randrange(0, 80)))
            if data:
                data[0] = rng.randrange(0, 13)
        try:
            list(fmt.decode_records(bytes(data)))
        except CorruptFilesystem:
            pass


# -------------------------------------------------------------------------------- batches


def test_batch_header_round_trip() -> None:
    hdr = fmt.BatchHeader(uuid_tag=0x1122334455667788, seq=1 << 40, pos=8 << 20,
                          total_len=12288, meta_len=300, n_data=2)
    raw = hdr.pack(crc=0xDEADBEEF)
    assert len(raw) == fmt.BATCH_HEADER_SIZE
    got = fmt.BatchHeader.unpack(raw)
    assert got == dataclasses.replace(hdr, crc=0xDEADBEEF)
    # the CRC field sits where the writer and the reader both expect it
    assert struct.unpack_from("<I", raw, fmt.CRC_FIELD_OFFSET)[0] == 0xDEADBEEF


def test_batch_header_rejects_other_data() -> None:
    raw = bytearray(fmt.BatchHeader(1, 2, 3, 4096, 0, 0).pack())
    assert fmt.BatchHeader.unpack(bytes(raw[:-1])) is None  # short
    assert fmt.BatchHeader.unpack(bytes(fmt.BATCH_HEADER_SIZE)) is None  # zeros
    raw[0] ^= 1
    assert fmt.BatchHeader.unpack(bytes(raw)) is None  # magic
    raw[0] ^= 1
    raw[4:6] = struct.pack("<H", fmt.VERSION + 1)
    assert fmt.BatchHeader.unpack(bytes(raw)) is None  # version


def test_header_area_size() -> None:
    assert fmt.header_area_size(0, 4096) == 4096
    assert fmt.header_area_size(4096 - fmt.BATCH_HEADER_SIZE, 4096) == 4096
    assert fmt.header_area_size(4096 - fmt.BATCH_HEADER_SIZE + 1, 4096) == 8192


# ------------------------------------------------------------------------------ snapshots


@pytest.mark.parametrize("block_size", [4096, 65536])
@pytest.mark.parametrize("n_extents", [0, 1, "max"])
def test_snapshot_header_round_trip(block_size: int, n_extents: int | str) -> None:
    n = fmt.SnapshotHeader.max_extents(block_size) if n_extents == "max" else n_extents
    exts = [(2050 + 3 * i, i + 1) for i in range(int(n))]
    hdr = fmt.SnapshotHeader(uuid=bytes(range(16)), seq=9, length=123456, next_ino=77,
                             payload_crc=0xCAFEBABE, extents=exts)
    raw = hdr.pack(block_size)
    assert len(raw) == block_size
    assert fmt.SnapshotHeader.unpack(raw) == hdr


def test_snapshot_header_damage() -> None:
    hdr = fmt.SnapshotHeader(bytes(16), 1, 10, 2, 0, [(2050, 2)])
    raw = hdr.pack(4096)
    end = fmt._SNAP.size + fmt._SNAP_EXT.size + 4
    for pos in range(end):
        damaged = bytearray(raw)
        damaged[pos] ^= 0x80
        with pytest.raises(CorruptFilesystem):
            fmt.SnapshotHeader.unpack(bytes(damaged))


def test_snapshot_header_too_many_extents() -> None:
    raw = bytearray(fmt.SnapshotHeader(bytes(16), 1, 10, 2, 0, []).pack(4096))
    count_off = fmt._SNAP.size - 8
    struct.pack_into("<I", raw, count_off, fmt.SnapshotHeader.max_extents(4096) + 1)
    with pytest.raises(CorruptFilesystem, match="too many"):
        fmt.SnapshotHeader.unpack(bytes(raw))


def test_default_log_blocks() -> None:
    assert fmt.default_log_blocks(16384, 4096) == (8 << 20) // 4096  # floor: 8 MiB
    assert fmt.default_log_blocks((1 << 30) // 4096, 4096) == (64 << 20) // 4096
    assert fmt.default_log_blocks((1 << 40) // 4096, 4096) == (512 << 20) // 4096  # cap
