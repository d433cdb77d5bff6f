"""Replay: the log read back at mount.

Batches are read from the tail while their checksum, sequence number and position hold;
the first that fails ends the log (a torn tail is dropped whole). Metadata records are
applied in order; DATA records are written home at the end, but only where the final
metadata still maps that file block to that device block, so blocks freed (and maybe
reused) after a DATA record are never overwritten by it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from atomicfs import format as fmt
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem
from atomicfs.metadata import Metadata
from atomicfs.native import crc32c


@dataclass
class ScannedBatch:
    seq: int
    pos: int
    end: int
    records: list[fmt.Record]
    data: list[tuple[int, int, int, int, int]]  # ino, fblock, dblock, nblocks, log_pos


def scan_log(dev: Device, sb: fmt.Superblock) -> Iterator[ScannedBatch]:
    """Valid batches from the tail on, in order; stops at the first torn or stale one."""
    bs = sb.block_size
    size = sb.log_bytes
    pos, seq = sb.log_tail, sb.log_seq
    while True:
        batch = _read_batch(dev, sb, pos, seq)
        if batch is None and pos != 0:
            batch = _read_batch(dev, sb, 0, seq)  # the writer wrapped around
        if batch is None:
            return
        yield batch
        pos, seq = batch.end, seq + 1
        if pos + bs > size:
            pos = 0


def _read_batch(dev: Device, sb: fmt.Superblock, pos: int, seq: int) -> ScannedBatch | None:
    bs = sb.block_size
    if pos + bs > sb.log_bytes:
        return None
    first = dev.read_sync(sb.log_offset + pos, bs)
    hdr = fmt.BatchHeader.unpack(first.bytes(0, fmt.BATCH_HEADER_SIZE))
    if hdr is None or hdr.uuid_tag != sb.uuid_tag or hdr.seq != seq or hdr.pos != pos:
        return None
    total = hdr.total_len
    hdr_area = fmt.header_area_size(hdr.meta_len, bs)
    if total % bs or total < hdr_area or pos + total > sb.log_bytes:
        return None
    whole = dev.read_sync(sb.log_offset + pos, total) if total > bs else first
    raw = bytearray(whole.bytes(0, hdr_area))
    raw[fmt.CRC_FIELD_OFFSET: fmt.CRC_FIELD_OFFSET + 4] = b"\0\0\0\0"
    crc = crc32c(raw)
    crc = whole.crc32c(hdr_area, total - hdr_area, crc)
    if crc != hdr.crc:
        return None
    meta = bytes(raw[fmt.BATCH_HEADER_SIZE: fmt.BATCH_HEADER_SIZE + hdr.meta_len])
    records = []
    data = []
    try:
        for r in fmt.decode_records(meta):
            if r.rtype == fmt.REC_DATA:
                ino, fblock, dblock, nblocks, poff = r.args
                if hdr_area + poff + nblocks * bs > total:
                    raise CorruptFilesystem("data record payload outside its batch")
                data.append((ino, fblock, dblock, nblocks, pos + hdr_area + poff))
            else:
                records.append(r)
    except CorruptFilesystem as exc:
        # Its checksum holds, so this is no torn write (those end the log): the batch was
        # damaged before it was sealed, and what follows it cannot be trusted either.
        raise CorruptFilesystem(f"log batch {seq} at {pos} has a valid checksum but bad "
                                f"records ({exc})") from exc
    return ScannedBatch(seq, pos, pos + total, records, data)


@dataclass
class ReplayResult:
    batches: int = 0
    records: int = 0
    data_records: int = 0
    data_blocks_written: int = 0
    head_pos: int = 0
    head_seq: int = 0
    # DATA records replayed: ino, file block, device block, blocks, position in the log
    data: list[tuple[int, int, int, int, int]] = field(default_factory=list)


def replay(dev: Device, sb: fmt.Superblock, md: Metadata, write_home: bool) -> ReplayResult:
    """Apply the log to metadata loaded from the snapshot; with write_home, also write the
    surviving DATA records to their home blocks (and flush)."""
    res = ReplayResult(head_pos=sb.log_tail, head_seq=sb.log_seq)
    for batch in scan_log(dev, sb):
        for r in batch.records:
            try:
                md.apply(r)
            except CorruptFilesystem as exc:
                raise CorruptFilesystem(
                    f"log batch {batch.seq} does not apply to the metadata: {exc}") from exc
        res.data.extend(batch.data)
        res.batches += 1
        res.records += len(batch.records) + len(batch.data)
        res.data_records += len(batch.data)
        res.head_pos, res.head_seq = batch.end, batch.seq + 1
    if res.head_pos + sb.block_size > sb.log_bytes:
        res.head_pos = 0
    if write_home:
        write_data_home(dev, sb, md, res)
    return res


def write_data_home(dev: Device, sb: fmt.Superblock, md: Metadata, res: ReplayResult) -> None:
    """Write the replayed DATA records that the metadata still maps to their home blocks
    (call only on metadata that passed its checks: the blocks must be in the data area)."""
    bs = sb.block_size
    for dblock, src, n in surviving_data(sb, md, res.data):
        buf = dev.read_sync(src, n * bs)
        dev.writev_sync(dblock * bs, [(buf, 0, n * bs)], "data")
        res.data_blocks_written += n
    if res.data:
        dev.flush_sync()


def surviving_data(sb: fmt.Superblock, md: Metadata,
                   data: list[tuple[int, int, int, int, int]]) -> list[tuple[int, int, int]]:
    """(device block, byte offset of the logged copy on the device, blocks) of every DATA
    record piece whose file block the metadata still maps to that device block, in log
    order (a later piece for the same block is newer)."""
    bs = sb.block_size
    out: list[tuple[int, int, int]] = []
    for ino, fblock, dblock, nblocks, log_pos in data:
        inode = md.inodes.get(ino)
        if inode is None or inode.extents is None:
            continue
        for f, d, n in inode.extents.runs(fblock, nblocks):
            if d is None or d != dblock + (f - fblock):
                continue  # unmapped or remapped since: this record was revoked
            out.append((d, sb.log_offset + log_pos + (f - fblock) * bs, n))
    return out
