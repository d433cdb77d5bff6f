"""Checkpoints: what makes the log reclaimable.

A checkpoint seals a boundary batch and takes a snapshot of the metadata in the same step,
waits until the log up to the boundary is durable, writes every resident unit logged up to
it home (from the folio when it still holds that version, else from the log), writes the
snapshot and then the superblock that points at it and at the log after the boundary. Only
then is the log space before the boundary reclaimed and the snapshot before the previous
one freed (the previous one stays as the fallback, see recovery.py).

Progress, by construction: a checkpoint never needs log space. When it seals its boundary,
the batches up to it that are not placed yet (the one the writer may be waiting with, and
the boundary) either fit into what is left of the log, the reserve included, or are
*absorbed*: they are never written to the log. Their data goes to new blocks (out of place,
so that a crash before the checkpoint's superblock leaves every home as it was: nothing is
torn, and the blocks were free in the durable state), the remap is metadata of the
snapshot, and they become durable with the superblock. So a checkpoint waits only for
device I/O and for batches already placed, never for a request or for log space; and
whatever waits for log space waits for a checkpoint.
"""
from __future__ import annotations

import logging

import trio

from atomicfs import format as fmt
from atomicfs.alloc import Allocator
from atomicfs.device import MAX_IO_BYTES, Device
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.journal import DataRun, Journal, LogFailed, PendingBatch
from atomicfs.metadata import Extent, Metadata
from atomicfs.native import MAX_IOV, Buffer, Segment
from atomicfs.pagecache import Folio, PageCache, mask_range
from atomicfs.stats import Counters
from atomicfs.superblock import next_checkpoint_superblock, write_superblock
from atomicfs.watchdog import Watchdog

log = logging.getLogger(__name__)



class Checkpointer:
    """Owns checkpoints: the checkpointer task, home copies of resident units, the
    snapshot and superblock, and the kept snapshots."""

    def __init__(self, dev: Device, sb: fmt.Superblock, md: Metadata, alloc: Allocator,
                 journal: Journal, cache: PageCache, counters: Counters,
                 watchdog: Watchdog | None = None) -> None:
        self.dev = dev
        self.sb = sb  # the superblock of the newest durable checkpoint
        self.md = md
        self.alloc = alloc
        self.journal = journal
        self.cache = cache
        self.counters = counters
        self.bs = sb.block_size
        self.watchdog = watchdog or Watchdog()
        self.snapshot_extents: list[Extent] = []
        self.previous_snapshot_extents: list[Extent] = []  # the fallback (see recovery.py)
        # Set when a checkpoint is wanted; replaced only once set, so the checkpointer,
        # which may be waiting on it, is never left waiting on an event nobody sets.
        self.want_checkpoint = trio.Event()
        self._lock = trio.Lock()
        journal.attach_checkpointer(self.request_checkpoint)

    @property
    def kept_snapshot_blocks(self) -> int:
        """Blocks of the snapshots kept now: the newest and the fallback."""
        return sum(c for _, c in self.snapshot_extents + self.previous_snapshot_extents)

    # ------------------------------------------------------------------ the task

    def request_checkpoint(self) -> None:
        self.want_checkpoint.set()

    async def run(self, interval: float = 30.0,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if self.journal.failed is not None:
                await trio.sleep_forever()  # nothing can be checkpointed any more
            with trio.move_on_after(interval):
                await self.want_checkpoint.wait()  # never replaced while unset
            if self.journal.failed is None and self.journal.used > 0:
                try:
                    await self.checkpoint()
                except (DeviceError, NoSpace) as exc:
                    log.error("checkpoint failed: %s", exc)
                    self.journal.fail(exc)

    async def checkpoint(self) -> None:
        """Make the log reclaimable: write resident units home, then a metadata snapshot,
        then the superblock that points at both. Needs no log space (see above)."""
        with self.watchdog.track("checkpoint"):
            async with self._lock:
                await self._checkpoint_locked()

    async def _checkpoint_locked(self) -> None:
        boundary = self.seal_for_checkpoint()
        snapshot = self.md.serialize()
        next_ino = self.md.next_ino
        # The runs themselves, not copies: those in the boundary batch learn their log
        # position only when it is placed (settle_for_checkpoint waits for that).
        runs = self.journal.resident_runs(boundary)
        absorbed = await self.journal.settle_for_checkpoint(boundary)
        try:
            await self._write_home(runs)
            await self.dev.flush()
            await self.write_checkpoint(snapshot, boundary, next_ino)
        except BaseException as exc:
            if absorbed:  # their data is nowhere else durable: stop, as a log failure does
                self.journal.fail(exc)
            raise
        self.cache.checkpointed(boundary)
        self.counters.checkpoints += 1

    # ---------------------------------------------------------------- the boundary

    def seal_for_checkpoint(self) -> int:
        """Seal the current pending batch (if any) as the checkpoint boundary; returns the
        sequence number of the last batch the checkpoint covers. Batches before it that
        wait for log space may now use the reserve (they are what frees it); if they and
        the boundary do not fit even so, they are absorbed. Nothing here awaits: the
        caller takes its snapshot of the metadata in the same step."""
        self.journal.check_failed()
        self.md.flush_dirty()
        unplaced = self.journal.open_reserve()
        absorb = bool(unplaced) and not self._fits(unplaced)
        if absorb:
            self._absorb(unplaced)  # remaps: records into the pending batch, absorbed too
        return self.journal.seal_boundary(absorbed=absorb)

    def _fits(self, batches: list[PendingBatch]) -> bool:
        """Would these batches, placed in order after the head, fit into the log with the
        reserve (as Journal._place places a checkpoint's batches)?"""
        j = self.journal
        used, head = j.used, j.head_pos
        for b in batches:
            size = fmt.header_area_size(len(b.meta), self.bs) + b.payload_bytes
            waste = j.log_size - head if head + size > j.log_size else 0
            head = (0 if waste else head) + size
            used += waste + size
            if used > j.log_size - self.bs:
                return False
            if head + self.bs > j.log_size:
                head = 0
        return True

    def _absorb(self, batches: list[PendingBatch]) -> None:
        """Take these batches (not placed, in order, the last maybe the pending one) away
        from the log writer: give each resident run they hold a new home out of place,
        with its payload to write from; they become durable with the checkpoint."""
        for b in batches:
            for run, (buf, _) in zip(b.data_runs, b.payloads):
                run.buf, run.buf_off = buf, 0
            for piece, run, off in b.pieces:
                piece.buf, piece.buf_off = run.buf, run.buf_off + off * self.bs
        seqs = {b.seq for b in batches}
        for ino, _, run in self.journal.resident_runs():
            if run.seq in seqs:
                self._move_run(ino, run)
        self.journal.absorb(batches)

    def _move_run(self, ino: int, run: DataRun) -> None:
        """A new home for an absorbed run whose blocks the file still maps there."""
        inode = self.md.inodes.get(ino)
        if inode is None or inode.extents is None:
            return
        if list(inode.extents.runs(run.fblock, run.nblocks)) != \
                [(run.fblock, run.dblock, run.nblocks)]:
            return  # remapped or freed since: the run is revoked, nothing to write
        try:
            new, _ = self.alloc.allocate(run.nblocks, goal=run.dblock, metadata=True)
        except NoSpace as exc:
            # Neither log space nor free space: refuse changes (EIO), never tear a unit.
            self.journal.fail(exc)
            raise LogFailed(5, f"no room to checkpoint a full log: {exc}") from exc
        self.md.map_extent(inode, run.fblock, new, run.nblocks)  # old home: freed when durable
        run.dblock = new

    # ---------------------------------------------------------------- home copies

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
                for f, d, n in inode.extents.runs(run.fblock, run.nblocks):
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
                        buf = await self.dev.read(self.journal.log_offset + run.log_pos
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

    # ------------------------------------------------------ snapshot and superblock

    async def write_checkpoint(self, snapshot: bytes, boundary_seq: int,
                               next_ino: int) -> None:
        """Write a snapshot of the metadata as of batch boundary_seq (durable already),
        then the superblock pointing at it and at the log after that batch. Only then is
        the old snapshot freed and the log space before the boundary reclaimed."""
        bs = self.bs
        sb = self.sb
        extents, payload_blocks = self._allocate_snapshot(len(snapshot))
        buf = Buffer((1 + payload_blocks) * bs)
        buf.write(bs, snapshot)
        header = fmt.SnapshotHeader(sb.uuid, sb.seq + 1, len(snapshot), next_ino,
                                    buf.crc32c(bs, len(snapshot)), extents)
        buf.write(0, header.pack(bs))
        try:
            off = 0
            for dblock, count in extents:
                await self.dev.writev(dblock * bs, [(buf, off, count * bs)], "snapshot")
                off += count * bs
            await self.dev.flush()
            new_sb = next_checkpoint_superblock(sb, extents[0][0],
                                                self.journal.batch_end(boundary_seq),
                                                boundary_seq + 1, next_ino)
            await write_superblock(self.dev, new_sb)
            self.journal.acknowledge_absorbed()
        except BaseException:
            for dblock, count in extents:
                self.alloc.free_now(dblock, count)
            raise
        self._retire_snapshot(extents, sb)
        self.sb = new_sb
        self._advance_tail(boundary_seq)
        self.alloc.set_snapshot_estimate(len(snapshot), bs)

    def _advance_tail(self, seq: int) -> None:
        """Reclaim the log up to batch seq; a request made before is answered by this
        checkpoint, unless the log is still half full."""
        self.journal.advance_tail(seq)
        if self.want_checkpoint.is_set():
            self.want_checkpoint = trio.Event()
        if self.journal.used > self.journal.log_size // 2:
            self.request_checkpoint()

    def _retire_snapshot(self, extents: list[Extent], old_sb: fmt.Superblock) -> None:
        """A new checkpoint is durable: the one before it becomes the fallback, and only
        the one before that is freed; blocks released since the fallback's boundary stay
        held (its files may still map them)."""
        for dblock, count in self.previous_snapshot_extents:
            self.alloc.free_now(dblock, count)
        self.previous_snapshot_extents = self.snapshot_extents
        self.snapshot_extents = extents
        self.alloc.checkpointed(old_sb.log_seq - 1 if old_sb.snap_block else 0)

    def _allocate_snapshot(self, length: int) -> tuple[list[Extent], int]:
        bs = self.bs
        payload_blocks = (length + bs - 1) // bs
        need = 1 + payload_blocks
        extents: list[Extent] = []
        limit = fmt.SnapshotHeader.max_extents(bs)
        try:
            while need > 0:
                if len(extents) == limit:
                    raise NoSpace("free space too fragmented for the metadata snapshot")
                start, count = self.alloc.allocate(need, min_len=1, metadata=True)
                extents.append((start, count))
                need -= count
        except NoSpace:
            for dblock, count in extents:
                self.alloc.free_now(dblock, count)
            raise
        return extents, payload_blocks
