"""Dirty balancing and the background flusher.

Writers are throttled while dirty data (or memory eviction cannot drop) is past half of
the cache; they wait for the page cache's room event, which every transition that frees
room sets (end of writeback, blocks cleaned, folios made evictable or dropped, logged
folios checkpointed). The flusher wakes every quarter of dirty_expire (at least once a
second) to write back expired dirty data, and everything dirty while the cache is over the
background threshold; throttled writers kick it.
"""
from __future__ import annotations

import errno
import time

import trio

from atomicfs.alloc import Allocator
from atomicfs.checkpoint import Checkpointer
from atomicfs.journal import Journal
from atomicfs.metadata import Metadata
from atomicfs.pagecache import PageCache
from atomicfs.stats import Counters
from atomicfs.writeback import Writeback


class Flusher:
    """Throttles writers and runs the background writeback task."""

    def __init__(self, md: Metadata, alloc: Allocator, journal: Journal, cache: PageCache,
                 wb: Writeback, checkpointer: Checkpointer, counters: Counters,
                 dirty_expire: float = 30.0) -> None:
        self.md = md
        self.alloc = alloc
        self.journal = journal
        self.cache = cache
        self.wb = wb
        self.checkpointer = checkpointer
        self.counters = counters
        self.dirty_expire = dirty_expire
        self.dirty_limit = cache.limit // 2
        self.background_bytes = cache.limit // 4
        self._wake = trio.Event()

    # ----------------------------------------------------------------- throttling

    def _over_dirty_limit(self) -> bool:
        """Dirty data, or memory that eviction cannot drop (dirty, under I/O, logged
        folios: a folio's buffer may be larger than its dirty blocks), past the limit."""
        c = self.cache
        return c.dirty_bytes + c.writeback_bytes > self.dirty_limit or \
            c.pinned_bytes > self.dirty_limit

    def _over_background(self) -> bool:
        """Enough dirty data, or enough memory held by folios that cannot be dropped, to
        write back before it expires (so that the cache can evict and stay in bounds)."""
        c = self.cache
        return c.dirty_bytes > self.background_bytes or \
            c.pinned_bytes - c.logged_bytes > self.background_bytes  # logged: checkpoints

    async def balance_dirty(self) -> None:
        """Throttle writers at the dirty limit; never fail them (but EIO once the log
        failed: nothing will be written back then)."""
        while self._over_dirty_limit():
            if self.journal.failed is not None:
                raise OSError(errno.EIO, "the log cannot be written")
            self.counters.throttle_waits += 1
            if self.cache.logged_bytes > self.cache.limit // 4:
                self.checkpointer.request_checkpoint()  # only a checkpoint releases those
            self.kick_flusher()
            await self.cache.wait_for_room()

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

    # -------------------------------------------------------------------- flusher

    def kick_flusher(self) -> None:
        self._wake.set()

    async def run_flusher(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(min(1.0, self.dirty_expire / 4 or 1.0)):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.flush_some()

    async def flush_some(self, everything: bool = False) -> None:
        """Write back expired dirty data, and more while over the
        background threshold (or everything, as background writeback: failures go to
        errseq)."""
        now = time.monotonic()
        expire = self.dirty_expire
        over = everything or self._over_background()
        for ino, m in sorted(self.cache.mappings.items(),
                             key=lambda kv: min((f.dirty_since for f in kv[1].dirty.values()),
                                                default=now)):
            if not m.dirty:
                continue
            inode = self.md.inodes.get(ino)
            if inode is None:
                continue
            items = [(f, f.dirty) for f in sorted(m.dirty.values(), key=lambda f: f.index)
                     if over or now - f.dirty_since >= expire]
            if items:
                await self.wb.write_folios(inode, m, items)
            over = everything or self._over_background()
        self.cache.trim()
        if self.journal.failed is not None:
            self.cache.wake_throttled()  # they fail now instead of waiting
