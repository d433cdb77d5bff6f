"""The page cache's objects: a folio (a piece of one file in an aligned buffer, with its
per-block state), a mapping (the cache side of one file), a write group, the kinds of I/O a
folio can be under, and block-mask helpers. They hold state and answer questions about it;
every change of a folio's state is a named transition in pagecache.py (see the state
described there).
"""
from __future__ import annotations

import enum
from typing import Iterator

import trio

from atomicfs import format as fmt
from atomicfs.native import Buffer
from atomicfs.watchdog import waiting

# The largest write group: what FUSE sends in one request; a log batch holds it whole.
MAX_GROUP_BYTES = fmt.MAX_ATOMIC_UNIT


class InvalidTransition(AssertionError):
    """A folio state change that the state machine does not allow."""


class IOKind(enum.Enum):
    """The one I/O a folio's buffer may be under."""

    NONE = "none"
    IN_PLACE = "in place"  # dirty blocks to their homes; writers may change the buffer
    STABLE_IN_PLACE = "stable in place"  # the same, for a write-through or stable mapping
    ATOMIC = "atomic"  # one RWF_ATOMIC write of the whole unit
    LOG_HELD = "log-held"  # copied into the log; a write-through holds it until durable
    HOME = "home copy"  # a checkpoint copies logged, clean blocks home (io_mask 0)

    # Members are singletons compared by identity: hash them as such, in C. Enum's own
    # __hash__ is Python code, and `io in STABLE_IO` runs on every write and fsync.
    __hash__ = object.__hash__


# I/O that needs the buffer unchanged until it ends: writers wait (stable pages).
STABLE_IO = frozenset({IOKind.STABLE_IN_PLACE, IOKind.ATOMIC, IOKind.LOG_HELD, IOKind.HOME})
# I/O of dirty blocks (what fsync waits for; a home copy is of data durable in the log).
DATA_IO = frozenset({IOKind.IN_PLACE, IOKind.STABLE_IN_PLACE, IOKind.ATOMIC,
                     IOKind.LOG_HELD})


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


class Folio:
    __slots__ = ("mapping", "index", "buf", "uptodate", "dirty", "reserved", "atomic",
                 "io", "io_mask", "locked", "logged_seq", "dirty_since", "_event", "in_lru",
                 "pins", "group")

    def __init__(self, mapping: "Mapping", index: int, buf: Buffer) -> None:
        self.mapping = mapping
        self.index = index
        self.buf = buf  # zeroed: blocks that are not uptodate always hold zeros
        self.uptodate = 0
        self.dirty = 0
        self.reserved = 0
        self.atomic = False
        self.io = IOKind.NONE
        self.io_mask = 0  # the dirty blocks the I/O took (0 for a home copy)
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
    def full(self) -> int:
        """The mask of all its blocks."""
        return mask_range(0, self.mapping.blocks_per_folio)

    @property
    def size(self) -> int:
        """Bytes of memory it holds (its buffer: the whole folio or a prefix of it)."""
        return self.buf.size

    @property
    def writeback(self) -> bool:
        """An I/O from this buffer is in flight."""
        return self.io is not IOKind.NONE

    @property
    def busy(self) -> bool:
        return self.locked or self.io is not IOKind.NONE

    @property
    def evictable(self) -> bool:
        return not (self.dirty or self.io is not IOKind.NONE or self.locked
                    or self.logged_seq or self.pins)

    def state(self) -> str:
        return (f"folio {self.mapping.ino}:{self.index} uptodate={self.uptodate:#x} "
                f"dirty={self.dirty:#x} atomic={self.atomic} io={self.io.value}"
                f"({self.io_mask:#x}) locked={self.locked} logged={self.logged_seq}")

    async def wait_unlocked_or_written(self) -> None:
        """Wait for the next end of its lock, its I/O or its last pin."""
        if self._event is None:
            self._event = trio.Event()
        with waiting(f"folio {self.mapping.ino}:{self.index} (locked={self.locked}, "
                     f"io={self.io.value}, pins={self.pins})"):
            await self._event.wait()

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None


class Mapping:
    """The page-cache side of one file."""

    __slots__ = ("block_size", "ino", "folio_size", "blocks_per_folio", "folios", "dirty",
                 "stable", "wt_inflight", "err_seq", "err_seen", "flush_gen", "meta_seq",
                 "atomic", "ra_next", "ra_window", "busy", "data_busy",
                 "reserved_blocks")

    def __init__(self, block_size: int, ino: int, folio_size: int, atomic: bool) -> None:
        self.block_size = block_size
        self.ino = ino
        self.folio_size = folio_size
        self.blocks_per_folio = folio_size // block_size
        self.folios: dict[int, Folio] = {}
        self.dirty: dict[int, Folio] = {}  # folios with dirty blocks
        self.stable = False
        self.wt_inflight = 0
        self.err_seq = 0  # writeback errors recorded (errseq counter)
        self.err_seen = True  # has any descriptor seen the latest error?
        self.flush_gen = -1  # device flush generation covering its last in-place write
        self.meta_seq = -1  # newest log batch holding this file's extents or data
        self.busy: dict[int, Folio] = {}  # folios under writeback or locked
        # The subset of busy that fsync waits for: locked, or under I/O of dirty blocks
        # (not a checkpoint's home copy), kept by PageCache's transitions.
        self.data_busy: dict[int, Folio] = {}
        # reserved bits of its folios (kept by PageCache.reserve/unreserve_blocks, so that
        # st_blocks costs no walk over a big file's folios: getattr runs on the trio loop)
        self.reserved_blocks = 0
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

    def stable_io(self, folio: Folio) -> bool:
        """Is the folio under I/O that needs its buffer unchanged?"""
        return folio.io in STABLE_IO or (self.stable and folio.io is not IOKind.NONE)

    def must_wait(self, folio: Folio) -> bool:
        """May folio be modified now? Not while its I/O needs it stable."""
        return folio.locked or self.stable_io(folio)

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
