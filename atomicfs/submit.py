"""Submission: the ways dirty blocks reach the device once writeback.py has routed them,
and what a failed write leaves behind.

* hardware path: one pwritev2(RWF_ATOMIC) of whole units, in place, at a unit-aligned
  device address (a unit mapped elsewhere moves to an aligned extent; the remap commits
  with the metadata);
* write groups: every member in one log batch (or, k whole aligned units the device
  writes untorn, one RWF_ATOMIC write);
* log path: the blocks copied into DATA records of the pending batch; a checkpoint
  writes the home copy later;
* in place: dirty blocks to their homes, neighbours merged into large O_DIRECT writes,
  homes for holes allocated now (delalloc.py) and mapped once the data is on the device.

Every writeback started here ends, on every path: `Held` ends what an error or a
cancellation left running as failed (dirty again, to be retried). A failed background
write is recorded in the mapping (errseq); its blocks are retried up to MAX_WB_RETRIES
times, then given up (clean in memory, the error stays), as Linux does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import TracebackType

import trio

from atomicfs.checkpoint import Checkpointer
from atomicfs.delalloc import Delalloc, Home, extents_of
from atomicfs.device import MAX_IO_BYTES, Device
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.journal import Journal
from atomicfs.metadata import Inode, Metadata
from atomicfs.native import MAX_IOV, Buffer, Segment
from atomicfs.pagecache import (Folio, IOKind, Mapping, PageCache, WriteGroup, mask_range,
                                mask_runs, popcount)
from atomicfs.stats import Counters

log = logging.getLogger(__name__)

MAX_WB_RETRIES = 3



@dataclass
class WritebackPolicy:
    atomic_path: str = "auto"  # auto, hardware, software
    debug: bool = False
    unsafe_atomic: bool = False  # crash-test control: atomic folios go out unprotected



@dataclass
class _InPlaceIO:
    """One device write: consecutive device blocks, gathered from folio buffers."""

    dblock: int
    nblocks: int = 0
    segments: list[Segment] = field(default_factory=list)
    parts: list[tuple[Folio, int]] = field(default_factory=list)  # folio, block mask
    new_extents: list[Home] = field(default_factory=list)



class WriteOutcome:
    __slots__ = ("failed", "logged_seq", "meta_changed", "flush_gen", "error", "flush")

    def __init__(self, flush: bool = True) -> None:
        self.flush = flush  # a write-through may flush the device cache (not RFC mode)
        self.failed = False
        self.logged_seq = -1
        self.meta_changed = False
        self.flush_gen = -1
        self.error: BaseException | None = None




class Held:
    """The folios one writeback call has put under I/O. Leaving its `with` block ends each
    one still held as failed (dirty again, its atomic tag back): an error or a
    cancellation between start and end never leaves a folio under writeback."""

    __slots__ = ("cache", "folios")

    def __init__(self, cache: PageCache) -> None:
        self.cache = cache
        self.folios: dict[int, tuple[Folio, bool]] = {}  # id -> folio, was atomic

    def start(self, folio: Folio, mask: int, kind: IOKind) -> bool:
        was_atomic = self.cache.start_writeback(folio, mask, kind)
        self.folios[id(folio)] = (folio, was_atomic)
        return was_atomic

    def holds(self, folio: Folio) -> bool:
        return id(folio) in self.folios

    def end(self, folio: Folio, failed_mask: int = 0, restore_atomic: bool = False) -> None:
        del self.folios[id(folio)]
        self.cache.end_writeback(folio, failed_mask, restore_atomic)

    def end_log_held(self, failed: bool) -> None:
        """End the write-through holds of logged blocks (failed: the log failed)."""
        for folio, was_atomic in list(self.folios.values()):
            if folio.io is IOKind.LOG_HELD:
                self.end(folio, folio.io_mask if failed else 0, was_atomic and failed)

    def __enter__(self) -> "Held":
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for folio, was_atomic in list(self.folios.values()):
            self.end(folio, folio.io_mask, restore_atomic=was_atomic)



class Submitter:
    """The submission paths (writeback.Writeback routes folios to them)."""

    def __init__(self, dev: Device, md: Metadata, journal: Journal, cache: PageCache,
                 delalloc: Delalloc, checkpointer: Checkpointer, counters: Counters,
                 policy: WritebackPolicy) -> None:
        self.dev = dev
        self.md = md
        self.journal = journal
        self.cache = cache
        self.delalloc = delalloc
        self.checkpointer = checkpointer
        self.alloc = delalloc.alloc
        self.counters = counters
        self.policy = policy
        self.bs = md.block_size
        self._wb_failures: dict[tuple[int, int], int] = {}

    def hardware_ok(self, unit: int) -> bool:
        """Can this unit go out as one RWF_ATOMIC write on this device?"""
        caps = self.dev.caps
        return (self.policy.atomic_path != "software" and caps.atomic_unit_min > 0
                and caps.atomic_unit_min <= unit <= caps.atomic_unit_max)

    def atomic_path_of(self, unit: int) -> str | None:
        if unit <= 0:
            return None
        return "hardware" if self.hardware_ok(unit) else "software"


    # --------------------------------------------------------------- hardware path

    async def _write_units_hardware(self, inode: Inode, m: Mapping, members: list[Folio],
                                    out: WriteOutcome, writethrough: bool,
                                    held: Held) -> bool | None:
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
        old_reserved = [f.reserved for f in members]
        if moved:
            try:
                dblock = self.delalloc.allocate_units(members, nb, goal=runs[0][1] or 0)
            except NoSpace:
                return None
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
            held.start(f, full, IOKind.ATOMIC)
        try:
            # A write-through of units already at home needs nothing but this write to be
            # durable: flush in the same request (moved units wait for their metadata).
            gen = await self._device_write(dblock, [segment], atomic=True, check=members,
                                           durable=writethrough and out.flush and not moved)
        except BaseException as exc:
            if moved:
                self.delalloc.undo_units(members, old_reserved, dblock, nb)
            if not isinstance(exc, DeviceError):
                raise  # cancelled: `held` makes them dirty again
            self._write_failed(m, [(f, full) for f in members], exc, writethrough, out,
                               held, restore_atomic=True)
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
            held.end(f)
        self.settle_size(inode, m)
        self.counters.atomic_writebacks_hardware += len(members)
        self.counters.writeback_ios += 1
        self.counters.writeback_bytes += size
        return True

    # ---------------------------------------------------------------- write groups

    async def write_group(self, inode: Inode, m: Mapping, group: WriteGroup) -> None:
        """A write is about to change a member of a pending write group: the group goes
        into the log first (NoSpace if it cannot)."""
        if self.policy.unsafe_atomic:
            self.cache.dissolve_group(group, 0)
            return
        out = WriteOutcome()
        with Held(self.cache) as held:
            await self._write_group(inode, m, group, out, False, held)
        if out.error is not None:
            raise out.error
        if group.pending:
            raise NoSpace("no space to log a write group")

    async def _write_group(self, inode: Inode, m: Mapping, group: WriteGroup,
                           out: WriteOutcome, hold: bool, held: Held) -> None:
        """Log every dirty block of every member of a write group in one batch: the batch
        is checksummed whole, so replay applies all of the write or none of it; a
        checkpoint writes the members home only once the batch is durable (and a crash
        during those home writes replays the whole batch again)."""
        bs = self.bs
        if self._group_hardware_ok(m, group) and \
                await self._write_group_hardware(inode, m, group, out, hold, held):
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
            busy = [f for f in group.folios if f.busy]
            if not busy:
                break
            await self.cache.wait_idle(busy)
        # From here on nothing awaits: every member lands in the pending batch.
        members = [f for f in group.folios if f.dirty]
        done: list[tuple[Folio, int, list[Home]]] = []
        try:
            for folio in members:
                old_reserved = folio.reserved
                done.append((folio, old_reserved,
                             self.delalloc.homes_for(inode, folio, folio.dirty)))
        except NoSpace:
            for folio, old_reserved, homes in done:  # all or nothing
                self.delalloc.undo_homes(folio, homes, old_reserved)
            log.warning("no space to log a write group of inode %d", m.ino)
            return
        seq = self.journal.pending_seq
        for folio, _, homes in done:
            seq = self._log_now(inode, m, folio, folio.dirty, homes, out, hold, held)
        self.cache.dissolve_group(group, seq)
        self.counters.atomic_groups_logged += 1

    def _group_hardware_ok(self, m: Mapping, group: WriteGroup) -> bool:
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
                                    out: WriteOutcome, writethrough: bool,
                                    held: Held) -> bool:
        """The hardware path of a write group (see _write_units_hardware). False: the log
        path must take it (no aligned space, or the folios changed while we waited)."""
        await self.cache.wait_idle(group.folios)
        if not self._group_hardware_ok(m, group):
            return False
        members = sorted(group.folios, key=lambda f: f.index)
        self.cache.dissolve_group(group, 0)  # taken: nothing else may write its units meanwhile
        done = await self._write_units_hardware(inode, m, members, out, writethrough, held)
        if done:
            self.counters.atomic_groups_hardware += 1
            return True
        # not written (no room, or failed): still one write
        self.cache.rejoin_group(group, [f for f in members if f.dirty == f.full])
        return done is not None

    # ------------------------------------------------------------------- log path

    def _log_now(self, inode: Inode, m: Mapping, folio: Folio, mask: int,
                 homes: list[Home], out: WriteOutcome, hold: bool, held: Held) -> int:
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
        if hold:  # a write-through: stable until the batch is durable
            was_atomic = held.start(folio, mask, IOKind.LOG_HELD)
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

    # ------------------------------------------------------------------ in place

    async def _submit_in_place(self, inode: Inode, m: Mapping, items: list[tuple[Folio, int]],
                               out: WriteOutcome, writethrough: bool, held: Held) -> None:
        """Write dirty blocks to their homes, merging neighbours into large writes; the
        caller routed them in this same step (nothing awaits before the starts)."""
        ios = self._plan_in_place(inode, m, items)
        stable = writethrough or m.stable
        taken: dict[int, tuple[Folio, int]] = {}
        for io in ios:
            for folio, mask in io.parts:
                prev = taken.get(id(folio), (folio, 0))[1]
                taken[id(folio)] = (folio, prev | mask)
        kind = IOKind.STABLE_IN_PLACE if stable else IOKind.IN_PLACE
        for folio, mask in taken.values():
            held.start(folio, mask, kind)
        failed: dict[int, int] = {}
        errors: list[DeviceError] = []
        written: set[int] = set()  # ids of the ios that reached the device

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
                return
            written.add(id(io))
            for fblock, dblock, n in io.new_extents:
                self.md.map_extent(inode, fblock, dblock, n)
                self.journal.need_barrier(gen)
                out.meta_changed = True
                m.meta_seq = self.journal.pending_seq
            m.flush_gen = out.flush_gen = max(m.flush_gen, gen)
            # parts are in file order (see _plan_in_place): the last one ends highest
            last, mask = io.parts[-1]
            self.md.data_written(inode, (last.fblock + mask.bit_length()) * self.bs)
            self.counters.writeback_ios += 1
            self.counters.writeback_bytes += io.nblocks * self.bs

        try:
            if len(ios) == 1:  # no nursery and task for one write (a 1 MiB O_DIRECT write)
                await run(ios[0])
            else:
                async with trio.open_nursery() as nursery:
                    for io in ios:
                        nursery.start_soon(run, io)
        finally:
            # blocks whose new home was not written: free again, reserved again
            for io in ios:
                if id(io) not in written:
                    for fblock, dblock, n in io.new_extents:
                        self.alloc.free_now(dblock, n)
                        self.delalloc.reserve_again(m, fblock, n)
        for folio, _ in taken.values():
            if failed.get(id(folio), 0):
                continue
            self._wb_failures.pop((m.ino, folio.index), None)
            held.end(folio)
        self.settle_size(inode, m)
        if errors:
            parts = [(f, failed[id(f)]) for f, _ in taken.values() if id(f) in failed]
            self._write_failed(m, parts, errors[0], writethrough, out, held)

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
                            try:
                                dblock, got = self.delalloc.allocate_run(folio, fb, k, goal)
                            except NoSpace:
                                log.warning("no space to write back inode %d", m.ino)
                                break
                            new = True
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

    async def _device_write(self, dblock: int, segments: list[Segment], atomic: bool,
                            check: list[Folio], durable: bool = False) -> int:
        """The device write (shielded from cancellation), with the debug-mode check that
        stable data did not change. durable: flush in the same request. Returns the flush
        generation that still has to cover the write (-1 when it is durable already)."""
        before = [f.buf.crc32c() for f in check] if self.policy.debug and check else None
        # Not cancellable: once submitted the write lands anyway, and until it has, its
        # buffer must not change nor its blocks be given to anyone else.
        if durable:
            await self.dev.writev_flush(dblock * self.bs, segments, "data", atomic=atomic,
                                        uncancellable=True)
        else:
            await self.dev.writev(dblock * self.bs, segments, "data", atomic=atomic,
                                  uncancellable=True)
        if before is not None:
            after = [f.buf.crc32c() for f in check]
            if after != before:
                log.critical("stable page violated: buffer changed under I/O at block %d",
                             dblock)
                raise AssertionError("data under I/O changed (stable pages violated)")
        return -1 if durable else self.dev.write_gen()

    def _write_failed(self, m: Mapping, parts: list[tuple[Folio, int]], exc: BaseException,
                      writethrough: bool, out: WriteOutcome, held: Held,
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
                self.delalloc.release(folio, mask)
                held.end(folio)
            else:
                held.end(folio, mask, restore_atomic=restore_atomic)

    def settle_size(self, inode: Inode, m: Mapping | None) -> None:
        """Nothing of the file is dirty or being written: all its data is recorded, so
        the recorded size may be its size (the rest, if any, is a hole made by truncate)."""
        if inode.disk_size >= inode.size:
            return
        # (data_busy: a checkpoint's home copies, io_mask 0, need no walk)
        if m is None or not (m.dirty or any(f.io_mask for f in m.data_busy.values())):
            self.md.data_written(inode, inode.size)
