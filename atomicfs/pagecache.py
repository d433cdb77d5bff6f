"""The daemon's page cache: folios with per-block state, mappings, dirty accounting, LRU.

A *folio* is a folio_size-aligned piece of one file in an aligned native buffer. For a file
with atomic unit U the folio size is U and its buffer always covers the whole unit; other
files use the mount's default folio size, but the buffer covers only the first 2^k blocks
that hold cached data and grows when more of the folio is wanted (as the kernel picks the
order of a large folio), so that a 100-byte file pins 4 KiB, not 64 KiB. Blocks past the
buffer are neither uptodate nor dirty.
Its state, after iomap's per-folio state:

    uptodate   bitmap: blocks whose buffer content is valid
    dirty      bitmap: blocks newer in memory than on the device
    reserved   bitmap: dirty blocks with no device block yet, for which space is reserved
    atomic     the last write covered the whole folio: write it back as one untorn unit
    group      the folio belongs to a *write group*: one write request that must reach the
               device as a whole (several whole units of an atomic file, or an RWF_ATOMIC
               write announced by the preload library); all members go into one log batch
    io         the kind of I/O in flight from this buffer (`IOKind`), io_mask its blocks
    locked     blocks are being read in
    logged_seq the newest copy of this folio is in log batch logged_seq (software path);
               the folio stays in memory until a checkpoint has written it home

Every change of that state is one of the named transitions of `PageCache`, each checked
against `TRANSITIONS` (InvalidTransition, nothing changed, when it is not legal). Nothing
outside this module assigns a folio's state.

The *mapping* of a file holds its folios and two pieces of RFC state: the number of
write-throughs in flight and the stable flag (set by the first, cleared by the last). While
a mapping is stable, nobody modifies a folio under writeback; they wait (stable_waits).
The objects themselves are in folio.py; the buffered read and write paths that use all
this are in filemap.py.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

import trio

from atomicfs.folio import (DATA_IO, MAX_GROUP_BYTES, STABLE_IO, Folio, InvalidTransition,
                            IOKind, Mapping, WriteGroup, mask_range, mask_runs, popcount)
from atomicfs.metadata import Inode
from atomicfs.native import ALIGN, Buffer
from atomicfs.stats import Counters
from atomicfs.watchdog import waiting

__all__ = ["DATA_IO", "MAX_GROUP_BYTES", "STABLE_IO", "TRANSITIONS", "Folio", "IOKind",
           "InvalidTransition", "Mapping", "PageCache", "WriteGroup", "mask_range",
           "mask_runs", "popcount"]

# ------------------------------------------------------------ legal transitions
# Each transition of PageCache, and when it is legal for folio f and the blocks `mask` it
# names (mask is ignored where the call takes none). A call that is not legal raises
# InvalidTransition and changes nothing. tests/unit/test_pagecache.py drives random
# sequences against this same table.

def _idle(f: Folio) -> bool:
    return f.io is IOKind.NONE and not f.locked


def _in_buffer(f: Folio, mask: int) -> bool:
    return mask >= 0 and mask >> (f.size // f.mapping.block_size) == 0


TRANSITIONS: dict[str, Callable[[Folio, int], bool]] = {
    "mark_uptodate": lambda f, mask: _in_buffer(f, mask),  # read in, or zeros past EOF
    "mark_dirty": lambda f, mask: mask & ~f.uptodate == 0,  # a write copied them in
    "set_atomic": lambda f, mask: f.dirty == f.uptodate == f.full,  # covered whole
    "clear_atomic": lambda f, mask: True,  # a partial write
    "start_writeback": lambda f, mask: _idle(f) and mask != 0 and mask & ~f.dirty == 0,
    "start_home_copy": lambda f, mask: _idle(f),  # checkpoint: logged blocks go home
    "end_writeback": lambda f, mask: f.io in DATA_IO,  # failed blocks dirty again
    "end_home_copy": lambda f, mask: f.io is IOKind.HOME,
    "take_clean": lambda f, mask: _idle(f) and mask & ~f.dirty == 0,  # copied into the log
    "set_logged": lambda f, mask: True,  # its newest copy is in a log batch
    "clear_logged": lambda f, mask: True,  # a checkpoint wrote it home
    "lock": lambda f, mask: not f.locked,  # blocks are being read in
    "unlock": lambda f, mask: f.locked,
    "pin": lambda f, mask: True,  # a request uses it
    "unpin": lambda f, mask: f.pins > 0,
    "discard_blocks": lambda f, mask: _idle(f),  # truncated away
    "reserve_blocks": lambda f, mask: _in_buffer(f, mask),  # delalloc: space promised
    "unreserve_blocks": lambda f, mask: True,  # converted to extents, or released
}


def _check(name: str, folio: Folio, mask: int = 0) -> None:
    if not TRANSITIONS[name](folio, mask):
        raise InvalidTransition(f"{name} {mask:#x} not allowed: {folio.state()}")


class PageCache:
    """All mappings, the memory bound, dirty accounting and the LRU of clean folios.

    The bound: `bytes` (every folio's buffer) plus the spare buffers kept for reuse stay
    within `limit` whenever anything can be evicted; clean folios are dropped as soon as
    the limit is passed (`trim`), and writers are throttled while folios that cannot be
    dropped (dirty, under I/O, logged, in use) hold more than half of it."""

    def __init__(self, block_size: int, limit: int, default_folio_size: int,
                 counters: Counters, align: int = ALIGN) -> None:
        self.block_size = block_size
        self.align = align  # of folio buffers: what O_DIRECT on the device needs
        self.limit = limit
        self.default_folio_size = default_folio_size
        self.counters = counters
        self.mappings: dict[int, Mapping] = {}
        self.lru: OrderedDict[tuple[int, int], Folio] = OrderedDict()
        self.bytes = 0
        self.lru_bytes = 0  # bytes of the folios on the LRU (clean, idle: evictable)
        self.dirty_bytes = 0
        self.writeback_bytes = 0
        self.logged_bytes = 0  # folios pinned until a checkpoint writes them home
        # Those folios, by id: a checkpoint releases them without walking the whole cache.
        self._logged: dict[int, Folio] = {}
        self._room: trio.Event | None = None  # throttled writers wait on it
        # Buffers of dropped folios, reused for new ones: allocating and first touching
        # fresh memory costs more than zeroing a buffer that is already mapped. They count
        # against the limit too, and are freed first when room is needed.
        self._spare: dict[int, list[Buffer]] = {}
        self._spare_bytes = 0
        self._spare_limit = min(limit // 8, 32 << 20)

    @property
    def pinned_bytes(self) -> int:
        """Bytes of folios that eviction cannot drop now."""
        return self.bytes - self.lru_bytes

    @property
    def spare_bytes(self) -> int:
        return self._spare_bytes

    # --------------------------------------------------------- state transitions

    def mark_uptodate(self, folio: Folio, mask: int) -> None:
        """Blocks in mask hold valid data now (read in, or zeros where nothing is)."""
        _check("mark_uptodate", folio, mask)
        folio.uptodate |= mask

    def mark_dirty(self, folio: Folio, mask: int) -> None:
        """Blocks in mask now hold data newer than the device (they must be uptodate)."""
        _check("mark_dirty", folio, mask)
        new = mask & ~folio.dirty
        if not new:
            return
        if not folio.dirty:
            folio.dirty_since = time.monotonic()
            folio.mapping.dirty[folio.index] = folio
        folio.dirty |= new
        self.dirty_bytes += popcount(new) * self.block_size
        self._lru_remove(folio)

    def set_atomic(self, folio: Folio) -> None:
        """A write covered the whole folio: it goes out as one untorn unit."""
        _check("set_atomic", folio)
        folio.atomic = True

    def clear_atomic(self, folio: Folio) -> bool:
        """A partial write touched the folio; returns whether it was atomic."""
        was = folio.atomic
        folio.atomic = False
        return was

    def start_writeback(self, folio: Folio, mask: int, kind: IOKind) -> bool:
        """Take the dirty blocks in mask for I/O of the given kind; returns whether the
        folio was atomic (writeback clears the tag)."""
        if kind not in DATA_IO:
            raise InvalidTransition(f"writeback of kind {kind.value}: {folio.state()}")
        _check("start_writeback", folio, mask)
        folio.io = kind
        folio.io_mask = mask
        folio.mapping.busy[folio.index] = folio
        folio.mapping.data_busy[folio.index] = folio
        self._clear_dirty(folio, mask)
        self.writeback_bytes += popcount(mask) * self.block_size
        was_atomic = folio.atomic
        folio.atomic = False
        self._lru_remove(folio)
        return was_atomic

    def start_home_copy(self, folio: Folio) -> None:
        """A checkpoint copies the folio's logged blocks home from its buffer: they must
        not change meanwhile (stable), though none of them is dirty."""
        _check("start_home_copy", folio)
        folio.io = IOKind.HOME
        folio.io_mask = 0
        folio.mapping.busy[folio.index] = folio
        self._lru_remove(folio)

    def end_home_copy(self, folio: Folio) -> None:
        """The checkpoint's copy from the buffer is done."""
        _check("end_home_copy", folio)
        self._end_io(folio, 0, False)

    def end_writeback(self, folio: Folio, failed_mask: int = 0,
                      restore_atomic: bool = False) -> None:
        """The writeback finished; blocks in failed_mask did not reach the device and are
        dirty again (with the atomic tag back if the whole unit failed)."""
        _check("end_writeback", folio)
        self._end_io(folio, failed_mask & folio.io_mask, restore_atomic)

    def _end_io(self, folio: Folio, failed_mask: int, restore_atomic: bool) -> None:
        self.writeback_bytes -= popcount(folio.io_mask) * self.block_size
        folio.io = IOKind.NONE
        folio.io_mask = 0
        if not folio.locked:
            folio.mapping.busy.pop(folio.index, None)
            folio.mapping.data_busy.pop(folio.index, None)
        if failed_mask:
            self.mark_dirty(folio, failed_mask)
            if restore_atomic:
                folio.atomic = True
        self._refresh_lru(folio)
        folio._wake()
        self._room_freed()

    def take_clean(self, folio: Folio, mask: int) -> bool:
        """Blocks in mask were copied into the log: clean now. Returns was_atomic."""
        _check("take_clean", folio, mask)
        self._clear_dirty(folio, mask)
        was_atomic = folio.atomic
        folio.atomic = False
        self._refresh_lru(folio)
        return was_atomic

    def set_logged(self, folio: Folio, seq: int) -> None:
        """Its newest copy is in log batch seq: keep it in memory until it is home."""
        _check("set_logged", folio)
        if not folio.logged_seq:
            self.logged_bytes += folio.size
            self._logged[id(folio)] = folio
        folio.logged_seq = seq
        self._lru_remove(folio)

    def clear_logged(self, folio: Folio, upto_seq: int) -> None:
        """A checkpoint covering batch upto_seq wrote the folio home."""
        if folio.logged_seq and folio.logged_seq <= upto_seq:
            folio.logged_seq = 0
            self.logged_bytes -= folio.size
            del self._logged[id(folio)]
            self._refresh_lru(folio)
            self._room_freed()

    def checkpointed(self, upto_seq: int) -> None:
        """A checkpoint wrote home everything logged up to batch upto_seq: those folios
        may go, and writers throttled on them may go on."""
        for folio in list(self._logged.values()):
            self.clear_logged(folio, upto_seq)
        self.trim()

    def lock(self, folio: Folio) -> None:
        _check("lock", folio)
        folio.locked = True
        folio.mapping.busy[folio.index] = folio
        folio.mapping.data_busy[folio.index] = folio
        self._lru_remove(folio)

    def unlock(self, folio: Folio) -> None:
        _check("unlock", folio)
        folio.locked = False
        if not folio.writeback:
            folio.mapping.busy.pop(folio.index, None)
        if folio.io not in DATA_IO:
            folio.mapping.data_busy.pop(folio.index, None)
        self._refresh_lru(folio)
        folio._wake()

    def pin(self, folio: Folio) -> None:
        """Keep the folio in memory while a request uses it."""
        folio.pins += 1
        self._lru_remove(folio)

    def unpin(self, folio: Folio) -> None:
        _check("unpin", folio)
        folio.pins -= 1
        self._refresh_lru(folio)
        if not folio.pins and not folio.busy:  # only `wait_unused` waits for this
            folio._wake()

    def reserve_blocks(self, folio: Folio, mask: int) -> None:
        """Space is reserved for these blocks (delalloc.py keeps the allocator's count)."""
        _check("reserve_blocks", folio, mask)
        folio.mapping.reserved_blocks += popcount(mask & ~folio.reserved)
        folio.reserved |= mask

    def unreserve_blocks(self, folio: Folio, mask: int) -> int:
        """Forget reservations of blocks in mask; returns how many were reserved."""
        n = popcount(folio.reserved & mask)
        folio.reserved &= ~mask
        folio.mapping.reserved_blocks -= n
        return n

    def _clear_dirty(self, folio: Folio, mask: int) -> None:
        cleared = folio.dirty & mask
        folio.dirty &= ~mask
        self.dirty_bytes -= popcount(cleared) * self.block_size
        if not folio.dirty:
            folio.mapping.dirty.pop(folio.index, None)
        if cleared:
            self._room_freed()

    def discard_blocks(self, folio: Folio, mask: int) -> int:
        """Blocks beyond a truncation: not valid, not dirty, zeroed. Returns reservations
        released. Not while the folio is under I/O: its data must not change, and a failed
        writeback must find its blocks still valid to make them dirty again."""
        _check("discard_blocks", folio, mask)
        bs = self.block_size
        held = mask_range(0, folio.size // bs)  # blocks past the buffer are zeros already
        for first, count in mask_runs(mask & held):
            folio.buf.zero(first * bs, count * bs)
        self._clear_dirty(folio, mask)
        folio.uptodate &= ~mask
        released = self.unreserve_blocks(folio, mask)
        folio.atomic = False
        if not folio.dirty:
            self.leave_group(folio)
        self._refresh_lru(folio)
        return released

    @staticmethod
    def form_group(folios: list[Folio]) -> WriteGroup:
        """The folios of one write request become a write group (none is in one: a write
        sends a pending group out before it changes a member)."""
        for folio in folios:
            if folio.group is not None:
                raise InvalidTransition(f"already in a write group: {folio.state()}")
        group = WriteGroup(folios)
        for folio in folios:
            folio.group = group
        return group

    @staticmethod
    def dissolve_group(group: WriteGroup, seq: int) -> None:
        """The group went out (in batch seq), or its protection was given up (seq 0)."""
        group.seq = seq
        for folio in group.folios:
            folio.group = None

    @staticmethod
    def rejoin_group(group: WriteGroup, folios: list[Folio]) -> None:
        """A hardware write of the dissolved group did not happen: it is pending again,
        with the members that are still wholly dirty."""
        group.seq = -1
        for folio in folios:
            folio.group = group

    @staticmethod
    def leave_group(folio: Folio) -> None:
        """The folio's grouped blocks are gone (truncated): the rest of the group stays."""
        group = folio.group
        if group is not None:
            group.folios.remove(folio)
            folio.group = None

    def drop_folio(self, folio: Folio) -> None:
        """Forget a folio past a truncation that nobody uses (its reservations released)."""
        if folio.busy or folio.pins or folio.reserved:
            raise InvalidTransition(f"dropping a folio in use: {folio.state()}")
        self._remove_folio(folio)

    # ------------------------------------------------------------------ mappings

    def mapping(self, inode: Inode, folio_size: int) -> Mapping:
        m = self.mappings.get(inode.ino)
        if m is None:
            atomic = folio_size != self.default_folio_size or inode.atomic_unit > 0
            m = Mapping(self.block_size, inode.ino, folio_size, atomic)
            self.mappings[inode.ino] = m
        return m

    def drop_mapping(self, ino: int) -> None:
        """Forget a file's folios (it was deleted or is being re-shaped); none may be busy
        or hold reservations (the caller released them)."""
        m = self.mappings.get(ino)
        if m is None:
            return
        for folio in m.folios.values():
            if folio.busy or folio.reserved:
                raise InvalidTransition(f"dropping busy or reserved {folio.state()}")
        del self.mappings[ino]
        for folio in list(m.folios.values()):
            self._remove_folio(folio)

    # -------------------------------------------------------------------- folios

    def find_folio(self, m: Mapping, index: int) -> Folio | None:
        folio = m.folios.get(index)
        if folio is not None and folio.in_lru:
            self.lru.move_to_end((m.ino, index))
        return folio

    def _buffer_size(self, m: Mapping, nblocks: int) -> int:
        """Buffer size for a folio whose first nblocks blocks are wanted: the whole folio
        for an atomic unit, else the next power of two of blocks (the folio's order)."""
        if m.atomic or nblocks >= m.blocks_per_folio:
            return m.folio_size
        return (1 << max(0, nblocks - 1).bit_length()) * self.block_size

    def get_folio(self, m: Mapping, index: int, nblocks: int | None = None,
                  zeroed: bool = True) -> Folio:
        """The folio at index, created if missing with room for its first nblocks blocks
        (default: all). An existing folio may be smaller: see `fit`. zeroed=False: a new
        folio's buffer may hold old bytes, because the caller overwrites all of it before
        any other task can see the folio, or else zeroes it (blocks that are not uptodate
        must read as zeros)."""
        folio = self.find_folio(m, index)
        if folio is not None:
            self.counters.cache_hits += 1
            return folio
        self.counters.cache_misses += 1
        size = self._buffer_size(m, m.blocks_per_folio if nblocks is None else nblocks)
        folio = Folio(m, index, self._new_buffer(size, zeroed=zeroed))
        m.folios[index] = folio
        self.bytes += size
        self._lru_add(folio)
        return folio

    def fit(self, folio: Folio, nblocks: int) -> bool:
        """Grow the folio's buffer to hold its first nblocks blocks (a named transition:
        the content moves to a larger buffer). Not while a read fills it or a stable
        writeback needs it unchanged: returns False, the caller waits and tries again. A
        non-stable writeback keeps writing from the old buffer (its I/O holds it); the
        blocks it writes are copied, and stay dirty if it fails."""
        m = folio.mapping
        size = self._buffer_size(m, nblocks)
        old = folio.buf
        if size <= old.size:
            return True
        if m.must_wait(folio):
            return False
        buf = self._new_buffer(size, keep=old.size)
        buf.copy_from(0, old, 0, old.size)
        folio.buf = buf
        grown = size - old.size
        self.bytes += grown
        if folio.in_lru:
            self.lru_bytes += grown
        if folio.logged_seq:
            self.logged_bytes += grown
        if not folio.writeback:  # else the I/O still reads it; it is freed after
            self._recycle(old)
        return True

    def _lru_add(self, folio: Folio) -> None:
        if not folio.in_lru and folio.evictable:
            self.lru[(folio.mapping.ino, folio.index)] = folio
            folio.in_lru = True
            self.lru_bytes += folio.size
            self._room_freed()

    def _lru_remove(self, folio: Folio) -> None:
        if folio.in_lru:
            del self.lru[(folio.mapping.ino, folio.index)]
            folio.in_lru = False
            self.lru_bytes -= folio.size

    def _refresh_lru(self, folio: Folio) -> None:
        if folio.evictable:
            self._lru_add(folio)
        else:
            self._lru_remove(folio)

    def _remove_folio(self, folio: Folio) -> None:
        m = folio.mapping
        if not folio.in_lru:
            self._room_freed()  # it held memory eviction could not take
        self._lru_remove(folio)
        self.leave_group(folio)
        if folio.logged_seq:
            folio.logged_seq = 0
            self.logged_bytes -= folio.size
            del self._logged[id(folio)]
        if folio.dirty:
            self.dirty_bytes -= popcount(folio.dirty) * self.block_size
            m.dirty.pop(folio.index, None)
        del m.folios[folio.index]
        self.bytes -= folio.size
        self._recycle(folio.buf)

    def _new_buffer(self, size: int, keep: int = 0, zeroed: bool = True) -> Buffer:
        """A zeroed buffer (not zeroed if it is a spare and not `zeroed`): a spare one of
        that size, else fresh memory, for which clean folios and spare buffers make room
        first (keep: bytes of the caller's folio that are about to be released, already
        in `bytes`)."""
        spare = self._spare.get(size)
        if not spare:
            # Making room drops clean folios; the buffer of one of this size is kept for
            # us: reusing it costs a zeroing, not an allocation and first touch of fresh
            # memory (a sequential write that runs through the cache evicts one folio for
            # each new one).
            self.evict(size - keep, reuse=size)
            spare = self._spare.get(size)
        if spare:
            buf = spare.pop()
            self._spare_bytes -= size
            if zeroed:
                buf.zero()
            return buf
        return Buffer(size, self.align)

    def _recycle(self, buf: Buffer) -> None:
        """Keep the buffer of a dropped folio for the next new one, while the folios and
        the spares together stay within the limit. Nothing else uses it: a folio is
        dropped only when no I/O, lock or request holds it."""
        size = buf.size
        if self._spare_bytes + size <= self._spare_limit and \
                self.bytes + self._spare_bytes + size <= self.limit:
            self._spare.setdefault(size, []).append(buf)
            self._spare_bytes += size

    def _free_spares(self, room: int, reuse: int = 0) -> None:
        """Free spare buffers until folios, spares and `room` more bytes fit the limit,
        but keep one of size `reuse` (the caller takes it)."""
        for size in sorted(self._spare, reverse=True):
            spare = self._spare[size]
            keep = 1 if size == reuse else 0
            while len(spare) > keep and self.bytes + self._spare_bytes + room > self.limit:
                spare.pop()
                self._spare_bytes -= size

    def evict(self, room: int = 0, reuse: int = 0) -> int:
        """Free spare buffers, then drop clean folios, least recently used first, until
        `room` more bytes fit within the limit. reuse: the caller takes a spare buffer of
        that size if there is one, which moves it from the spares to the folios (it needs
        no room), so one is kept and room counts it."""
        evicted = 0
        while True:
            credit = reuse if reuse and self._spare.get(reuse) else 0
            # including the buffer of a folio just dropped
            self._free_spares(room - credit, reuse)
            if not self.lru or self.bytes + self._spare_bytes + room - credit <= self.limit:
                break
            _, folio = self.lru.popitem(last=False)
            folio.in_lru = False
            self.lru_bytes -= folio.size
            self._remove_folio(folio)
            evicted += 1
        self.counters.cache_evictions += evicted
        return evicted

    def trim(self) -> int:
        """Back within the limit as soon as folios became clean: called where writeback,
        a checkpoint or a request has just released folios (not inside the transitions,
        whose callers may still hold the folios they pass)."""
        if self.bytes + self._spare_bytes <= self.limit:
            return 0
        return self.evict()

    # ------------------------------------------------------------------- waiting

    def _room_freed(self) -> None:
        """Less is dirty, under I/O or unevictable: throttled writers look again."""
        if self._room is not None:
            self._room.set()
            self._room = None

    def wake_throttled(self) -> None:
        """Let throttled writers look again (the flusher does, when the log failed)."""
        self._room_freed()

    async def wait_for_room(self) -> None:
        """Until a transition frees room (see `_room_freed`) or `wake_throttled`."""
        if self._room is None:
            self._room = trio.Event()
        with waiting("page cache room (dirty limit)"):
            await self._room.wait()

    async def wait_folio(self, folio: Folio) -> None:
        """Wait for a folio's lock or stable writeback; counts stable waits."""
        stable = folio.mapping.stable_io(folio)
        t0 = time.monotonic_ns()
        await folio.wait_unlocked_or_written()
        if stable:
            self.counters.stable_waits += 1
            self.counters.stable_wait_ns += time.monotonic_ns() - t0

    @staticmethod
    async def wait_idle(folios: list[Folio]) -> bool:
        """Return when none of the folios is locked or under I/O (in one step with what
        the caller does next, if that does not await); whether any was."""
        waited = False
        while True:
            busy = [f for f in folios if f.busy]
            if not busy:
                return waited
            waited = True
            for folio in busy:
                while folio.busy:
                    await folio.wait_unlocked_or_written()

    @staticmethod
    async def wait_data_io(m: Mapping) -> None:
        """Wait for the writeback of dirty blocks and the reads in flight on this file when
        called. A checkpoint's home copies are of data already durable in the log: nobody
        syncing the file needs to wait for them. (data_busy holds exactly the folios
        this waits for: most fsyncs find it empty and return without awaiting.)"""
        for folio in list(m.data_busy.values()):
            while folio.locked or folio.io in DATA_IO:
                await folio.wait_unlocked_or_written()

    @staticmethod
    async def wait_unused(m: Mapping) -> None:
        """Until no folio of the file is locked, under I/O or used by a request."""
        while True:
            used = [f for f in m.folios.values() if f.busy or f.pins]
            if not used:
                return
            await used[0].wait_unlocked_or_written()
