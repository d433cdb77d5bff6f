"""Damage an image the way a bad sector or a bug would: bit flips in the superblock, the
metadata snapshot or a log batch, with the checksums recomputed (so that only the
consistency checks can find them) or left alone (so that the checksum must).

Each function changes the image file in place and returns the (offset, old bytes) it
overwrote, so that `restore` puts the image back without copying it."""
from __future__ import annotations

import random
import struct

from atomicfs import format as fmt
from atomicfs.native import crc32c

Undo = list[tuple[int, bytes]]


def read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: str, offset: int, data: bytes) -> Undo:
    old = read_at(path, offset, len(data))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return [(offset, old)]


def restore(path: str, undo: Undo) -> None:
    for offset, old in reversed(undo):
        write_at(path, offset, old)


def slots(path: str) -> list[fmt.Superblock | None]:
    head = read_at(path, 0, 2 * 4096)
    out: list[fmt.Superblock | None] = []
    for off in (0, 4096):
        try:
            out.append(fmt.Superblock.unpack(head[off: off + 4096]))
        except Exception:  # noqa: BLE001 - an invalid slot
            out.append(None)
    return out


def newest(path: str) -> fmt.Superblock:
    return max((s for s in slots(path) if s is not None), key=lambda s: s.seq)


def flip(data: bytearray, rng: random.Random, start: int, end: int, nbits: int) -> None:
    for _ in range(nbits):
        pos = rng.randrange(start, end)
        data[pos] ^= 1 << rng.randrange(8)


# ---------------------------------------------------------------------- superblock

def damage_superblock(path: str, rng: random.Random, recompute: bool = True,
                      nbits: int = 1) -> Undo:
    """Flip bits in the body of the newest slot (and recompute its CRC)."""
    sb = newest(path)
    off = (sb.seq % fmt.SB_SLOTS) * sb.block_size
    raw = bytearray(read_at(path, off, fmt.MIN_BLOCK_SIZE))
    size = struct.unpack_from("<I", raw, 12)[0]
    flip(raw, rng, 16, size, nbits)  # past magic, version and size: the fields
    if recompute:
        raw[size: size + 4] = struct.pack("<I", crc32c(bytes(raw[:size])))
    return write_at(path, off, bytes(raw))


# ------------------------------------------------------------------------ snapshot

def snapshot_payload(path: str, block: int, bs: int) -> tuple[fmt.SnapshotHeader, bytearray]:
    header = fmt.SnapshotHeader.unpack(read_at(path, block * bs, bs))
    payload = bytearray()
    for dblock, count in header.extents:
        payload += read_at(path, dblock * bs, count * bs)
    return header, payload


def write_snapshot(path: str, header: fmt.SnapshotHeader, payload: bytearray,
                   bs: int) -> Undo:
    payload[:bs] = header.pack(bs)
    undo: Undo = []
    off = 0
    for dblock, count in header.extents:
        undo += write_at(path, dblock * bs, bytes(payload[off: off + count * bs]))
        off += count * bs
    return undo


def damage_snapshot(path: str, rng: random.Random, recompute: bool = True,
                    nbits: int = 1, previous: bool = False) -> Undo:
    """Flip bits in the record stream of the newest (or the previous) snapshot; with
    recompute, fix the payload and header checksums so the records are read."""
    sb = newest(path)
    bs = sb.block_size
    block = sb.prev_snap_block if previous else sb.snap_block
    header, payload = snapshot_payload(path, block, bs)
    flip(payload, rng, bs, bs + header.length, nbits)
    if recompute:
        header.payload_crc = crc32c(bytes(payload[bs: bs + header.length]))
    return write_snapshot(path, header, payload, bs)


def damage_snapshot_header(path: str, rng: random.Random) -> Undo:
    """Flip a bit in the snapshot header's fields (length, extents...) and re-seal it."""
    sb = newest(path)
    bs = sb.block_size
    raw = bytearray(read_at(path, sb.snap_block * bs, bs))
    n = struct.unpack_from("<I", raw, 48)[0]
    end = 56 + 12 * n  # the fixed fields (56 bytes), then the extents
    flip(raw, rng, 24, end, 1)  # past magic and uuid
    n2 = struct.unpack_from("<I", raw, 48)[0]
    end2 = 56 + 12 * min(n2, fmt.SnapshotHeader.max_extents(bs))
    raw[end2: end2 + 4] = struct.pack("<I", crc32c(bytes(raw[:end2])))
    return write_at(path, sb.snap_block * bs, bytes(raw))


# ----------------------------------------------------------------------------- log

def log_batches(path: str) -> list[tuple[int, fmt.BatchHeader]]:
    """(device offset, header) of the valid-looking batches from the tail on."""
    sb = newest(path)
    out = []
    pos, seq = sb.log_tail, sb.log_seq
    while pos + sb.block_size <= sb.log_bytes:
        hdr = fmt.BatchHeader.unpack(read_at(path, sb.log_offset + pos,
                                             fmt.BATCH_HEADER_SIZE))
        if hdr is None or hdr.seq != seq or hdr.pos != pos:
            break
        out.append((sb.log_offset + pos, hdr))
        pos, seq = pos + hdr.total_len, seq + 1
    return out


def damage_log(path: str, rng: random.Random, recompute: bool = True,
               nbits: int = 1) -> Undo:
    """Flip bits in the header area (batch header fields or metadata records) of one log
    batch, and recompute its CRC."""
    batches = log_batches(path)
    assert batches, "the image has no log to damage"
    off, hdr = rng.choice(batches)
    raw = bytearray(read_at(path, off, hdr.total_len))
    meta_end = fmt.BATCH_HEADER_SIZE + hdr.meta_len
    # mostly the records; now and then the header's own fields (not magic or crc)
    start = 8 if rng.random() < 0.2 else fmt.BATCH_HEADER_SIZE
    flip(raw, rng, start, max(start + 1, meta_end), nbits)
    if recompute:
        new = fmt.BatchHeader.unpack(bytes(raw[: fmt.BATCH_HEADER_SIZE]))
        if new is not None:
            area = fmt.header_area_size(new.meta_len, 4096)
            if area <= len(raw):
                raw[fmt.CRC_FIELD_OFFSET: fmt.CRC_FIELD_OFFSET + 4] = bytes(4)
                crc = crc32c(bytes(raw[:area]))
                crc = crc32c(bytes(raw[area:]), crc)
                raw[fmt.CRC_FIELD_OFFSET: fmt.CRC_FIELD_OFFSET + 4] = struct.pack("<I", crc)
    return write_at(path, off, bytes(raw))
