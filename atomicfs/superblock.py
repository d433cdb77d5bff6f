"""The superblock slots and the metadata snapshots they point to.

Two superblock slots alternate: checkpoint n writes slot n % 2, so a torn superblock write
leaves the other slot, the previous checkpoint, intact. A superblock names the newest
snapshot (the whole metadata as a record stream, in blocks of the data area), the log tail
after it, and the previous checkpoint's snapshot, which is kept as a fallback
(see recovery.py).
"""
from __future__ import annotations

import time

from atomicfs import format as fmt
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, NotAtomicfs
from atomicfs.metadata import Extent
from atomicfs.native import Buffer


async def write_superblock(dev: Device, sb: fmt.Superblock) -> None:
    """Write sb into the slot its sequence number selects, durably."""
    await dev.writev(superblock_offset(sb), [(_sb_buffer(sb), 0, fmt.MIN_BLOCK_SIZE)], "super")
    await dev.flush()


def write_superblock_sync(dev: Device, sb: fmt.Superblock) -> None:
    dev.writev_sync(superblock_offset(sb), [(_sb_buffer(sb), 0, fmt.MIN_BLOCK_SIZE)], "super")
    dev.flush_sync()


def superblock_offset(sb: fmt.Superblock) -> int:
    return (sb.seq % fmt.SB_SLOTS) * sb.block_size


def _sb_buffer(sb: fmt.Superblock) -> Buffer:
    buf = Buffer(fmt.MIN_BLOCK_SIZE)
    buf.write(0, sb.pack())
    return buf


def read_superblock(dev: Device) -> fmt.Superblock:
    """The valid superblock slot with the highest sequence number."""
    head = dev.read_sync(0, 128 << 10).bytes()
    slot0: fmt.Superblock | None = None
    errors: list[str] = []
    try:
        slot0 = fmt.Superblock.unpack(head[: fmt.MIN_BLOCK_SIZE])
    except CorruptFilesystem as exc:
        errors.append(str(exc))
    found = [slot0] if slot0 is not None else []
    bs = fmt.MIN_BLOCK_SIZE
    while bs <= fmt.MAX_BLOCK_SIZE:  # slot 1 sits at one block; its size is in the slot
        if slot0 is None or slot0.block_size == bs:
            try:
                sb = fmt.Superblock.unpack(head[bs: bs + fmt.MIN_BLOCK_SIZE])
                if sb.block_size == bs and (slot0 is None or sb.uuid == slot0.uuid):
                    found.append(sb)
            except CorruptFilesystem as exc:
                errors.append(str(exc))
        bs *= 2
    if not found:
        foreign = fmt.identify_foreign(head)
        if foreign:
            raise NotAtomicfs(f"{dev.path} holds {foreign}, not atomicfs")
        if head[:8] == fmt.MAGIC:
            raise NotAtomicfs(f"{dev.path}: atomicfs superblock damaged ({errors[0]})")
        if not any(head):
            raise NotAtomicfs(f"{dev.path} is not an atomicfs filesystem (it is all zeros)")
        raise NotAtomicfs(f"{dev.path} is not an atomicfs filesystem (no superblock)")
    # A slot describing more than the device holds is damaged unless both do (a target
    # that was shrunk, which is named as such).
    fits = [s for s in found if s.total_blocks * s.block_size <= dev.caps.size]
    if not fits:
        sb = max(found, key=lambda s: s.seq)
        raise NotAtomicfs(f"{dev.path} is smaller ({dev.caps.size} bytes) than the "
                          f"filesystem on it ({sb.total_blocks * sb.block_size} bytes)")
    return max(fits, key=lambda s: s.seq)


def superblock_slot_problems(dev: Device, sb: fmt.Superblock) -> list[tuple[int, str]]:
    """(slot, why) for each superblock slot that does not hold a valid superblock of the
    filesystem sb (the newest valid one) describes."""
    out: list[tuple[int, str]] = []
    for slot in range(fmt.SB_SLOTS):
        raw = dev.read_sync(slot * sb.block_size, fmt.MIN_BLOCK_SIZE).bytes()
        try:
            other = fmt.Superblock.unpack(raw)
        except CorruptFilesystem as exc:
            out.append((slot, str(exc)))
            continue
        if other.uuid != sb.uuid or other.block_size != sb.block_size:
            out.append((slot, "it belongs to another filesystem"))
        elif (other.total_blocks, other.log_start, other.log_blocks, other.data_start) != \
                (sb.total_blocks, sb.log_start, sb.log_blocks, sb.data_start):
            out.append((slot, "its geometry differs from the other slot's"))
        elif other.seq % fmt.SB_SLOTS != slot:
            out.append((slot, f"its sequence number {other.seq} belongs in the other slot"))
    return out


def fallback_superblock(sb: fmt.Superblock) -> fmt.Superblock:
    """sb as it reads when the previous checkpoint replaces the newest: its snapshot is
    the current one and none older is kept. The log stays where it is (the batches after
    the newest checkpoint are changes to the lost snapshot and are not replayed)."""
    eff = fmt.Superblock(**{**sb.__dict__})
    eff.snap_block, eff.snap_seq = sb.prev_snap_block, sb.prev_snap_seq
    eff.ckpt_time_ns = sb.prev_ckpt_time_ns
    eff.prev_snap_block = eff.prev_snap_seq = eff.prev_ckpt_time_ns = eff.prev_log_seq = 0
    return eff


def read_snapshot(dev: Device, sb: fmt.Superblock) -> tuple[bytes, list[Extent]]:
    """The metadata stream of the snapshot the superblock points to, and its extents."""
    if not sb.snap_block:
        raise CorruptFilesystem("the superblock points to no metadata snapshot")
    return read_snapshot_at(dev, sb, sb.snap_block, sb.snap_seq)


def read_previous_snapshot(dev: Device, sb: fmt.Superblock) -> tuple[bytes, list[Extent]]:
    """The snapshot of the checkpoint before the newest, kept as a fallback."""
    if not sb.prev_snap_block:
        raise CorruptFilesystem("no previous checkpoint is kept")
    return read_snapshot_at(dev, sb, sb.prev_snap_block, sb.prev_snap_seq)


def read_snapshot_at(dev: Device, sb: fmt.Superblock, block: int,
                     seq: int) -> tuple[bytes, list[Extent]]:
    bs = sb.block_size
    header = fmt.SnapshotHeader.unpack(dev.read_sync(block * bs, bs).bytes())
    if header.uuid != sb.uuid:
        raise CorruptFilesystem("the metadata snapshot belongs to another filesystem")
    if header.seq != seq:
        raise CorruptFilesystem(f"the metadata snapshot is of checkpoint {header.seq}, "
                                f"not {seq}")
    if not header.extents or header.extents[0][0] != block:
        raise CorruptFilesystem("the metadata snapshot header lists no extents")
    for dblock, count in header.extents:
        if count <= 0 or dblock < sb.data_start or dblock + count > sb.total_blocks:
            raise CorruptFilesystem("the metadata snapshot lies outside the data area")
    total = sum(c for _, c in header.extents)
    if total > sb.total_blocks - sb.data_start:
        raise CorruptFilesystem("the metadata snapshot is larger than the data area")
    if total * bs < bs + header.length:
        raise CorruptFilesystem("the metadata snapshot is shorter than its header says")
    buf = Buffer(total * bs)
    off = 0
    for dblock, count in header.extents:
        dev.readv_sync(dblock * bs, [(buf, off, count * bs)])
        off += count * bs
    if buf.crc32c(bs, header.length) != header.payload_crc:
        raise CorruptFilesystem("metadata snapshot checksum mismatch")
    return buf.bytes(bs, header.length), header.extents


def next_checkpoint_superblock(sb: fmt.Superblock, snap_block: int, log_tail: int,
                               log_seq: int, next_ino: int) -> fmt.Superblock:
    """The superblock of a new checkpoint: it points at the new snapshot and names the
    checkpoint sb described as the previous one, whose snapshot stays as a fallback."""
    new_sb = fmt.Superblock(**{**sb.__dict__})
    new_sb.seq = sb.seq + 1
    new_sb.snap_block = snap_block
    new_sb.snap_seq = new_sb.seq
    new_sb.log_tail = log_tail
    new_sb.log_seq = log_seq
    new_sb.next_ino = next_ino
    new_sb.ckpt_time_ns = time.time_ns()
    new_sb.prev_snap_block = sb.snap_block
    new_sb.prev_snap_seq = sb.snap_seq if sb.snap_block else 0
    new_sb.prev_ckpt_time_ns = sb.ckpt_time_ns
    new_sb.prev_log_seq = sb.log_seq if sb.snap_block else 0
    if not new_sb.prev_snap_block:
        new_sb.prev_snap_seq = new_sb.prev_log_seq = new_sb.prev_ckpt_time_ns = 0
    return new_sb
