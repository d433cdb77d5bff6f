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
    writeback  an I/O from this buffer is in flight
    wb_stable  that I/O needs the buffer unchanged (atomic, write-through, or home copy)
    locked     blocks are being read in
    logged_seq the newest copy of this folio is in log batch logged_seq (software path);
               the folio stays in memory until a checkpoint has written it home

The *mapping* of a file holds its folios and two pieces of RFC state: the number of
write-throughs in flight and the stable flag (set by the first, cleared by the last). While
a mapping is stable, nobody modifies a folio under writeback; they wait (stable_waits).

This module also holds the generic buffered read and write paths (the role of
mm/filemap.c): they decide which blocks to read, wait, copy and mark; the I/O itself is done
by a FolioIO (the writeback layer).
"""
from __future__ import annotations

import errno
import logging
import time
from collections import OrderedDict
from typing import Iterator, Protocol

import trio

from atomicfs import format as fmt
from atomicfs.metadata import Inode
from atomicfs.native import ALIGN, Buffer, copy_into
from atomicfs.stats import Counters
from atomicfs.watchdog import waiting

log = logging.getLogger(__name__)

# The largest write group: what FUSE sends in one request; a log batch holds it whole.
MAX_GROUP_BYTES = fmt.MAX_ATOMIC_UNIT


class InvalidTransition(AssertionError):
    """A folio state change that the state machine does not allow."""


class FolioIO(Protocol):
    """What the page cache needs from the writeback layer."""

    async def read_folios(self, inode: Inode, mapping: "Mapping",
                          needs: list[tuple["Folio", int]]) -> None: ...

    async def balance_dirty(self) -> None: ...

    async def write_through(self, inode: Inode, mapping: "Mapping",
                            items: list[tuple["Folio", int]], size_grew: bool,
                            durable: bool = True) -> None: ...

    def inode_written(self, inode: Inode, size_grew: bool) -> None: ...

    def reserve_for_write(self, inode: Inode, mapping: "Mapping",
                          items: list[tuple["Folio", int]]) -> None: ...

    async def write_group(self, inode: Inode, mapping: "Mapping",
                          group: "WriteGroup") -> None: ...


def mask_range(first: int, count: int) -> int:
    """Bitmask of blocks first..first+count-1."""
    return ((1 << count) - 1) << first


def mask_runs(mask: int) -> Iterator[tuple[int, int]]:
    """(first block, count) of each run of set bits, in order."""
    i = 0
    while mask:
        if mask & 1:
            start = i
            while mask & 1:
                mask >>= 1
                i += 1
            yield start, i - start
        else:
            low = (mask & -mask).bit_length() - 1
            mask >>= low
            i += low


def popcount(mask: int) -> int:
    return mask.bit_count()


class WriteGroup:
    """The folios of one write request that must be untorn as a whole. Writeback logs all
    their dirty blocks in one batch (`Writeback.write_group`); until then a later write to
    any member first sends the group out, so that no crash can show that later write
    without the whole group. `seq` is the log batch that took it (-1 while pending)."""

    __slots__ = ("folios", "seq")

    def __init__(self, folios: list["Folio"]) -> None:
        self.folios = folios
        self.seq = -1

    @property
    def pending(self) -> bool:
        return self.seq < 0

    def dissolve(self, seq: int) -> None:
        """The group went out (in batch seq), or its protection was given up (seq 0)."""
        self.seq = seq
        for folio in self.folios:
            folio.group = None


class Folio:
    __slots__ = ("mapping", "index", "buf", "uptodate", "dirty", "reserved", "atomic",
                 "writeback", "wb_stable", "wb_mask", "locked", "logged_seq", "dirty_since",
                 "_event", "in_lru", "pins", "group")

    def __init__(self, mapping: "Mapping", index: int, buf: Buffer) -> None:
        self.mapping = mapping
        self.index = index
        self.buf = buf  # zeroed: blocks that are not uptodate always hold zeros
        self.uptodate = 0
        self.dirty = 0
        self.reserved = 0
        self.atomic = False
        self.writeback = False
        self.wb_stable = False
        self.wb_mask = 0
        self.locked = False
        self.logged_seq = 0
        self.dirty_since = 0.0
        self._event: trio.Event | None = None
        self.in_lru = False
        self.pins = 0  # requests using the folio right now
        self.group: WriteGroup | None = None

    @property
    def fblock(self) -> int:
        """First file block of this folio."""
        return self.index * self.mapping.blocks_per_folio

    @property
    def size(self) -> int:
        """Bytes of memory it holds (its buffer: the whole folio or a prefix of it)."""
        return self.buf.size

    @property
    def evictable(self) -> bool:
        return not (self.dirty or self.writeback or self.locked or self.logged_seq
                    or self.pins)

    def state(self) -> str:
        return (f"folio {self.mapping.ino}:{self.index} uptodate={self.uptodate:#x} "
                f"dirty={self.dirty:#x} atomic={self.atomic} writeback={self.writeback} "
                f"locked={self.locked} logged={self.logged_seq}")

    async def wait_unlocked_or_written(self) -> None:
        """Wait for the current lock holder or writeback to finish."""
        if self._event is None:
            self._event = trio.Event()
        with waiting(f"folio {self.mapping.ino}:{self.index} (locked={self.locked}, "
                     f"writeback={self.writeback})"):
            await self._event.wait()

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None


class Mapping:
    """The page-cache side of one file."""

    __slots__ = ("cache", "ino", "folio_size", "blocks_per_folio", "folios", "dirty",
                 "stable", "wt_inflight", "err_seq", "err_seen", "flush_gen", "meta_seq",
                 "atomic", "ra_next", "ra_window", "busy")

    def __init__(self, cache: "PageCache", ino: int, folio_size: int, atomic: bool) -> None:
        self.cache = cache
        self.ino = ino
        self.folio_size = folio_size
        self.blocks_per_folio = folio_size // cache.block_size
        self.folios: dict[int, Folio] = {}
        self.dirty: dict[int, Folio] = {}  # folios with dirty blocks
        self.stable = False
        self.wt_inflight = 0
        self.err_seq = 0  # writeback errors recorded (errseq counter)
        self.err_seen = True  # has any descriptor seen the latest error?
        self.flush_gen = -1  # device flush generation covering its last in-place write
        self.meta_seq = -1  # newest log batch holding this file's extents or data
        self.busy: dict[int, Folio] = {}  # folios under writeback or locked
        self.atomic = atomic
        self.ra_next = -1
        self.ra_window = 0

    # ---------------------------------------------------------------- RFC state

    def writethrough_begin(self) -> None:
        """A write-through starts: the first one makes the mapping stable."""
        self.wt_inflight += 1
        self.stable = True

    def writethrough_end(self) -> None:
        if self.wt_inflight <= 0:
            raise InvalidTransition(f"write-through end without begin on {self.ino}")
        self.wt_inflight -= 1
        if self.wt_inflight == 0:
            self.stable = False

    def record_error(self) -> None:
        """A background writeback of this file failed (errseq_set)."""
        self.err_seq += 1
        self.err_seen = False

    def must_wait(self, folio: Folio) -> bool:
        """May folio be modified now? Not while its I/O needs it stable."""
        return folio.locked or (folio.writeback and (self.stable or folio.wb_stable))

    def counts(self) -> dict[str, int]:
        folios = self.folios.values()
        return {
            "cached": len(self.folios),
            "bytes": sum(f.size for f in folios),
            "dirty": len(self.dirty),
            "writeback": sum(1 for f in folios if f.writeback),
            "atomic": sum(1 for f in folios if f.atomic),
            "logged": sum(1 for f in folios if f.logged_seq),
            "writethrough_inflight": self.wt_inflight,
            "stable": int(self.stable),
        }


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
        self.dirty_changed = trio.Event()
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

    # ------------------------------------------------------------------ mappings

    def mapping(self, inode: Inode, folio_size: int) -> Mapping:
        m = self.mappings.get(inode.ino)
        if m is None:
            m = Mapping(self, inode.ino, folio_size, folio_size != self.default_folio_size
                        or inode.atomic_unit > 0)
            self.mappings[inode.ino] = m
        return m

    def drop_mapping(self, ino: int) -> None:
        """Forget a file's folios (it was deleted or is being re-shaped); none may be busy."""
        m = self.mappings.get(ino)
        if m is None:
            return
        for folio in m.folios.values():
            if folio.writeback or folio.locked:
                raise InvalidTransition(f"dropping busy {folio.state()}")
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

    def get_folio(self, m: Mapping, index: int, nblocks: int | None = None) -> Folio:
        """The folio at index, created if missing with room for its first nblocks blocks
        (default: all). An existing folio may be smaller: see `fit`."""
        folio = self.find_folio(m, index)
        if folio is not None:
            self.counters.cache_hits += 1
            return folio
        self.counters.cache_misses += 1
        size = self._buffer_size(m, m.blocks_per_folio if nblocks is None else nblocks)
        folio = Folio(m, index, self._new_buffer(size))
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
        if folio.locked or (folio.writeback and (folio.wb_stable or m.stable)):
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
        self._lru_remove(folio)
        self.leave_group(folio)
        if folio.logged_seq:
            folio.logged_seq = 0
            self.logged_bytes -= folio.size
        if folio.dirty:
            self.dirty_bytes -= popcount(folio.dirty) * self.block_size
            m.dirty.pop(folio.index, None)
        del m.folios[folio.index]
        self.bytes -= folio.size
        self._recycle(folio.buf)

    def _new_buffer(self, size: int, keep: int = 0) -> Buffer:
        """A zeroed buffer: a spare one of that size, else fresh memory, for which clean
        folios and spare buffers make room first (keep: bytes of the caller's folio that
        are about to be released, already in `bytes`)."""
        spare = self._spare.get(size)
        if spare:
            buf = spare.pop()
            self._spare_bytes -= size
            buf.zero()
            return buf
        self.evict(size - keep)
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

    def _free_spares(self, room: int) -> None:
        """Free spare buffers until folios, spares and `room` more bytes fit the limit."""
        for size in sorted(self._spare, reverse=True):
            spare = self._spare[size]
            while spare and self.bytes + self._spare_bytes + room > self.limit:
                spare.pop()
                self._spare_bytes -= size

    def evict(self, room: int = 0) -> int:
        """Free spare buffers, then drop clean folios, least recently used first, until
        `room` more bytes fit within the limit."""
        evicted = 0
        while True:
            self._free_spares(room)  # including the buffer of a folio just dropped
            if not self.lru or self.bytes + self._spare_bytes + room <= self.limit:
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

    # --------------------------------------------------------- state transitions

    def mark_uptodate(self, folio: Folio, mask: int) -> None:
        folio.uptodate |= mask

    def mark_dirty(self, folio: Folio, mask: int) -> None:
        """Blocks in mask now hold data newer than the device (they must be uptodate)."""
        if mask & ~folio.uptodate:
            raise InvalidTransition(f"dirtying blocks that are not uptodate: {folio.state()}")
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
        full = mask_range(0, folio.mapping.blocks_per_folio)
        if folio.dirty != full or folio.uptodate != full:
            raise InvalidTransition(f"atomic folio must be wholly dirty: {folio.state()}")
        folio.atomic = True

    def clear_atomic(self, folio: Folio) -> bool:
        """A partial write touched the folio; returns whether it was atomic."""
        was = folio.atomic
        folio.atomic = False
        return was

    def start_writeback(self, folio: Folio, mask: int, stable: bool) -> bool:
        """Take the dirty blocks in mask for I/O; returns whether the folio was atomic
        (writeback clears the tag)."""
        if folio.writeback:
            raise InvalidTransition(f"writeback already running: {folio.state()}")
        if folio.locked:
            raise InvalidTransition(f"writeback of a locked folio: {folio.state()}")
        if mask & ~folio.dirty or not mask:
            raise InvalidTransition(f"writeback of clean blocks {mask:#x}: {folio.state()}")
        folio.writeback = True
        folio.wb_stable = stable
        folio.wb_mask = mask
        folio.mapping.busy[folio.index] = folio
        self._clear_dirty(folio, mask)
        self.writeback_bytes += popcount(mask) * self.block_size
        was_atomic = folio.atomic
        folio.atomic = False
        self._lru_remove(folio)
        return was_atomic

    def end_writeback(self, folio: Folio, failed_mask: int = 0,
                      restore_atomic: bool = False) -> None:
        """The I/O finished; blocks in failed_mask did not reach the device and are dirty
        again (with the atomic tag back if the whole unit failed)."""
        if not folio.writeback:
            raise InvalidTransition(f"end of writeback that was not running: {folio.state()}")
        self.writeback_bytes -= popcount(folio.wb_mask) * self.block_size
        failed_mask &= folio.wb_mask
        folio.writeback = False
        folio.wb_stable = False
        folio.wb_mask = 0
        if not folio.locked:
            folio.mapping.busy.pop(folio.index, None)
        if failed_mask:
            self.mark_dirty(folio, failed_mask)
            if restore_atomic:
                folio.atomic = True
        self._refresh_lru(folio)
        folio._wake()
        self._dirty_changed()

    def take_clean(self, folio: Folio, mask: int) -> bool:
        """Blocks in mask were copied into the log: clean now. Returns was_atomic."""
        if mask & ~folio.dirty:
            raise InvalidTransition(f"logging clean blocks {mask:#x}: {folio.state()}")
        self._clear_dirty(folio, mask)
        was_atomic = folio.atomic
        folio.atomic = False
        self._refresh_lru(folio)
        self._dirty_changed()
        return was_atomic

    def start_home_write(self, folio: Folio) -> None:
        """A checkpoint copies the folio's logged blocks home from its buffer: they must
        not change meanwhile, so it counts as stable writeback of no dirty blocks."""
        if folio.writeback or folio.locked:
            raise InvalidTransition(f"home write of a busy folio: {folio.state()}")
        folio.writeback = True
        folio.wb_stable = True
        folio.wb_mask = 0
        folio.mapping.busy[folio.index] = folio
        self._lru_remove(folio)

    def set_logged(self, folio: Folio, seq: int) -> None:
        """Its newest copy is in log batch seq: keep it in memory until it is home."""
        if not folio.logged_seq:
            self.logged_bytes += folio.size
        folio.logged_seq = seq
        self._lru_remove(folio)

    def clear_logged(self, folio: Folio, upto_seq: int) -> None:
        """A checkpoint covering batch upto_seq wrote the folio home."""
        if folio.logged_seq and folio.logged_seq <= upto_seq:
            folio.logged_seq = 0
            self.logged_bytes -= folio.size
            self._refresh_lru(folio)

    def checkpointed(self, upto_seq: int) -> None:
        """A checkpoint wrote home everything logged up to batch upto_seq: those folios
        may go, and writers throttled on them may go on."""
        for m in self.mappings.values():
            for folio in m.folios.values():
                self.clear_logged(folio, upto_seq)
        self.trim()
        self._dirty_changed()

    def lock(self, folio: Folio) -> None:
        if folio.locked:
            raise InvalidTransition(f"folio already locked: {folio.state()}")
        folio.locked = True
        folio.mapping.busy[folio.index] = folio
        self._lru_remove(folio)

    def unlock(self, folio: Folio) -> None:
        if not folio.locked:
            raise InvalidTransition(f"unlocking an unlocked folio: {folio.state()}")
        folio.locked = False
        if not folio.writeback:
            folio.mapping.busy.pop(folio.index, None)
        self._refresh_lru(folio)
        folio._wake()

    def pin(self, folio: Folio) -> None:
        """Keep the folio in memory while a request uses it."""
        folio.pins += 1
        self._lru_remove(folio)

    def unpin(self, folio: Folio) -> None:
        if folio.pins <= 0:
            raise InvalidTransition(f"unpinning an unpinned folio: {folio.state()}")
        folio.pins -= 1
        self._refresh_lru(folio)

    def reserve_blocks(self, folio: Folio, mask: int) -> None:
        folio.reserved |= mask

    def unreserve_blocks(self, folio: Folio, mask: int) -> int:
        """Forget reservations of blocks in mask; returns how many were reserved."""
        n = popcount(folio.reserved & mask)
        folio.reserved &= ~mask
        return n

    def _clear_dirty(self, folio: Folio, mask: int) -> None:
        cleared = folio.dirty & mask
        folio.dirty &= ~mask
        self.dirty_bytes -= popcount(cleared) * self.block_size
        if not folio.dirty:
            folio.mapping.dirty.pop(folio.index, None)

    def discard_blocks(self, folio: Folio, mask: int) -> int:
        """Blocks beyond a truncation: not valid, not dirty, zeroed. Returns reservations
        released. Not while the folio is under I/O: its data must not change, and a failed
        writeback must find its blocks still valid to make them dirty again."""
        if folio.writeback or folio.locked:
            raise InvalidTransition(f"discarding blocks of a busy folio: {folio.state()}")
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
    def leave_group(folio: Folio) -> None:
        """The folio's grouped blocks are gone (truncated): the rest of the group stays."""
        group = folio.group
        if group is not None:
            group.folios.remove(folio)
            folio.group = None

    def _dirty_changed(self) -> None:
        ev, self.dirty_changed = self.dirty_changed, trio.Event()
        ev.set()

    # -------------------------------------------------------------- generic paths

    async def wait_folio(self, folio: Folio) -> None:
        """Wait for a folio's lock or stable writeback; counts stable waits."""
        m = folio.mapping
        stable = folio.writeback and (m.stable or folio.wb_stable)
        t0 = time.monotonic_ns()
        await folio.wait_unlocked_or_written()
        if stable:
            self.counters.stable_waits += 1
            self.counters.stable_wait_ns += time.monotonic_ns() - t0

    def _pinned_folio(self, m: Mapping, index: int, pinned: dict[int, Folio],
                      nblocks: int | None = None) -> Folio:
        folio = pinned.get(index)
        if folio is None:
            folio = self.get_folio(m, index, nblocks)
            self.pin(folio)
            pinned[index] = folio
        return folio

    def _unpin_all(self, pinned: dict[int, Folio]) -> None:
        for folio in pinned.values():
            self.unpin(folio)
        pinned.clear()

    async def read(self, io: FolioIO, inode: Inode, m: Mapping, off: int,
                   size: int) -> bytes | bytearray | memoryview:
        """Read up to size bytes at off, from the cache, reading missing blocks first."""
        end = min(off + size, inode.size)
        if off >= end:
            return b""
        fs = m.folio_size
        bs = self.block_size
        first, last = off // fs, (end - 1) // fs
        ra_end = max(end, self._readahead_end(m, inode, off, end))
        pinned: dict[int, Folio] = {}
        try:
            while True:
                needs: list[tuple[Folio, int]] = []
                waited = False
                for index in range(first, (ra_end - 1) // fs + 1):
                    lo = max(off, index * fs) - index * fs
                    hi = min(ra_end, (index + 1) * fs) - index * fs
                    nblocks = (hi + bs - 1) // bs
                    folio = self._pinned_folio(m, index, pinned, nblocks)
                    if folio.locked or not self.fit(folio, nblocks):
                        if index <= last:
                            await self.wait_folio(folio)
                            waited = True
                            break
                        continue
                    want = mask_range(lo // bs, (hi + bs - 1) // bs - lo // bs)
                    missing = want & ~folio.uptodate & ~folio.dirty
                    if missing:
                        needs.append((folio, missing))
                if waited:
                    continue
                if not needs:
                    break
                await io.read_folios(inode, m, needs)
            end = min(end, inode.size)  # a truncate may have raced with the read
            if off >= end:
                return b""
            if (end - 1) // fs == first:
                return pinned[first].buf.view(off - first * fs, end - off)
            out = bytearray(end - off)
            pos = off
            while pos < end:
                index = pos // fs
                start = pos - index * fs
                n = min(end - pos, fs - start)
                copy_into(out, pos - off, pinned[index].buf, start, n)
                pos += n
            return out
        finally:
            self._unpin_all(pinned)

    def _readahead_end(self, m: Mapping, inode: Inode, off: int, end: int) -> int:
        """Sequential reads grow a readahead window (up to 1 MiB); others reset it."""
        if off == m.ra_next:
            m.ra_window = min(max(2 * m.ra_window, 128 << 10), 1 << 20)
        else:
            m.ra_window = 0
        m.ra_next = end
        return min(inode.size, end + m.ra_window)

    async def write(self, io: FolioIO, inode: Inode, m: Mapping, off: int, data: bytes,
                    writethrough: bool = False, strict: bool = False,
                    now: int | None = None, atomic: bool = False, durable: bool = True
                    ) -> int:
        """Copy data into the cache at off; the generic buffered write (or write-through,
        durable or not: see FolioIO.write_through). atomic: the writer asked for this
        whole write to be untorn (RWF_ATOMIC)."""
        n = len(data)
        if n == 0:
            return 0
        fs = m.folio_size
        end = off + n
        if strict and m.atomic and (off % fs or end % fs):
            self.counters.atomic_strict_rejected += 1
            raise OSError(errno.EINVAL, "write not aligned to the atomic unit")
        # One whole unit is the folio's own atomic tag; several whole units, or an
        # announced atomic write of any shape, are a write group: at most what FUSE sends
        # in one request, so that a group always fits in one log batch.
        whole_units = m.atomic and off % fs == 0 and end % fs == 0
        grouped = ((atomic and not (whole_units and n == fs)) or (whole_units and n > fs)) \
            and n <= MAX_GROUP_BYTES
        await io.balance_dirty()
        pinned: dict[int, Folio] = {}
        if writethrough:
            m.writethrough_begin()
        try:
            items = await self._prepare_write(io, inode, m, off, end, pinned, grouped)
            io.reserve_for_write(inode, m, items)  # ENOSPC here changes nothing
            self._copy_in(m, items, off, end, data)
            if grouped:
                group = WriteGroup([f for f, _ in items])
                for folio, _ in items:
                    folio.group = group
                self.counters.atomic_group_writes += 1
            size_grew = end > inode.size
            if size_grew:
                inode.size = end
            inode.mtime_ns = inode.ctime_ns = now if now is not None else time.time_ns()
            io.inode_written(inode, size_grew)
            if writethrough:
                await io.write_through(inode, m, items, size_grew, durable)
        finally:
            if writethrough:
                m.writethrough_end()
            self._unpin_all(pinned)
            self.trim()
        return n

    async def _prepare_write(self, io: FolioIO, inode: Inode, m: Mapping, off: int,
                             end: int, pinned: dict[int, Folio], grouped: bool = False
                             ) -> list[tuple[Folio, int]]:
        """Get the folios of [off, end) ready for copying: wait for locks and stable
        writeback, send out pending write groups they belong to, read partial blocks.
        Returns (folio, mask of blocks written); nothing awaits after the last check."""
        fs = m.folio_size
        bs = self.block_size
        first, last = off // fs, (end - 1) // fs
        while True:
            items: list[tuple[Folio, int]] = []
            needs: list[tuple[Folio, int]] = []
            waited = False
            for index in range(first, last + 1):
                base = index * fs
                lo = max(off, base) - base
                hi = min(end, base + fs) - base
                b0, b1 = lo // bs, (hi + bs - 1) // bs
                folio = self._pinned_folio(m, index, pinned, b1)
                # A write that makes the folio atomic must not change it under a writeback
                # that started before (an in-place one would send part of it out torn).
                becomes_atomic = grouped or (m.atomic and off <= base and end >= base + fs)
                if m.must_wait(folio) or (becomes_atomic and folio.writeback) or \
                        not self.fit(folio, b1):
                    await self.wait_folio(folio)
                    waited = True
                    break
                if folio.group is not None:
                    # An earlier write group must not be torn by this write: it goes into
                    # the log first, whole, so no crash shows this write without it.
                    await io.write_group(inode, m, folio.group)
                    waited = True
                    break
                items.append((folio, mask_range(b0, b1 - b0)))
                partial = (1 << b0 if lo % bs else 0) | (1 << (b1 - 1) if hi % bs else 0)
                partial &= ~folio.uptodate & ~folio.dirty
                for b, _ in mask_runs(partial):
                    if base + b * bs >= inode.size:
                        # nothing on the device beyond EOF: the (zeroed) block is valid
                        partial &= ~(1 << b)
                        folio.uptodate |= 1 << b
                if partial:
                    needs.append((folio, partial))
            if waited:
                continue
            if not needs:
                return items
            await io.read_folios(inode, m, needs)

    def _copy_in(self, m: Mapping, items: list[tuple[Folio, int]], off: int, end: int,
                 data: bytes) -> None:
        """Copy and mark; tag folios covered whole as atomic, clear the tag of others."""
        fs = m.folio_size
        src = memoryview(data)
        for folio, mask in items:
            base = folio.index * fs
            lo = max(off, base)
            hi = min(end, base + fs)
            folio.buf.write(lo - base, src[lo - off: hi - off])
            folio.uptodate |= mask
            self.mark_dirty(folio, mask)
            if m.atomic:
                if lo == base and hi == base + fs:
                    self.set_atomic(folio)
                elif self.clear_atomic(folio):
                    self.counters.atomic_cleared_partial += 1

    async def truncate(self, io: FolioIO, inode: Inode, m: Mapping, size: int) -> int:
        """Drop cached data beyond size and zero the rest of the block holding the new EOF
        (in the cache, to be written back), so that a later extension reads zeros.
        Returns the number of block reservations released; the caller unmaps blocks."""
        fs = m.folio_size
        bs = self.block_size
        while True:
            busy = [f for i, f in m.busy.items() if (i + 1) * fs > size]
            if not busy:
                break
            await self.wait_folio(busy[0])
        released = 0
        full = mask_range(0, m.blocks_per_folio)
        for index, folio in sorted(m.folios.items()):
            if index * fs >= size:
                if folio.pins:  # a reader holds it: keep the object, drop its contents
                    self.clear_logged(folio, folio.logged_seq)
                    released += self.discard_blocks(folio, full)
                else:
                    released += self.unreserve_blocks(folio, folio.reserved)
                    self._remove_folio(folio)
        if size % fs == 0:
            return released
        index = size // fs
        start = size - index * fs
        first_gone = (start + bs - 1) // bs
        b = start // bs
        tail_mapped = start % bs and inode.extents is not None and \
            inode.extents.lookup(index * m.blocks_per_folio + b)[0] is not None
        last = m.folios.get(index)
        if last is None and not tail_mapped:
            return released
        pinned: dict[int, Folio] = {}
        try:
            last = self._pinned_folio(m, index, pinned, first_gone)
            gone = mask_range(first_gone, m.blocks_per_folio - first_gone)
            released += self.discard_blocks(last, gone)
            if not self.fit(last, first_gone):  # it is idle: the wait above covered it
                raise InvalidTransition(f"cannot grow {last.state()}")
            if start % bs:
                if not (last.uptodate | last.dirty) >> b & 1:
                    await io.read_folios(inode, m, [(last, 1 << b)])
                while m.must_wait(last):
                    await self.wait_folio(last)
                last.buf.zero(start, (b + 1) * bs - start)
                if tail_mapped or last.dirty >> b & 1:
                    self.mark_dirty(last, 1 << b)  # the zeros must reach the device
        finally:
            self._unpin_all(pinned)
            self.trim()
        return released
