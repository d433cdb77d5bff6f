"""Bringing a filesystem at rest back into memory: shared by mount, fsck and repair.

Order: the newest valid superblock slot; its metadata snapshot; the log replayed on top;
then `check_metadata`, before anything is written (replayed atomic data goes home only
into blocks the checked metadata maps).

The previous checkpoint is kept as a fallback: its snapshot blocks are not reused until a
newer checkpoint is durable, and blocks freed since it covered the log stay held (alloc.py),
so its files still map their own data (`check_metadata` verifies that no file maps a block
a kept snapshot gave to another). When the newest snapshot is unreadable (its header or
its checksum), recovery loads the previous one instead. The log batches
after the newest checkpoint are changes to the lost snapshot, so they are not replayed:
what was made durable after the previous checkpoint is lost, and `Recovered.lost` says so
(with the names the skipped log batches created). Everything durable before the previous
checkpoint is there. A snapshot that reads well but whose records contradict each other is
not a reason to fall back: mount refuses it and fsck names it (--repair fixes it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from atomicfs import format as fmt
from atomicfs.alloc import Allocator
from atomicfs.consistency import CheckResult, check_metadata
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem
from atomicfs.metadata import Extent, Metadata
from atomicfs.native import Segment
from atomicfs.replay import ReplayResult, replay, scan_log
from atomicfs.superblock import (fallback_superblock, read_previous_snapshot, read_snapshot,
                                 superblock_slot_problems)

SLOT_NAMES = "AB"


@dataclass
class Recovered:
    sb: fmt.Superblock  # as the mount uses it (after a fallback: the previous checkpoint)
    md: Metadata
    snap_extents: list[Extent]
    kept_extents: list[Extent]  # the previous snapshot's blocks, kept as the fallback
    result: ReplayResult
    check: CheckResult
    fallback: str | None = None  # why the newest snapshot was not used
    lost: list[str] = field(default_factory=list)
    slot_problems: list[str] = field(default_factory=list)
    kept_problem: str | None = None  # the previous snapshot is unreadable: no fallback
    # (ino, file block, device block, count) of every extent the kept snapshots map
    kept_refs: list[tuple[int, int, int, int]] = field(default_factory=list)


def when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ns / 1e9)) if ns else "?"


def recover(dev: Device, sb: fmt.Superblock, salvage: bool = False) -> Recovered:
    """Load sb's filesystem into memory and check it; writes nothing. CorruptFilesystem
    when neither snapshot can be loaded or the log does not apply (with salvage, for
    repair: the log is replayed up to the first batch that does not apply, and the rest
    is named in `lost`)."""
    slots = [f"superblock slot {SLOT_NAMES[i]}: {why}"
             for i, why in superblock_slot_problems(dev, sb)]
    md = Metadata(sb.block_size)
    fallback: str | None = None
    try:
        stream, extents = read_snapshot(dev, sb)
    except CorruptFilesystem as exc:
        # Unreadable (a bad sector, a torn header): fall back. A snapshot that reads but
        # does not make sense is damage for fsck to name, not a reason to go back in time.
        if not sb.prev_snap_block:
            raise
        fallback = str(exc)
        try:
            stream, extents = read_previous_snapshot(dev, sb)
        except CorruptFilesystem as exc2:
            raise CorruptFilesystem(f"{exc}; the previous checkpoint's snapshot too: "
                                    f"{exc2}") from exc2
    skipped = _load_salvage(md, stream, sb) if salvage else _load(md, stream, sb)
    refs = [snapshot_refs(stream)] if not skipped else []
    kept: list[Extent] = []
    kept_problem = None
    lost: list[str] = []
    if fallback is None:
        try:
            result = replay(dev, sb, md, write_home=False)
        except CorruptFilesystem:
            if not salvage:
                raise
            md, result, lost = _replay_prefix(dev, sb, stream)
        if sb.prev_snap_block:
            try:
                prev_stream, kept = read_previous_snapshot(dev, sb)
                refs.append(snapshot_refs(prev_stream))
            except CorruptFilesystem as exc:
                kept_problem = f"the previous checkpoint's snapshot (the fallback): {exc}"
    else:
        result, lost = _skip_log(dev, sb)
        sb = fallback_superblock(sb)
    if skipped:
        lost.insert(0, f"{skipped} records of the snapshot that do not apply (or follow one "
                    "that does not parse)")
    check = check_metadata(sb, md, extents, kept, refs)
    return Recovered(sb, md, list(extents), list(kept), result, check, fallback, lost, slots,
                     kept_problem, [r for snap in refs for r in snap])


def _load(md: Metadata, stream: bytes, sb: fmt.Superblock) -> int:
    md.load(stream)
    md.next_ino = max(md.next_ino, sb.next_ino)
    if fmt.ROOT_INO not in md.inodes:
        raise CorruptFilesystem("the root directory is missing")
    return 0


def _load_salvage(md: Metadata, stream: bytes, sb: fmt.Superblock) -> int:
    """For repair: every snapshot record that applies, up to the first that does not
    parse; returns how many were skipped or not read (what is left is for the fixes)."""
    skipped = 0
    try:
        for r in fmt.decode_records(stream):
            try:
                md.apply(r)
            except CorruptFilesystem:
                skipped += 1
    except CorruptFilesystem:
        skipped += 1
    md.next_ino = max(md.next_ino, sb.next_ino)
    return skipped


def snapshot_refs(stream: bytes) -> list[tuple[int, int, int, int]]:
    """(ino, file block, device block, count) of every extent a snapshot maps."""
    return [r.args for r in fmt.decode_records(stream) if r.rtype == fmt.REC_EXTENT_SET]


def _replay_prefix(dev: Device, sb: fmt.Superblock,
                   stream: bytes) -> tuple[Metadata, ReplayResult, list[str]]:
    """The snapshot and the log batches before the first that does not apply (or does not
    parse); the head stays after every batch found, so none is read as a continuation."""
    batches = []
    damaged = False
    try:
        for batch in scan_log(dev, sb):
            batches.append(batch)
    except CorruptFilesystem:
        damaged = True
    md = Metadata(sb.block_size)
    _load_salvage(md, stream, sb)
    good = 0
    try:
        for batch in batches:
            for r in batch.records:
                md.apply(r)
            good += 1
    except CorruptFilesystem:
        md = Metadata(sb.block_size)  # batch `good` applied in part: start again
        _load_salvage(md, stream, sb)
        for batch in batches[:good]:
            for r in batch.records:
                md.apply(r)
    res = ReplayResult(head_pos=sb.log_tail, head_seq=sb.log_seq)
    for batch in batches[:good]:
        res.data.extend(batch.data)
        res.batches += 1
        res.records += len(batch.records) + len(batch.data)
    if batches:
        res.head_pos, res.head_seq = batches[-1].end, batches[-1].seq + 1
        if res.head_pos + sb.block_size > sb.log_bytes:
            res.head_pos = 0
    if damaged:
        res.head_seq += 1  # the damaged batch lies at the head with this number: skip it
    dropped = len(batches) - good
    lost = [f"{dropped} log batches from batch {sb.log_seq + good} on, which do not apply "
            "to the metadata (or were not found after a damaged one)"] if dropped else \
        ["the log after a damaged batch"]
    return md, res, lost


def _skip_log(dev: Device, sb: fmt.Superblock) -> tuple[ReplayResult, list[str]]:
    """After a fallback: find the log's head (new batches go after the old ones, which
    must never read as a continuation) and name what the skipped batches held."""
    res = ReplayResult(head_pos=sb.log_tail, head_seq=sb.log_seq)
    names: list[bytes] = []
    try:
        for batch in scan_log(dev, sb):
            res.batches += 1
            res.records += len(batch.records) + len(batch.data)
            res.head_pos, res.head_seq = batch.end, batch.seq + 1
            names += [r.args[1] for r in batch.records if r.rtype == fmt.REC_DIRENT_ADD]
    except CorruptFilesystem:
        res.head_seq += 1  # the damaged batch lies at the head with this number: skip it
    if res.head_pos + sb.block_size > sb.log_bytes:
        res.head_pos = 0
    lost = [f"changes made after the previous checkpoint ({when(sb.prev_ckpt_time_ns)}): "
            f"those the newest checkpoint ({when(sb.ckpt_time_ns)}) held, and "
            f"{res.batches} log batches ({res.records} records) written after it"]
    if names:
        shown = ", ".join(repr(n.decode(errors="replace")) for n in sorted(set(names))[:10])
        more = len(set(names)) - 10
        lost.append(f"names created or renamed in those log batches: {shown}"
                    + (f" and {more} more" if more > 0 else ""))
    return res, lost


def hold_kept_blocks(alloc: Allocator, rec: Recovered) -> None:
    """Blocks the kept checkpoints map but no file uses now stay out of reach until a
    checkpoint covering this mount's start is the fallback (see alloc.py)."""
    sb = rec.sb
    alloc.fallback_boundary = sb.prev_log_seq - 1 if sb.prev_snap_block else 0
    seq = rec.result.head_seq - 1
    for _ino, _fblock, dblock, count in rec.kept_refs:
        if dblock < sb.data_start or dblock + count > sb.total_blocks or count <= 0:
            continue
        used = alloc.is_used(dblock, count)
        if used == count:
            continue
        if used == 0:
            alloc.hold(seq, [(dblock, count)])
            continue
        for b in range(dblock, dblock + count):
            if not alloc.is_used(b):
                alloc.hold(seq, [(b, 1)])


class LogOverlay:
    """A read-only mount replays the log without writing atomic data home: reads of the
    device blocks whose newest copy is in the log are served from the log instead.
    Everything else is the device's."""

    def __init__(self, dev: Device, block_size: int,
                 pieces: list[tuple[int, int, int]]) -> None:
        self._dev = dev
        self._bs = block_size
        self._src: dict[int, int] = {}  # device block -> byte offset of its logged copy
        for dblock, src, n in pieces:  # in log order: later pieces are newer
            for i in range(n):
                self._src[dblock + i] = src + i * block_size

    def __getattr__(self, name: str) -> object:
        return getattr(self._dev, name)

    async def readv(self, offset: int, segments: list[Segment]) -> None:
        await self._dev.readv(offset, segments)
        if not self._src:
            return
        bs = self._bs
        pos = offset
        for buf, off, n in segments:
            for k in range(0, n, bs):
                src = self._src.get((pos + k) // bs)
                if src is not None:
                    await self._dev.readv(src, [(buf, off + k, bs)])
            pos += n
