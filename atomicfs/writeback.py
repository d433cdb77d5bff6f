"""Writeback: what goes out, when and how.

Routing of a dirty folio (`Writeback.route`), decided from the folio's state at the moment
its writeback starts, with no await in between, so that nothing is decided twice:

* in a pending write group: the whole group goes into one log batch (or, k whole aligned
  units the device writes untorn, one RWF_ATOMIC write);
* resident (its newest copy is in the log): into the log again, or replay would roll a
  newer in-place copy back;
* atomic, and the device can write the unit untorn (hardware path): one
  pwritev2(RWF_ATOMIC) of exactly the unit, in place, from the folio buffer, at a
  unit-aligned device address (a unit mapped elsewhere moves to an aligned extent, and the
  remap commits with the metadata);
* atomic without hardware support (software path): its blocks are copied into a DATA
  record of the log; the log write is one sequential device write, and a checkpoint writes
  the home copy later;
* anything else: the dirty blocks are written in place, adjacent folios merged into large
  O_DIRECT writes; blocks without a home get one now (delalloc.py) and the mapping is
  committed after the data is on the device. A small synchronous write into new blocks
  goes into the log instead (one device write and one flush).

Write-through runs the same routing at once for the blocks a write just copied, holds those
folios under stable writeback until the data is durable, and only then lets the write
return. While any write-through is in flight on a file, writers to a folio under writeback
wait (stable pages).

A failed background write is recorded in the mapping (errseq) and reported by the next
fsync of every descriptor; the blocks stay dirty and are retried, up to a limit after which
the error stays and the data is given up (as Linux does), so that a dead device never hangs
writers. Every writeback that starts ends, on every path: `_Held` ends what an error or a
cancellation left running as failed (dirty again).
"""
from __future__ import annotations

import enum
import errno
import logging
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType

import trio

from atomicfs.delalloc import Delalloc, Home, extents_of
from atomicfs.device import Device
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.journal import DataRun, Journal, LogFailed
from atomicfs.metadata import Inode, Metadata
from atomicfs.native import MAX_IOV, Buffer, Segment
from atomicfs.pagecache import (Folio, IOKind, Mapping, PageCache, WriteGroup, mask_range,
                                mask_runs, popcount)
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
    debug: bool = False
    unsafe_atomic: bool = False  # crash-test control: atomic folios go out unprotected


class Route(enum.Enum):
    """Where a dirty folio goes (see the module docstring), in the order a call sends
    them out."""

    GROUP = 0
    HARDWARE = 1
    LOG = 2
    IN_PLACE = 3


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


class _Held:
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

    def __enter__(self) -> "_Held":
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for folio, was_atomic in list(self.folios.values()):
            self.end(folio, folio.io_mask, restore_atomic=was_atomic)


class Writeback:
    """Routing and submission of dirty folios, write-through, fsync and sync (and, for
    now, the checkpointer)."""

    def __init__(self, dev: Device, md: Metadata, journal: Journal, cache: PageCache,
                 delalloc: Delalloc, counters: Counters, policy: WritebackPolicy,
                 watchdog: Watchdog | None = None) -> None:
        self.dev = dev
        self.md = md
        self.journal = journal
        self.cache = cache
        self.delalloc = delalloc
        self.alloc = delalloc.alloc
        self.counters = counters
        self.policy = policy
        self.bs = md.block_size
        self._ckpt_lock = trio.Lock()
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

    def route(self, m: Mapping, folio: Folio, small: bool = False) -> Route:
        """Where the folio's dirty blocks go, from its state now; the caller starts the
        writeback in the same step. small: a synchronous write of little new data."""
        unsafe = self.policy.unsafe_atomic
        if folio.group is not None and not unsafe:
            return Route.GROUP  # all members, one batch
        if self.journal.is_resident(m.ino, folio.index):
            return Route.LOG  # even unprotected: replay would roll an in-place copy back
        if folio.atomic and not unsafe:
            return Route.HARDWARE if self.hardware_ok(m.folio_size) and \
                folio.dirty == folio.full else Route.LOG
        return Route.LOG if small else Route.IN_PLACE

    @staticmethod
    def _log_mask(folio: Folio, wanted: int) -> int:
        """An atomic folio goes into the log whole, even if it was partly dirty when it
        was picked and a whole-unit write has made it atomic since."""
        return folio.dirty if folio.atomic else wanted & folio.dirty

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

    # ------------------------------------------------------------------ submission

    async def write_folios(self, inode: Inode, m: Mapping, items: list[tuple[Folio, int]],
                           writethrough: bool = False, sync: bool = False,
                           flush: bool = True) -> WriteOutcome:
        """Write the given dirty blocks by the right path; waits for the device writes
        (and, for writethrough, for the log batch) but does not flush. sync: the caller
        makes the data durable at once (fsync, write-through). flush=False: a
        write-through of the RFC kind, which must not flush the device cache either."""
        out = WriteOutcome(flush)
        waits = sync or writethrough
        if waits:
            # A folio under I/O is skipped below. One under a checkpoint's home copy (of
            # its logged, clean blocks) may still have other dirty blocks: wait, so that
            # this call writes them, or fsync would return without them.
            await self.cache.wait_idle([f for f, _ in items])
        if self.policy.unsafe_atomic:  # crash-test control: no protection
            for folio, _ in items:
                if folio.group is not None:
                    folio.group.dissolve(0)
        # Background writeback leaves a busy folio to whoever has it.
        todo = [(f, mask) for f, mask in items
                if f.group is not None or (mask & f.dirty and not f.busy)]
        small = waits and self._small_new_data(
            inode, [(f, mask & f.dirty) for f, mask in todo
                    if self.route(m, f) is Route.IN_PLACE])
        # The order to send them out in (groups, hardware, log, in place); each folio is
        # routed again when its writeback starts.
        queue = deque(sorted(todo, key=lambda it: self.route(m, it[0], small).value))
        inplace: list[tuple[Folio, int]] = []
        tried: set[int] = set()  # write groups this call has sent (or failed to)
        with _Held(self.cache) as held:
            try:
                while queue or inplace:
                    if queue:
                        folio, wanted = queue.popleft()
                        if await self._write_one(inode, m, folio, wanted, out, writethrough,
                                                 small, tried, held):
                            inplace.append((folio, wanted))
                    else:
                        batch, inplace = inplace, []
                        queue.extend(await self._write_in_place(inode, m, batch, out,
                                                                writethrough, small, held))
                if writethrough and out.logged_seq >= 0:
                    await self.journal.commit(out.logged_seq)
            except LogFailed as exc:
                out.failed = True
                out.error = exc
            finally:
                held.end_log_held(out.failed and self.journal.failed is not None)
        self.cache.trim()  # what went out clean may go now if the cache is over
        return out

    async def _write_one(self, inode: Inode, m: Mapping, folio: Folio, wanted: int,
                         out: WriteOutcome, writethrough: bool, small: bool,
                         tried: set[int], held: _Held) -> bool:
        """Write one folio by its route (not in place: True tells the caller to merge it
        with its neighbours). Waits first for log room and for I/O another task has on
        the folio (a write-through must wait for the batch or device write that carries
        its blocks, and blocks still dirty after that are ours to write)."""
        log_only = False  # the hardware path found no aligned space: the log takes it
        while True:
            if held.holds(folio):
                return False  # this call took it already (a member of a group it logged)
            if log_only or self.route(m, folio, small) is Route.LOG:
                await self.journal.wait_for_room(popcount(wanted) * self.bs + 256)
            if folio.busy:
                await self.cache.wait_idle([folio])
                out.logged_seq = max(out.logged_seq, folio.logged_seq)
                m.flush_gen = out.flush_gen = max(out.flush_gen, m.flush_gen)
                continue
            # From here to the start of the writeback nothing awaits.
            route = self.route(m, folio, small)
            if route is Route.GROUP:
                group = folio.group
                assert group is not None
                if id(group) not in tried:
                    tried.add(id(group))
                    await self._write_group(inode, m, group, out, writethrough, held)
                return False
            if route is Route.IN_PLACE and not log_only:
                return bool(wanted & folio.dirty)
            if route is Route.HARDWARE and not log_only:
                done = await self._write_units_hardware(inode, m, [folio], out, writethrough,
                                                        held)
                if done is not None:
                    return False
                log_only = True
                continue
            mask = self._log_mask(folio, wanted)
            if not mask:
                return False
            try:
                homes = self.delalloc.homes_for(inode, folio, mask)
            except NoSpace:
                log.warning("no space to log inode %d folio %d", m.ino, folio.index)
                return False
            self._log_now(inode, m, folio, mask, homes, out, writethrough, held)
            return False

    # --------------------------------------------------------------- hardware path

    async def _write_units_hardware(self, inode: Inode, m: Mapping, members: list[Folio],
                                    out: WriteOutcome, writethrough: bool,
                                    held: _Held) -> bool | None:
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
            group.dissolve(0)
            return
        out = WriteOutcome()
        with _Held(self.cache) as held:
            await self._write_group(inode, m, group, out, False, held)
        if out.error is not None:
            raise out.error
        if group.pending:
            raise NoSpace("no space to log a write group")

    async def _write_group(self, inode: Inode, m: Mapping, group: WriteGroup,
                           out: WriteOutcome, hold: bool, held: _Held) -> None:
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
        group.dissolve(seq)
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
                                    held: _Held) -> bool:
        """The hardware path of a write group (see _write_units_hardware). False: the log
        path must take it (no aligned space, or the folios changed while we waited)."""
        await self.cache.wait_idle(group.folios)
        if not self._group_hardware_ok(m, group):
            return False
        members = sorted(group.folios, key=lambda f: f.index)
        group.dissolve(0)  # taken: nothing else may write its units meanwhile
        done = await self._write_units_hardware(inode, m, members, out, writethrough, held)
        if done:
            self.counters.atomic_groups_hardware += 1
            return True
        # not written (no room, or failed): still one write
        group.rejoin([f for f in members if f.dirty == f.full])
        return done is not None

    # ------------------------------------------------------------------- log path

    def _log_now(self, inode: Inode, m: Mapping, folio: Folio, mask: int,
                 homes: list[Home], out: WriteOutcome, hold: bool, held: _Held) -> int:
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
            self.journal.request_checkpoint()
        return seq

    # ------------------------------------------------------------------ in place

    async def _write_in_place(self, inode: Inode, m: Mapping, batch: list[tuple[Folio, int]],
                              out: WriteOutcome, writethrough: bool, small: bool,
                              held: _Held) -> list[tuple[Folio, int]]:
        """Write dirty blocks to their homes, merging neighbours into large writes.
        Writing other folios awaited, so another task may have started writing some of
        these meanwhile: wait for that (fsync and write-through must cover it). Returns
        the folios whose route is no longer in place (a whole-unit write made one atomic,
        or another task logged it): they must not go out in place."""
        batch = [(f, wanted) for f, wanted in batch if not held.holds(f)]
        if await self.cache.wait_idle([f for f, _ in batch]):
            m.flush_gen = out.flush_gen = max(out.flush_gen, m.flush_gen)
        # From here to the start of the writes nothing awaits.
        items: list[tuple[Folio, int]] = []
        elsewhere: list[tuple[Folio, int]] = []
        for folio, wanted in batch:
            if not wanted & folio.dirty:
                continue
            if self.route(m, folio, small) is Route.IN_PLACE:
                items.append((folio, wanted & folio.dirty))
            else:
                elsewhere.append((folio, wanted))
        if items:
            await self._submit_in_place(inode, m, items, out, writethrough, held)
        return elsewhere

    async def _submit_in_place(self, inode: Inode, m: Mapping, items: list[tuple[Folio, int]],
                               out: WriteOutcome, writethrough: bool, held: _Held) -> None:
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
            self.md.data_written(inode, max((f.fblock + mask.bit_length()) * self.bs
                                            for f, mask in io.parts))
            self.counters.writeback_ios += 1
            self.counters.writeback_bytes += io.nblocks * self.bs

        try:
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
                      writethrough: bool, out: WriteOutcome, held: _Held,
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
        if m is None or not (m.dirty or any(f.io_mask for f in m.busy.values())):
            self.md.data_written(inode, inode.size)

    # ------------------------------------------------------------- write-through

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
            await self.cache.wait_data_io(m)
        items = [(f, f.dirty) for f in sorted(m.dirty.values(), key=lambda f: f.index)]
        out = await self.write_folios(inode, m, items, sync=wait) if items else WriteOutcome()
        if wait:
            await self.cache.wait_data_io(m)
        return out

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

    # ------------------------------------------------------------------ checkpoints

    async def run_checkpointer(self, interval: float = 30.0,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                               ) -> None:
        task_status.started()
        while True:
            if self.journal.failed is not None:
                await trio.sleep_forever()  # nothing can be checkpointed any more
            with trio.move_on_after(interval):
                await self.journal.want_checkpoint.wait()  # never replaced while unset
            if self.journal.failed is None and self.journal.used > 0:
                try:
                    await self.checkpoint()
                except (DeviceError, NoSpace) as exc:
                    log.error("checkpoint failed: %s", exc)
                    self.journal.fail(exc)

    async def checkpoint(self) -> None:
        """Make the log reclaimable: write resident units home, then a metadata snapshot,
        then the superblock that points at both. Needs no log space (see journal.py)."""
        with self.watchdog.track("checkpoint"):
            async with self._ckpt_lock:
                await self._checkpoint_locked()

    async def _checkpoint_locked(self) -> None:
        boundary = self.journal.seal_for_checkpoint()
        snapshot = self.md.serialize()
        next_ino = self.md.next_ino
        # The runs themselves, not copies: those in the boundary batch learn their log
        # position only when it is placed (settle_for_checkpoint waits for that).
        runs = [(res.ino, res.index, r) for res in self.journal.resident.values()
                for r in res.runs if r.seq <= boundary]
        absorbed = await self.journal.settle_for_checkpoint(boundary)
        try:
            await self._write_home(runs)
            await self.dev.flush()
            await self.journal.write_checkpoint(snapshot, boundary, next_ino)
        except BaseException as exc:
            if absorbed:  # their data is nowhere else durable: stop, as a log failure does
                self.journal.fail(exc)
            raise
        self.cache.checkpointed(boundary)
        self.counters.checkpoints += 1

    async def _write_home(self, runs: list[tuple[int, int, DataRun]]) -> None:
        """Copy logged runs to their home blocks: from the folio when it still holds that
        version, else from the log. Runs whose blocks were unmapped since are skipped."""
        bs = self.bs
        jobs: list[tuple[int, Buffer, int, int, Folio | None]] = []  # dblock, buf, off, n
        # A folio's buffer is used only if it is taken for this home write at once, in
        # the same step as the check: the log reads below await, and a writer could
        # otherwise put newer data into the buffer before the home write starts.
        held: dict[int, Folio] = {}  # by id: checkpoints may hold thousands
        try:
            for ino, index, run in runs:
                inode = self.md.inodes.get(ino)
                if inode is None or inode.extents is None:
                    continue
                m = self.cache.mappings.get(ino)
                folio = m.folios.get(index) if m is not None else None
                for f, d, n in extents_of(inode).runs(run.fblock, run.nblocks):
                    if d is None or d != run.dblock + (f - run.fblock):
                        continue
                    part = None
                    if folio is not None and folio.logged_seq == run.seq and \
                            (id(folio) in held or not folio.busy):
                        fb = f - folio.fblock
                        part = mask_range(fb, n)
                        if folio.dirty & part or (folio.uptodate & part) != part:
                            part = None
                    if part is not None and folio is not None:
                        if id(folio) not in held:
                            self.cache.start_home_copy(folio)
                            held[id(folio)] = folio
                        jobs.append((d, folio.buf, (f - folio.fblock) * bs, n, folio))
                    elif run.buf is not None:  # absorbed: never written to the log
                        jobs.append((d, run.buf, run.buf_off + (f - run.fblock) * bs, n,
                                     None))
                    else:
                        buf = await self.dev.read(self.journal.sb.log_offset + run.log_pos
                                                  + (f - run.fblock) * bs, n * bs)
                        jobs.append((d, buf, 0, n, None))
            jobs.sort(key=lambda j: j[0])
            i = 0
            while i < len(jobs):
                d0 = jobs[i][0]
                segs: list[Segment] = []
                nblocks = 0
                while i < len(jobs) and jobs[i][0] == d0 + nblocks and len(segs) < MAX_IOV \
                        and nblocks * bs < MAX_IO_BYTES:
                    _, buf, off, n, _ = jobs[i]
                    segs.append((buf, off, n * bs))
                    nblocks += n
                    i += 1
                await self.dev.writev(d0 * bs, segs, "data")
        finally:
            for folio in held.values():
                self.cache.end_home_copy(folio)

