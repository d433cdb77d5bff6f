"""Free space: which device blocks of the data area are in use.

The allocator is not stored on disk. At mount it is rebuilt from the metadata (every file's
extents, the current snapshot, the fixed regions), so there is no allocation state that a
crash could leave inconsistent.

Three rules keep it crash-safe and keep writes from failing late:

* Blocks freed by a metadata change become reusable only once the log batch holding that
  change is durable (`free_after` / `release_durable`); until then a crash could bring the
  old owner back, and its data must still be there.
* Writes reserve the blocks they will need when their data reaches the device (delayed
  allocation); a write that cannot reserve fails with ENOSPC at write time, not later.
* A reserve of blocks is kept out of reach of file data so that a metadata snapshot can
  always be written, whatever the fill level.
* The previous checkpoint is kept as a fallback (recovery.py): a block freed by batch s
  is *held* until the fallback checkpoint covers s, i.e. after two more checkpoints, so
  that the fallback's files never map blocks that were handed out again.
"""
from __future__ import annotations

import math

from atomicfs import native
from atomicfs.errors import NoSpace



class Allocator:
    """Bitmap allocator over [data_start, total_blocks)."""

    def __init__(self, total_blocks: int, data_start: int) -> None:
        self.total_blocks = total_blocks
        self.data_start = data_start
        self._bitmap = bytearray((total_blocks + 7) // 8)
        # Everything before the data area (superblocks, log) is never handed out.
        native.bitmap_set(self._bitmap, 0, data_start, True)
        self._used = data_start
        self._reserved = 0  # blocks promised to dirty data not yet allocated
        self._pending: list[tuple[int, list[tuple[int, int]]]] = []  # (batch seq, extents)
        self._pending_blocks = 0
        self._held: list[tuple[int, list[tuple[int, int]]]] = []  # durable, kept for fallback
        self._held_blocks = 0
        # Last log batch the kept previous checkpoint covers; recovery sets it at mount
        # (by default nothing is held: no checkpoint is kept).
        self.fallback_boundary = 1 << 62
        self._goal = data_start
        self.meta_reserve = self._minimum_meta_reserve()
        # Each reserved block may become an extent of its own when it is allocated, and the
        # snapshot grows by an extent record (twice over in the reserve): that room is kept
        # with the reservation, so that neither the data nor the next snapshot lacks it.
        self.extent_record_bytes = 0  # set by the mount; 0: no allowance
        self.block_size = 4096

    # ----------------------------------------------------------------------- accounting

    def _minimum_meta_reserve(self) -> int:
        return max(64, (self.total_blocks - self.data_start) // 256)

    @property
    def data_blocks(self) -> int:
        return self.total_blocks - self.data_start

    @property
    def free_blocks(self) -> int:
        """Blocks neither in use nor waiting for a commit to be freed."""
        return self.total_blocks - self._used

    def _extent_allowance(self, reserved: int) -> int:
        return -(-2 * self.extent_record_bytes * reserved // self.block_size)

    @property
    def available_blocks(self) -> int:
        """What new file data may still claim (statfs f_bavail)."""
        return max(0, self.free_blocks - self.reserved_blocks - self.meta_reserve)

    @property
    def reserved_data_blocks(self) -> int:
        """Blocks promised to dirty data alone (what the folios' reserved bits count)."""
        return self._reserved

    @property
    def reserved_blocks(self) -> int:
        """Blocks promised to dirty data, and to the extent records that will map them."""
        return self._reserved + self._extent_allowance(self._reserved)

    @property
    def pending_blocks(self) -> int:
        """Freed blocks not yet reusable: waiting for their batch or for checkpoints."""
        return self._pending_blocks + self._held_blocks

    @property
    def held_blocks(self) -> int:
        """Freed blocks that wait for checkpoints (the fallback may still map them)."""
        return self._held_blocks

    def set_snapshot_estimate(self, snapshot_bytes: int, block_size: int) -> None:
        """Keep room for three snapshots of this size (the current and the previous one
        live until a new one is committed)."""
        need = 3 * math.ceil(snapshot_bytes / block_size) + 16
        self.meta_reserve = max(self._minimum_meta_reserve(), need)

    # ------------------------------------------------------------------- reservations

    def reserve(self, count: int) -> None:
        """Promise count blocks to dirty data; NoSpace when they are not there."""
        if count <= 0:
            return
        after = self._reserved + count
        if self.free_blocks - after - self._extent_allowance(after) - self.meta_reserve < 0:
            raise NoSpace(f"cannot reserve {count} blocks")
        self._reserved += count

    def reserve_again(self, count: int) -> None:
        """Reserve blocks that were just freed (a write into fresh blocks failed, its data
        stays dirty); never fails, as those blocks are back in the pool."""
        self._reserved += max(0, count)

    def unreserve(self, count: int) -> None:
        if count < 0 or count > self._reserved:
            raise ValueError(f"unreserve {count} of {self._reserved} reserved blocks")
        self._reserved -= count

    # -------------------------------------------------------------------- allocation

    def mark_used(self, start: int, count: int) -> None:
        """Record blocks found in use (mount, replay); raise if any is already in use."""
        self._check_range(start, count)
        if native.bitmap_count_set(self._bitmap, start, count):
            raise ValueError(f"blocks {start}+{count} are already in use")
        native.bitmap_set(self._bitmap, start, count, True)
        self._used += count

    def is_used(self, start: int, count: int = 1) -> int:
        """How many of the blocks in [start, start+count) are in use."""
        return native.bitmap_count_set(self._bitmap, start, count)

    def allocate(self, want: int, goal: int = 0, align: int = 1, min_len: int | None = None,
                 reserved: int = 0, metadata: bool = False) -> tuple[int, int]:
        """Allocate up to `want` blocks, at least min_len (default: all of them), starting
        on a multiple of align, as close after goal as possible.

        reserved: how many blocks of this request the caller reserved earlier (it converts
        them with `unreserve` afterwards); they may come out of the reserved pool.
        metadata: a snapshot allocation, which may use the metadata reserve.
        Returns (start, count); raises NoSpace.
        """
        if min_len is None:
            min_len = want
        # Reserved blocks were promised when they fitted beside the metadata reserve; a
        # snapshot written since may have used part of that reserve (that is what it is
        # for), so the promise is kept without it: only blocks beyond the reservation must
        # leave the reserve alone. Pending frees are not in free_blocks.
        room = self.free_blocks - self._reserved
        if not metadata:
            room -= self.meta_reserve + self._extent_allowance(self._reserved)
        limit = reserved + max(0, room)
        if min_len > limit:
            raise NoSpace(f"no room for {min_len} blocks")
        want = min(want, max(limit, min_len))
        start, count = native.bitmap_find(self._bitmap, self.data_start, self.total_blocks,
                                          goal or self._goal, want, min_len, align)
        if start < 0:
            raise NoSpace(f"no free run of {min_len} blocks aligned to {align}")
        count = min(count, want)
        native.bitmap_set(self._bitmap, start, count, True)
        self._used += count
        self._goal = start + count
        return start, count

    def free_now(self, start: int, count: int) -> None:
        """Return blocks that no durable metadata references (e.g. a write that failed)."""
        self._check_range(start, count)
        if native.bitmap_count_set(self._bitmap, start, count) != count:
            raise ValueError(f"freeing blocks {start}+{count} that are not all in use")
        native.bitmap_set(self._bitmap, start, count, False)
        self._used -= count

    def free_after(self, seq: int, extents: list[tuple[int, int]]) -> None:
        """Free extents once log batch `seq` (which records their release) is durable."""
        if not extents:
            return
        for start, count in extents:
            self._check_range(start, count)
        self._pending.append((seq, list(extents)))
        self._pending_blocks += sum(c for _, c in extents)

    def release_durable(self, durable_seq: int) -> int:
        """Free what was waiting for batches up to durable_seq; returns blocks freed."""
        freed = 0
        keep: list[tuple[int, list[tuple[int, int]]]] = []
        for seq, extents in self._pending:
            if seq > durable_seq:
                keep.append((seq, extents))
                continue
            n = sum(c for _, c in extents)
            self._pending_blocks -= n
            if seq > self.fallback_boundary:
                self._held.append((seq, extents))
                self._held_blocks += n
                continue
            for start, count in extents:
                self.free_now(start, count)
            freed += n
        self._pending = keep
        return freed

    def hold(self, seq: int, extents: list[tuple[int, int]]) -> None:
        """Keep blocks no file uses now but a kept checkpoint maps (found at mount) until
        the fallback checkpoint covers batch seq."""
        for start, count in extents:
            self.mark_used(start, count)
            self._held_blocks += count
        if extents:
            self._held.append((seq, list(extents)))

    def checkpointed(self, fallback_boundary: int) -> int:
        """A checkpoint is durable; the one before it, covering the log up to batch
        fallback_boundary, is now the fallback. Frees held blocks it does not map."""
        self.fallback_boundary = fallback_boundary
        freed = 0
        keep: list[tuple[int, list[tuple[int, int]]]] = []
        for seq, extents in self._held:
            if seq > self.fallback_boundary:
                keep.append((seq, extents))
                continue
            for start, count in extents:
                self.free_now(start, count)
                freed += count
        self._held = keep
        self._held_blocks -= freed
        return freed

    def _check_range(self, start: int, count: int) -> None:
        if count <= 0 or start < self.data_start or start + count > self.total_blocks:
            raise ValueError(f"block range {start}+{count} outside the data area")
