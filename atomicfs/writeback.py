"""Writeback: what goes out, when and how.

Routing of a dirty folio:

* atomic, and the device can write the unit untorn (hardware path): one
  pwritev2(RWF_ATOMIC) of exactly the unit, in place, from the folio buffer, at a
  unit-aligned device address (a unit mapped elsewhere moves to an aligned extent, and the
  remap commits with the metadata);
* atomic without hardware support, or *resident* (its newest copy is in the log): its
  blocks are copied into a DATA record of the log (software path); the log write is one
  sequential device write, and a checkpoint writes the home copy later;
* anything else: the dirty blocks are written in place, adjacent folios merged into large
  O_DIRECT writes; blocks without a home get one now (delayed allocation) and the mapping is
  committed after the data is on the device.

Write-through runs the same routing at once for the blocks a write just copied, holds those
folios under stable writeback until the data is durable, and only then lets the write
return. While any write-through is in flight on a file, writers to a folio under writeback
wait (stable pages).

A failed background write is recorded in the mapping (errseq) and reported by the next
fsync of every descriptor; the blocks stay dirty and are retried, up to a limit after which
the error stays and the data is given up (as Linux does), so that a dead device never hangs
writers.
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field

import trio

from atomicfs.alloc import Allocator
from atomicfs.checkpoint import Checkpointer
from atomicfs.device import Device
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.journal import Journal, LogFailed
from atomicfs.metadata import ExtentMap, Inode, Metadata
from atomicfs.native import MAX_IOV, Buffer, Segment
from atomicfs.pagecache import (Folio, Mapping, PageCache, WriteGroup, mask_range, mask_runs,
                                popcount)
from atomicfs.stats import Counters
from atomicfs.watchdog import Watchdog

log = logging.getLogger(__name__)

MAX_IO_BYTES = 4 << 20
MAX_WB_RETRIES = 3
# A synchronous write (fsync, write-through) of at most this much data into blocks that
# have no home yet goes into the log: one device write and one flush, instead of a data
# write, a flush ordering it before the batch that maps it, the batch, and a flush.
SMALL_SYNC_LOG_BYTES = 256 << 10


@dataclass
class WritebackPolicy:
    atomic_path: str = "auto"  # auto, hardware, software
    dirty_expire: float = 30.0
    debug: bool = False
    unsafe_atomic: bool = False  # crash-test control: atomic folios go out unprotected


@dataclass
class _InPlaceIO:
    """One device write: consecutive device blocks, gathered from folio buffers."""

    dblock: int
    nblocks: int = 0
    segments: list[Segment] = field(default_factory=list)
    parts: list[tuple[Folio, int]] = field(default_factory=list)  # folio, block mask
    new_extents: list[tuple[int, int, int]] = field(default_factory=list)  # fblock, dblock, n


def extents_of(inode: Inode) -> ExtentMap:
    """The extent map of a regular file (what every data path works on)."""
    if inode.extents is None:
        raise TypeError(f"inode {inode.ino} is not a regular file")
    return inode.extents


class WriteOutcome:
    __slots__ = ("failed", "logged_seq", "meta_changed", "flush_gen", "error", "flush")

    def __init__(self, flush: bool = True) -> None:
        self.flush = flush  # a write-through may flush the device cache (not RFC mode)
        self.failed = False
        self.logged_seq = -1
        self.meta_changed = False
        self.flush_gen = -1
        self.error: BaseException | None = None


class Writeback:
    """The FolioIO of the page cache, and the flusher task."""

    def __init__(self, dev: Device, md: Metadata, alloc: Allocator, journal: Journal,
                 cache: PageCache, checkpointer: Checkpointer, counters: Counters,
                 policy: WritebackPolicy,
                 watchdog: Watchdog | None = None) -> None:
        self.dev = dev
        self.md = md
        self.alloc = alloc
        self.journal = journal
        self.cache = cache
        self.checkpointer = checkpointer
        self.counters = counters
        self.policy = policy
        self.bs = md.block_size
        self.dirty_limit = cache.limit // 2
        self.background_bytes = cache.limit // 4
        self._flusher_wake = trio.Event()
        self._wb_failures: dict[tuple[int, int], int] = {}
        self.watchdog = watchdog or Watchdog()

    # ------------------------------------------------------------------ routing

    def hardware_ok(self, unit: int) -> bool:
        """Can this unit go out as one RWF_ATOMIC write on this device?"""
        caps = self.dev.caps
        return (self.policy.atomic_path != "software" and caps.atomic_unit_min > 0
                and caps.atomic_unit_min <= unit <= caps.atomic_unit_max)

    def atomic_path_of(self, unit: int) -> str | None:
        if unit <= 0:
            return None
        return "hardware" if self.hardware_ok(unit) else "software"

    # ---------------------------------------------------------------- FolioIO: reads

    async def read_folios(self, inode: Inode, m: Mapping,
                          needs: list[tuple[Folio, int]]) -> None:
        """Fill the blocks in each mask from the device (holes read as zeros)."""
        bs = self.bs
        locked: list[tuple[Folio, int]] = []
        for folio, mask in needs:
            if folio.locked:
                continue  # somebody else fills it; the caller looks again
            self.cache.lock(folio)
            locked.append((folio, mask & ~folio.uptodate & ~folio.dirty))
        try:
            ios: list[tuple[int, list[Segment], list[tuple[Folio, int]]]] = []
            for folio, mask in locked:
                for b, n in mask_runs(mask):
                    for f, d, k in extents_of(inode).runs(folio.fblock + b, n):
                        fb = f - folio.fblock
                        part = mask_range(fb, k)
                        if d is None:
                            folio.buf.zero(fb * bs, k * bs)
                            folio.uptodate |= part
                            continue
                        seg: Segment = (folio.buf, fb * bs, k * bs)
                        last = ios[-1] if ios else None
                        if last is not None and last[0] + sum(x[2] for x in last[1]) // bs == d \
                                and len(last[1]) < MAX_IOV:
                            last[1].append(seg)
                            last[2].append((folio, part))
                        else:
                            ios.append((d, [seg], [(folio, part)]))
            for dblock, segments, parts in ios:
                try:
                    await self.dev.readv(dblock * bs, segments)
                except DeviceError as exc:
                    raise OSError(errno.EIO, f"read error: {exc}") from exc
                for folio, part in parts:
                    folio.uptodate |= part & ~folio.dirty
        finally:
            for folio, _ in locked:
                self.cache.unlock(folio)

    # ----------------------------------------------------------- FolioIO: dirtying

    def reserve_for_write(self, inode: Inode, m: Mapping,
                          items: list[tuple[Folio, int]]) -> None:
        """Reserve space for blocks about to become dirty that have no device block."""
        need: list[tuple[Folio, int]] = []
        total = 0
        for folio, mask in items:
            new = mask & ~folio.reserved & ~folio.dirty
            if not new:
                continue
            unmapped = 0
            for b, n in mask_runs(new):
                for f, d, k in extents_of(inode).runs(folio.fblock + b, n):
                    if d is None:
                        unmapped |= mask_range(f - folio.fblock, k)
            if unmapped:
                need.append((folio, unmapped))
                total += popcount(unmapped)
        if total:
            # extents mapped by writeback since the last estimate have grown the snapshot
            self.alloc.set_snapshot_estimate(self.md.snapshot_bytes, self.bs)
            self.alloc.reserve(total)  # NoSpace propagates: nothing has changed yet
            for folio, mask in need:
                self.cache.reserve_blocks(folio, mask)

    async def make_room(self) -> bool:
        """Try to free space for a write that hit ENOSPC: commit the log so that blocks
        freed by recent deletes become usable, and checkpoint for those held for the
        fallback checkpoint (alloc.py; two checkpoints make them reusable). Returns
        whether anything could help."""
        if self.alloc.pending_blocks == 0:
            return False
        await self.journal.commit()
        for _ in range(2):
            if not self.alloc.held_blocks or self.journal.failed is not None:
                break
            await self.checkpointer.checkpoint()
        return True

    def _over_dirty_limit(self) -> bool:
        """Dirty data, or memory that eviction cannot drop (dirty, under I/O, logged
        folios: a folio's buffer may be larger than its dirty blocks), past the limit."""
        c = self.cache
        return c.dirty_bytes + c.writeback_bytes > self.dirty_limit or \
            c.pinned_bytes > self.dirty_limit

    async def balance_dirty(self) -> None:
        """Throttle writers at the dirty limit; never fail them."""
        while self._over_dirty_limit():
            if self.journal.failed is not None:  # nothing will be written back: no wait
                raise OSError(errno.EIO, "the log cannot be written")
            self.counters.throttle_waits += 1
            if self.cache.logged_bytes > self.cache.limit // 4:
                self.checkpointer.request_checkpoint()  # only a checkpoint releases those
            self.kick_flusher()
            ev = self.cache.dirty_changed
            with trio.move_on_after(1.0):
                await ev.wait()

    def kick_flusher(self) -> None:
        self._flusher_wake.set()

    # ------------------------------------------------------------------ submission

    async def write_folios(self, inode: Inode, m: Mapping, items: list[tuple[Folio, int]],
                           writethrough: bool = False, sync: bool = False,
                           flush: bool = True) -> WriteOutcome:
        """Write the given dirty blocks by the right path; waits for the device writes
        (and, for writethrough, for the log batch) but does not flush. sync: the caller
        makes the data durable at once (fsync, write-through). flush=False: a
        write-through of the RFC kind, which must not flush the device cache either."""
        out = WriteOutcome(flush)
        if sync or writethrough:
            # A folio under I/O is skipped below. One under a checkpoint's home copy (of
            # its logged, clean blocks) may still have other dirty blocks: wait, so that
            # this call writes them, or fsync would return without them.
            await self._wait_idle([f for f, _ in items])
        hw: list[Folio] = []
        logged: list[tuple[Folio, int]] = []
        inplace: list[tuple[Folio, int]] = []
        groups: dict[int, WriteGroup] = {}
        for folio, mask in items:
            if folio.group is not None:
                if not self.policy.unsafe_atomic:
                    groups[id(folio.group)] = folio.group  # all members, one batch
                    continue
                folio.group.dissolve(0)  # crash-test control: no protection
            mask &= folio.dirty
            if not mask or folio.writeback or folio.locked:
                continue
            if self.journal.is_resident(m.ino, folio.index):
                logged.append((folio, mask))  # even unprotected: replay would roll it back
            elif folio.atomic and self.policy.unsafe_atomic:
                inplace.append((folio, mask))
            elif folio.atomic:
                (hw.append(folio) if self.hardware_ok(m.folio_size)
                 else logged.append((folio, folio.dirty)))
            else:
                inplace.append((folio, mask))
        if (sync or writethrough) and inplace and self._small_new_data(inode, inplace):
            logged += inplace
            inplace = []
        holds: list[tuple[Folio, bool]] = []
        try:
            for group in groups.values():
                await self._write_group(inode, m, group, out, writethrough, holds)
            for folio in hw:
                if not await self._write_atomic_hardware(inode, m, folio, out, writethrough):
                    logged.append((folio, folio.dirty))
            for folio, mask in logged:
                await self._write_logged(inode, m, folio, mask, out, writethrough, holds)
            if inplace:
                inplace = await self._still_dirty(m, inplace, out)
            # A whole-unit write may have made one of them atomic meanwhile: that one must
            # not go out in place (a crash would tear it) but by an atomic path; nor may a
            # folio that another task logged meanwhile (replay would roll it back).
            retagged = [f for f, _ in inplace
                        if ((f.atomic or f.group is not None) and not self.policy.unsafe_atomic)
                        or self.journal.is_resident(m.ino, f.index)]
            inplace = [(f, mask) for f, mask in inplace if f not in retagged]
            if inplace:
                await self._write_in_place(inode, m, inplace, out, writethrough)
            for folio in retagged:
                if folio.group is not None:
                    await self._write_group(inode, m, folio.group, out, writethrough, holds)
                    continue
                if not self.journal.is_resident(m.ino, folio.index) and \
                        self.hardware_ok(m.folio_size) and \
                        await self._write_atomic_hardware(inode, m, folio, out, writethrough):
                    continue
                await self._write_logged(inode, m, folio, folio.dirty, out, writethrough,
                                         holds)
            if writethrough and out.logged_seq >= 0:
                await self.journal.commit(out.logged_seq)
        except LogFailed as exc:
            out.failed = True
            out.error = exc
        finally:
            for folio, was_atomic in holds:
                failed = out.failed and self.journal.failed is not None
                self.cache.end_writeback(folio, folio.wb_mask if failed else 0,
                                         restore_atomic=was_atomic and failed)
            self.cache.trim()  # what went out clean may go now if the cache is over
        return out

    @staticmethod
    async def _wait_idle(folios: list[Folio]) -> bool:
        """Return when none of the folios is locked or under writeback (in one step with
        what the caller does next, if that does not await); whether any was."""
        waited = False
        while True:
            busy = [f for f in folios if f.writeback or f.locked]
            if not busy:
                return waited
            waited = True
            for folio in busy:
                while folio.writeback or folio.locked:
                    await folio.wait_unlocked_or_written()

    async def _still_dirty(self, m: Mapping, items: list[tuple[Folio, int]],
                           out: WriteOutcome) -> list[tuple[Folio, int]]:
        """Writing the other folios awaited, so another task may have started writing
        some of these meanwhile: wait for that (fsync and write-through must cover it),
        then keep only blocks still dirty. Returns when none is busy, so that planning
        and starting the writes that follow happen in one step."""
        if await self._wait_idle([f for f, _ in items]):
            m.flush_gen = out.flush_gen = max(out.flush_gen, m.flush_gen)
        return [(f, mask & f.dirty) for f, mask in items if mask & f.dirty]

    def _small_new_data(self, inode: Inode, items: list[tuple[Folio, int]]) -> bool:
        """Is this a small write whose blocks have no home yet (an append)?"""
        total = 0
        for folio, mask in items:
            total += popcount(mask) * self.bs
            if total > SMALL_SYNC_LOG_BYTES:
                return False
            for b, n in mask_runs(mask):
                for _, d, _ in extents_of(inode).runs(folio.fblock + b, n):
                    if d is not None:
                        return False
        return total > 0

    async def _write_atomic_hardware(self, inode: Inode, m: Mapping, folio: Folio,
                                     out: WriteOutcome, writethrough: bool) -> bool:
        """One RWF_ATOMIC write of the whole unit; False if it must take the log instead
        (no aligned space for a unit that has to move)."""
        full = mask_range(0, m.blocks_per_folio)
        # Writing the folios before this one awaited: another task may have taken this
        # one meanwhile. Wait for it, then write only what is still dirty; skipping it
        # ("a later writeback takes it") would let fsync return without its data.
        await self._wait_idle([folio])
        if not folio.dirty:
            m.flush_gen = out.flush_gen = max(out.flush_gen, m.flush_gen)
            return True
        if not folio.atomic or folio.dirty != full or folio.group is not None:
            return False  # a partial write cleared the tag (or a group took the folio):
            # the log path writes its blocks
        return await self._write_units_hardware(inode, m, [folio], out, writethrough) \
            is not None

    async def _write_units_hardware(self, inode: Inode, m: Mapping, members: list[Folio],
                                    out: WriteOutcome, writethrough: bool) -> bool | None:
        """One pwritev2(RWF_ATOMIC) of whole consecutive units (one folio, or a write
        group side by side in one buffer: RWF_ATOMIC takes one segment), in place, at a
        device address aligned to the whole: units mapped elsewhere move to an aligned
        extent, and the remap commits with the metadata. None: no aligned space (nothing
        changed; the log must take them); else whether the write succeeded (a failure is
        recorded and the units are dirty and atomic again). Does not await before the
        writeback has started."""
        nb = m.blocks_per_folio * len(members)
        fb = members[0].fblock
        full = mask_range(0, m.blocks_per_folio)
        runs = list(extents_of(inode).runs(fb, nb))
        dblock = runs[0][1] if len(runs) == 1 else None
        moved = dblock is None or dblock % nb != 0
        reserved = sum(popcount(f.reserved) for f in members)
        old_reserved = [f.reserved for f in members]
        if moved:
            try:
                dblock, _ = self.alloc.allocate(nb, goal=runs[0][1] or 0, align=nb,
                                                min_len=nb, reserved=reserved)
            except NoSpace:
                return None
            self.alloc.unreserve(reserved)
            for f in members:
                f.reserved = 0
        assert dblock is not None
        size = nb * self.bs
        if len(members) == 1:
            segment: Segment = (members[0].buf, 0, size)
        else:
            whole = Buffer(size)
            for i, f in enumerate(members):
                whole.copy_from(i * m.folio_size, f.buf, 0, m.folio_size)
            segment = (whole, 0, size)
        for f in members:
            self.cache.start_writeback(f, full, stable=True)
        try:
            # A write-through of units already at home needs nothing but this write to be
            # durable: flush in the same request (moved units wait for their metadata).
            gen = await self._device_write(dblock, [segment], atomic=True, check=members,
                                           durable=writethrough and out.flush and not moved)
        except DeviceError as exc:
            if moved:
                self.alloc.free_now(dblock, nb)
                self.alloc.reserve_again(reserved)
                for f, r in zip(members, old_reserved):
                    f.reserved = r
            self._write_failed(m, [(f, full) for f in members], exc, writethrough, out,
                               restore_atomic=True)
            return False
        if moved:
            self.md.map_extent(inode, fb, dblock, nb)
            self.journal.need_barrier(gen)
            out.meta_changed = True
            m.meta_seq = self.journal.pending_seq
        m.flush_gen = out.flush_gen = max(m.flush_gen, gen)
        self.md.data_written(inode, (fb + nb) * self.bs)
        for f in members:
            self._wb_failures.pop((m.ino, f.index), None)
            self.cache.end_writeback(f)
        self.settle_size(inode, m)
        self.counters.atomic_writebacks_hardware += len(members)
        self.counters.writeback_ios += 1
        self.counters.writeback_bytes += size
        return True

    async def _write_logged(self, inode: Inode, m: Mapping, folio: Folio, mask: int,
                            out: WriteOutcome, hold: bool,
                            holds: list[tuple[Folio, bool]]) -> None:
        """Copy the blocks into DATA records of the pending log batch (software path)."""
        bs = self.bs
        wanted = mask
        while True:
            await self.journal.wait_for_room(popcount(wanted) * bs + 256)
            if folio.group is not None:  # a write made it part of a group meanwhile
                await self._write_group(inode, m, folio.group, out, hold, holds)
                return
            # From here to the end nothing awaits: the copy, the records and the state
            # change are one step.
            # An atomic folio goes into the log whole, even if it was partly dirty when it
            # was picked and a whole-unit write has made it atomic since.
            mask = folio.dirty if folio.atomic else wanted & folio.dirty
            if mask and not (folio.writeback or folio.locked):
                break
            # Another task took the folio while we waited for room: a write-through must
            # still wait for the batch (or device write) that carries its blocks, and
            # blocks still dirty after that (a checkpoint's home copy takes none) are
            # ours to write.
            await self._wait_idle([folio])
            out.logged_seq = max(out.logged_seq, folio.logged_seq)
            m.flush_gen = out.flush_gen = max(out.flush_gen, m.flush_gen)
            if not (folio.dirty if folio.atomic else wanted & folio.dirty):
                return
        try:
            homes, _ = self._homes_for(inode, folio, mask)
        except NoSpace:
            log.warning("no space to log inode %d folio %d", m.ino, folio.index)
            return
        self._log_now(inode, m, folio, mask, homes, out, hold, holds)

    async def write_group(self, inode: Inode, m: Mapping, group: WriteGroup) -> None:
        """FolioIO: a write is about to change a member of a pending write group: the group
        goes into the log first (NoSpace if it cannot)."""
        if self.policy.unsafe_atomic:
            group.dissolve(0)
            return
        out = WriteOutcome()
        await self._write_group(inode, m, group, out, False, [])
        if out.error is not None:
            raise out.error
        if group.pending:
            raise NoSpace("no space to log a write group")

    async def _write_group(self, inode: Inode, m: Mapping, group: WriteGroup,
                           out: WriteOutcome, hold: bool,
                           holds: list[tuple[Folio, bool]]) -> None:
        """Log every dirty block of every member of a write group in one batch: the batch
        is checksummed whole, so replay applies all of the write or none of it; a
        checkpoint writes the members home only once the batch is durable (and a crash
        during those home writes replays the whole batch again)."""
        bs = self.bs
        if self._group_hardware_ok(inode, m, group) and \
                await self._write_group_hardware(inode, m, group, out, writethrough=hold):
            return
        while True:
            if not group.pending:  # another task wrote it: wait for that batch if asked
                out.logged_seq = max(out.logged_seq, group.seq)
                m.flush_gen = out.flush_gen = max(out.flush_gen, m.flush_gen)
                return
            need = sum(popcount(f.dirty) for f in group.folios) * bs + 256 * len(group.folios)
            # max_batch holds the largest group (1 MiB of data and its records)
            await self.journal.wait_for_room(need)
            if not group.pending:
                continue
            busy = [f for f in group.folios if f.writeback or f.locked]
            if not busy:
                break
            await self._wait_idle(busy)
        # From here on nothing awaits: every member lands in the pending batch.
        members = [f for f in group.folios if f.dirty]
        done: list[tuple[Folio, int, list[tuple[int, int, int]], int]] = []
        try:
            for folio in members:
                old_reserved = folio.reserved
                homes, unreserved = self._homes_for(inode, folio, folio.dirty)
                done.append((folio, old_reserved, homes, unreserved))
        except NoSpace:
            for folio, old_reserved, homes, unreserved in done:  # all or nothing
                for _, dblock, count in homes:
                    self.alloc.free_now(dblock, count)
                self.alloc.reserve_again(unreserved)
                folio.reserved = old_reserved
            log.warning("no space to log a write group of inode %d", m.ino)
            return
        seq = self.journal.pending_seq
        for folio, _, homes, _ in done:
            seq = self._log_now(inode, m, folio, folio.dirty, homes, out, hold, holds)
        group.dissolve(seq)
        self.counters.atomic_groups_logged += 1

    def _group_hardware_ok(self, inode: Inode, m: Mapping, group: WriteGroup) -> bool:
        """Can the group go out as one RWF_ATOMIC write: k whole, consecutive, atomic
        units of the file, k * U a power of two the device writes untorn, none of them
        resident in the log (replay would roll a newer in-place copy back)?"""
        members = group.folios
        k = len(members)
        size = k * m.folio_size
        if not group.pending or k < 2 or not m.atomic or size & (size - 1) or \
                not self.hardware_ok(size):
            return False
        full = mask_range(0, m.blocks_per_folio)
        first = min(f.index for f in members)
        if first % k or {f.index for f in members} != set(range(first, first + k)):
            return False
        return all(f.atomic and f.dirty == full and not self.journal.is_resident(m.ino, f.index)
                   for f in members)

    async def _write_group_hardware(self, inode: Inode, m: Mapping, group: WriteGroup,
                                    out: WriteOutcome, writethrough: bool) -> bool:
        """The hardware path of a write group (see _write_units_hardware). False: the log
        path must take it (no aligned space, or the folios changed while we waited)."""
        await self._wait_idle(group.folios)
        if not self._group_hardware_ok(inode, m, group):
            return False
        members = sorted(group.folios, key=lambda f: f.index)
        group.dissolve(0)  # taken: nothing else may write its units meanwhile
        done = await self._write_units_hardware(inode, m, members, out, writethrough)
        if done:
            self.counters.atomic_groups_hardware += 1
            return True
        full = mask_range(0, m.blocks_per_folio)
        group.seq = -1  # not written (no room, or failed): still one write
        for f in members:
            if f.dirty == full:
                f.group = group
        return done is not None

    def _homes_for(self, inode: Inode, folio: Folio, mask: int
                   ) -> tuple[list[tuple[int, int, int]], int]:
        """Device blocks for the holes among the blocks about to be logged (see
        _allocate_homes); NoSpace changes nothing."""
        holes = [(f, k) for b, n in mask_runs(mask)
                 for f, d, k in extents_of(inode).runs(folio.fblock + b, n) if d is None]
        if not holes:
            return [], 0
        whole = folio.atomic and holes == [(folio.fblock, folio.mapping.blocks_per_folio)]
        return self._allocate_homes(folio, holes, aligned=whole)

    def _log_now(self, inode: Inode, m: Mapping, folio: Folio, mask: int,
                 homes: list[tuple[int, int, int]], out: WriteOutcome, hold: bool,
                 holds: list[tuple[Folio, bool]]) -> int:
        """Append the blocks in mask as DATA records (mapping the new homes in the same
        batch) and mark the folio; does not await. Returns the batch seq."""
        bs = self.bs
        for fblock, dblock, count in homes:  # in the batch of the DATA records
            self.md.map_extent(inode, fblock, dblock, count)
        if homes:
            out.meta_changed = True
        seq = -1
        for b, n in mask_runs(mask):
            f0 = folio.fblock + b
            for f, d, k in list(extents_of(inode).runs(f0, n)):
                assert d is not None
                payload = Buffer(k * bs)
                payload.copy_from(0, folio.buf, (f - folio.fblock) * bs, k * bs)
                seq = self.journal.append_data(m.ino, folio.index, f, d, payload, k)
        if hold:
            was_atomic = self.cache.start_writeback(folio, mask, stable=True)
            holds.append((folio, was_atomic))
        else:
            was_atomic = self.cache.take_clean(folio, mask)
        self.cache.set_logged(folio, seq)
        out.logged_seq = max(out.logged_seq, seq)
        m.meta_seq = max(m.meta_seq, seq)
        self.md.data_written(inode, (folio.fblock + mask.bit_length()) * bs)
        self.settle_size(inode, m)
        if was_atomic:
            self.counters.atomic_writebacks_software += 1
        if self.cache.logged_bytes > self.cache.limit // 4:
            self.checkpointer.request_checkpoint()
        return seq

    def _allocate_homes(self, folio: Folio, holes: list[tuple[int, int]],
                        aligned: bool) -> tuple[list[tuple[int, int, int]], int]:
        """Device blocks for the reserved holes of a folio about to be logged, all or none
        (NoSpace). A whole unit gets a unit-aligned extent when there is one, for later
        hardware writes. Returns (file block, device block, count) pieces and the number
        of block reservations used up."""
        nb = folio.mapping.blocks_per_folio
        homes: list[tuple[int, int, int]] = []
        reserved = popcount(folio.reserved & sum(mask_range(f - folio.fblock, k)
                                                 for f, k in holes))
        try:
            for fblock, count in holes:
                done = 0
                if aligned:
                    try:
                        start, _ = self.alloc.allocate(nb, align=nb, reserved=reserved)
                        homes.append((fblock, start, nb))
                        done = nb
                    except NoSpace:
                        pass
                while done < count:
                    start, got = self.alloc.allocate(count - done, min_len=1,
                                                     reserved=reserved)
                    homes.append((fblock + done, start, got))
                    done += got
        except NoSpace:
            for _, start, got in homes:
                self.alloc.free_now(start, got)
            raise
        used = sum(c for _, _, c in homes)
        self.alloc.unreserve(min(reserved, used))
        for fblock, count in holes:
            folio.reserved &= ~mask_range(fblock - folio.fblock, count)
        return homes, min(reserved, used)

    async def _write_in_place(self, inode: Inode, m: Mapping,
                              items: list[tuple[Folio, int]], out: WriteOutcome,
                              writethrough: bool) -> None:
        """Write dirty blocks to their homes, merging neighbours into large writes."""
        # Earlier awaits may have changed the folios: take what is still writable now.
        items = [(f, mask & f.dirty) for f, mask in items
                 if mask & f.dirty and not f.writeback and not f.locked]
        ios = self._plan_in_place(inode, m, items)
        stable = writethrough or m.stable
        taken: dict[int, int] = {}
        for io in ios:
            for folio, mask in io.parts:
                taken[id(folio)] = taken.get(id(folio), 0) | mask
        started: dict[int, tuple[Folio, int]] = {}
        for io in ios:
            for folio, _ in io.parts:
                if id(folio) not in started:
                    self.cache.start_writeback(folio, taken[id(folio)], stable=stable)
                    started[id(folio)] = (folio, taken[id(folio)])
        failed: dict[int, int] = {}
        errors: list[DeviceError] = []

        # A write-through that is one device write into blocks already at home: flush in
        # the same request.
        durable = writethrough and out.flush and len(ios) == 1 and not ios[0].new_extents

        async def run(io: _InPlaceIO) -> None:
            try:
                gen = await self._device_write(io.dblock, io.segments, atomic=False,
                                               check=[f for f, _ in io.parts] if stable
                                               else [], durable=durable)
            except DeviceError as exc:
                errors.append(exc)
                for folio, mask in io.parts:
                    failed[id(folio)] = failed.get(id(folio), 0) | mask
                for _, dblock, n in io.new_extents:
                    self.alloc.free_now(dblock, n)
                return
            for fblock, dblock, n in io.new_extents:
                self.md.map_extent(inode, fblock, dblock, n)
                self.journal.need_barrier(gen)
                out.meta_changed = True
                m.meta_seq = self.journal.pending_seq
            m.flush_gen = out.flush_gen = max(m.flush_gen, gen)
            self.md.data_written(inode, max((f.fblock + mask.bit_length()) * self.bs
                                            for f, mask in io.parts))
            self.counters.writeback_ios += 1
            self.counters.writeback_bytes += io.nblocks * self.bs

        async with trio.open_nursery() as nursery:
            for io in ios:
                nursery.start_soon(run, io)
        # put reservations back for blocks whose new home was given up
        for io in ios:
            if any(id(f) in failed for f, _ in io.parts):
                for fblock, _, n in io.new_extents:
                    self._rereserve(m, fblock, n)
        for folio, _ in started.values():
            if failed.get(id(folio), 0):
                continue
            self._wb_failures.pop((m.ino, folio.index), None)
            self.cache.end_writeback(folio)
        self.settle_size(inode, m)
        if errors:
            parts = [(f, failed[id(f)]) for f, _ in started.values() if id(f) in failed]
            self._write_failed(m, parts, errors[0], writethrough, out)

    def _plan_in_place(self, inode: Inode, m: Mapping,
                       items: list[tuple[Folio, int]]) -> list[_InPlaceIO]:
        """Group dirty block runs into device writes, allocating homes for holes."""
        bs = self.bs
        ios: list[_InPlaceIO] = []
        goal = 0
        for folio, mask in sorted(items, key=lambda it: it[0].index):
            for b, n in mask_runs(mask):
                for f, d, k in list(extents_of(inode).runs(folio.fblock + b, n)):
                    while k > 0:
                        fb = f - folio.fblock
                        if d is None:
                            part = mask_range(fb, k)
                            reserved = popcount(folio.reserved & part)
                            try:
                                start, got = self.alloc.allocate(k, goal=goal, min_len=1,
                                                                 reserved=reserved)
                            except NoSpace:
                                log.warning("no space to write back inode %d", m.ino)
                                break
                            got_mask = mask_range(fb, got)
                            conv = popcount(folio.reserved & got_mask)
                            self.alloc.unreserve(conv)
                            folio.reserved &= ~got_mask
                            dblock, new = start, True
                        else:
                            dblock, got, new = d, k, False
                        io = ios[-1] if ios else None
                        if io is None or io.dblock + io.nblocks != dblock or \
                                len(io.segments) >= MAX_IOV or \
                                (io.nblocks + got) * bs > MAX_IO_BYTES:
                            io = _InPlaceIO(dblock)
                            ios.append(io)
                        io.segments.append((folio.buf, fb * bs, got * bs))
                        io.parts.append((folio, mask_range(fb, got)))
                        if new:
                            io.new_extents.append((f, dblock, got))
                        io.nblocks += got
                        goal = dblock + got
                        f += got
                        k -= got
                        if d is not None:
                            d += got
        return ios

    def _rereserve(self, m: Mapping, fblock: int, count: int) -> None:
        """A write into fresh blocks failed: they are free again, their data dirty and
        reserved again."""
        self.alloc.reserve_again(count)
        bpf = m.blocks_per_folio
        for fb in range(fblock, fblock + count):
            folio = m.folios.get(fb // bpf)
            if folio is not None:
                self.cache.reserve_blocks(folio, 1 << (fb % bpf))

    async def _device_write(self, dblock: int, segments: list[Segment], atomic: bool,
                            check: list[Folio], durable: bool = False) -> int:
        """The device write, with the debug-mode check that stable data did not change.
        durable: flush in the same request. Returns the flush generation that still has to
        cover the write (-1 when it is durable already)."""
        before = [f.buf.crc32c() for f in check] if self.policy.debug and check else None
        if durable:
            await self.dev.writev_flush(dblock * self.bs, segments, "data", atomic=atomic)
        else:
            await self.dev.writev(dblock * self.bs, segments, "data", atomic=atomic)
        if before is not None:
            after = [f.buf.crc32c() for f in check]
            if after != before:
                log.critical("stable page violated: buffer changed under I/O at block %d",
                             dblock)
                raise AssertionError("data under I/O changed (stable pages violated)")
        return -1 if durable else self.dev.write_gen()

    def _write_failed(self, m: Mapping, parts: list[tuple[Folio, int]], exc: BaseException,
                      writethrough: bool, out: WriteOutcome,
                      restore_atomic: bool = False) -> None:
        """Record a failed device write: the blocks are dirty again; a background failure
        is reported to fsync (errseq), a write-through's to its writer only."""
        self.counters.writeback_errors += 1
        out.failed = True
        out.error = exc
        log.warning("writeback of inode %d failed: %s", m.ino, exc)
        if not writethrough:
            m.record_error()
        for folio, mask in parts:
            key = (m.ino, folio.index)
            tries = self._wb_failures.get(key, 0) + 1
            self._wb_failures[key] = tries
            if tries >= MAX_WB_RETRIES and not writethrough:
                # Give up on these blocks: clean but in memory; the error stays recorded.
                self._wb_failures.pop(key, None)
                self.alloc.unreserve(self.cache.unreserve_blocks(folio, mask))
                self.cache.end_writeback(folio)
            else:
                self.cache.end_writeback(folio, mask, restore_atomic=restore_atomic)

    def settle_size(self, inode: Inode, m: Mapping | None) -> None:
        """Nothing of the file is dirty or being written: all its data is recorded, so
        the recorded size may be its size (the rest, if any, is a hole made by truncate)."""
        if inode.disk_size >= inode.size:
            return
        if m is None or not (m.dirty or any(f.writeback and f.wb_mask
                                            for f in m.busy.values())):
            self.md.data_written(inode, inode.size)

    # ------------------------------------------------------------- write-through

    def inode_written(self, inode: Inode, size_grew: bool) -> None:
        """A write changed size or times: log the inode with the next batch."""
        self.md.mark_dirty(inode, size_grew)

    async def write_through(self, inode: Inode, m: Mapping, items: list[tuple[Folio, int]],
                            size_grew: bool, durable: bool = True) -> None:
        """Write the blocks just copied now and wait; EIO on failure. durable (O_DSYNC,
        RWF_DSYNC, writethrough=1): also make them durable, with the new size when the
        write extended the file. Otherwise (RWF_WRITETHROUGH, writethrough=2, O_DIRECT),
        as the RFC defines write-through: the device write completes before the call
        returns and its error is the call's, but no cache flush and no metadata commit
        (data in the log is committed, which flushes: the log has no other way)."""
        self.counters.writethrough_writes += 1
        out = await self.write_folios(inode, m, items, writethrough=True, flush=durable)
        if out.failed:
            raise OSError(errno.EIO, f"write-through failed: {out.error}")
        if not durable:
            return
        try:
            if out.meta_changed or size_grew:
                await self.journal.commit()
            await self.dev.flush_covering(out.flush_gen)
        except (DeviceError, LogFailed) as exc:
            raise OSError(errno.EIO, f"write-through flush failed: {exc}") from exc

    # ------------------------------------------------------------- fsync and sync

    async def writeback_mapping(self, inode: Inode, m: Mapping, wait: bool) -> WriteOutcome:
        """Write every dirty folio of the file; with wait, also wait for writeback that
        others started, so that all data dirty at the call is on the device after."""
        if wait:
            await self._wait_busy(m)
        items = [(f, f.dirty) for f in sorted(m.dirty.values(), key=lambda f: f.index)]
        out = await self.write_folios(inode, m, items, sync=wait) if items else WriteOutcome()
        if wait:
            await self._wait_busy(m)
        return out

    @staticmethod
    async def _wait_busy(m: Mapping) -> None:
        """Wait for the writeback of dirty blocks and the reads in flight on this file when
        called. A checkpoint's home copies (writeback of no dirty blocks) are of data
        already durable in the log: nobody syncing the file needs to wait for them."""
        for folio in list(m.busy.values()):
            while folio.locked or (folio.writeback and folio.wb_mask):
                await folio.wait_unlocked_or_written()

    async def fsync(self, inode: Inode, datasync: bool) -> None:
        """Write back the file's data and commit its metadata (raises DeviceError/LogFailed
        for failures of this call; errseq reporting is the caller's). fdatasync commits
        only what reading the data back needs: the size, extents and logged data, not
        timestamps (so an O_DSYNC write-through costs one log write, not two)."""
        m = self.cache.mappings.get(inode.ino)
        if m is not None:
            await self.writeback_mapping(inode, m, wait=True)
        self.settle_size(inode, m)
        # fsync commits everything logged so far (nothing to do costs nothing);
        # fdatasync only what this file's data needs.
        if not datasync or self.md.size_dirty(inode.ino) or \
                (m is not None and m.meta_seq > self.journal.durable_seq):
            await self.journal.commit()
        if m is not None:
            await self.dev.flush_covering(m.flush_gen)

    async def sync_all(self) -> bool:
        """Write back everything and commit; returns False if any write failed. (Blocks
        dirtied again meanwhile by concurrent writers are not failures; the unmount
        path, which has no writers, checks that nothing is left dirty.)"""
        ok = True
        for ino, m in list(self.cache.mappings.items()):
            inode = self.md.inodes.get(ino)
            if inode is None or not (m.dirty or m.busy):
                continue
            out = await self.writeback_mapping(inode, m, wait=True)
            ok &= not out.failed
        for ino, m in list(self.cache.mappings.items()):
            inode = self.md.inodes.get(ino)
            if inode is not None:
                self.settle_size(inode, m)
        await self.journal.commit()
        await self.dev.flush()
        return ok

    async def drop_inode(self, inode: Inode) -> None:
        """The file is gone: wait for its I/O, release reservations, forget its folios."""
        m = self.cache.mappings.get(inode.ino)
        if m is None:
            return
        while True:
            for folio in list(m.busy.values()):
                while folio.locked or folio.writeback:
                    await folio.wait_unlocked_or_written()
            pinned = [f for f in m.folios.values() if f.pins]
            if not pinned and not m.busy:
                break
            if pinned:
                await trio.sleep(0.001)  # a request is using it; it unpins when done
        released = sum(self.cache.unreserve_blocks(f, f.reserved) for f in m.folios.values())
        if released:
            self.alloc.unreserve(released)
        self.cache.drop_mapping(inode.ino)

    # ------------------------------------------------------------------ the flusher

    async def run_flusher(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(min(1.0, self.policy.dirty_expire / 4 or 1.0)):
                await self._flusher_wake.wait()
            self._flusher_wake = trio.Event()
            await self.flush_some()

    async def flush_some(self, everything: bool = False) -> None:
        """Write back expired dirty data, and more while over the background threshold
        (or everything, as background writeback: failures go to errseq)."""
        now = time.monotonic()
        expire = self.policy.dirty_expire
        over = everything or self._over_background()
        for ino, m in sorted(self.cache.mappings.items(),
                             key=lambda kv: min((f.dirty_since for f in kv[1].dirty.values()),
                                                default=now)):
            if not m.dirty:
                continue
            inode = self.md.inodes.get(ino)
            if inode is None:
                continue
            if over:
                items = [(f, f.dirty) for f in sorted(m.dirty.values(), key=lambda f: f.index)]
            else:
                items = [(f, f.dirty) for f in sorted(m.dirty.values(), key=lambda f: f.index)
                         if now - f.dirty_since >= expire]
            if items:
                await self.write_folios(inode, m, items)
            over = everything or self._over_background()
        self.cache.trim()

    def _over_background(self) -> bool:
        """Enough dirty data, or enough memory held by folios that cannot be dropped, to
        write back before it expires (so that the cache can evict and stay in bounds)."""
        c = self.cache
        return c.dirty_bytes > self.background_bytes or \
            c.pinned_bytes - c.logged_bytes > self.background_bytes  # logged: checkpoints
