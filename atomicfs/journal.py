"""The log: checksummed batches of metadata records and atomic data, group commit, log space.

Writing. Metadata changes and software-path atomic data are appended to the *pending*
batch. One writer task takes the pending batch, writes it as one sequential O_DIRECT write
into the log ring, flushes, and wakes everybody waiting for it. While it does, new records
gather in the next batch: that is group commit, and it is why four durable writers cost
about as many device flushes as one.

Ordering. A batch that maps freshly written in-place data (EXTENT_SET after a data write)
carries a *barrier*: the device flush covering that data completes before the batch is
written, so a crash never exposes blocks whose data did not reach the disk.

Resident units. A unit whose newest durable version lives only in the log (DATA record,
home copy not yet written) is *resident*. Every later writeback of it goes through the log
too, so replay (which applies DATA records in log order) can never roll back a newer
in-place copy. A checkpoint writes resident units home and then moves the log tail past
their records.

Replay (reading the log back at mount) is in replay.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import trio

from atomicfs import format as fmt
from atomicfs.alloc import Allocator
from atomicfs.device import Device
from atomicfs.errors import CorruptFilesystem, DeviceError
from atomicfs.metadata import Extent, Metadata
from atomicfs.native import Buffer, Segment
from atomicfs.stats import Counters
from atomicfs.watchdog import waiting

log = logging.getLogger(__name__)

_CHUNK_SEGMENTS = 512  # segments of a batch per device write (within native.MAX_IOV)


@dataclass
class DataRun:
    """One DATA record: blocks of a file written into the log."""

    fblock: int
    dblock: int
    nblocks: int
    log_pos: int  # byte offset of its payload within the log region (set when written)
    seq: int  # the batch holding it
    # Set only while a checkpoint writes home a batch it absorbed (never written to the
    # log): the payload buffer and the run's offset in it.
    buf: Buffer | None = None
    buf_off: int = 0


@dataclass
class Resident:
    """The newest logged version of one folio whose home copy may be older."""

    ino: int
    index: int  # folio index in the file
    seq: int  # batch holding the newest record
    runs: list[DataRun] = field(default_factory=list)


class PendingBatch:
    """A log batch: gathering records while pending, then sealed, placed and written (and
    rewritten at the same place if a write fails) until it is durable."""

    __slots__ = ("seq", "meta", "payloads", "data_runs", "barrier_gen", "payload_bytes",
                 "sealed", "checkpoint", "pos", "total", "placed_after", "segments",
                 "done", "attempt", "error", "written", "pieces", "absorbed")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.meta = bytearray()
        self.payloads: list[tuple[Buffer, int]] = []  # buffer, padded length
        self.data_runs: list[DataRun] = []
        self.barrier_gen = -1  # device flush generation that must be covered first
        self.payload_bytes = 0
        self.sealed = trio.Event()
        self.checkpoint = False  # up to a running checkpoint's boundary: may use the reserve
        self.pos = -1
        self.total = 0
        self.placed_after = 0
        self.segments: list[Segment] = []
        self.done = trio.Event()  # durable
        self.attempt = trio.Event()  # the current write attempt ended (see error)
        self.error: BaseException | None = None
        self.written = False
        self.pieces: list[tuple[DataRun, DataRun, int]] = []  # piece, its run, block offset
        self.absorbed = False  # taken by a checkpoint instead of being written to the log

    @property
    def empty(self) -> bool:
        return not self.meta and not self.payloads

    @property
    def size(self) -> int:
        return len(self.meta) + self.payload_bytes


class LogFailed(DeviceError):
    """The log could not be written; the filesystem refuses further changes."""


class Journal:
    """Owns the log region: batches and their appends, the writer task, log space, and
    resident units. Checkpoints (checkpoint.py) drive it through the methods at the end."""

    def __init__(self, dev: Device, sb: fmt.Superblock, metadata: Metadata, alloc: Allocator,
                 counters: Counters, head_pos: int, head_seq: int,
                 commit_interval: float = 5.0) -> None:
        self.dev = dev
        self.md = metadata
        self.alloc = alloc
        self.counters = counters
        self.bs = sb.block_size
        self.log_size = sb.log_bytes
        self.log_offset = sb.log_offset  # of the log region on the device, in bytes
        self.uuid_tag = sb.uuid_tag
        # A batch holds at least one largest atomic unit; the last part of the log is kept
        # for the batches a checkpoint must write before it can free any space.
        self.max_batch = max(fmt.MAX_ATOMIC_UNIT + 64 * self.bs, min(8 << 20,
                                                                     self.log_size // 16))
        self.reserve = 2 * self.max_batch + 2 * self.bs
        self.commit_interval = commit_interval
        self.tail_pos = sb.log_tail
        self.tail_seq = sb.log_seq
        self.head_pos = head_pos  # where the next batch goes
        # Space is counted in cumulative bytes placed (batches and wrap waste), so that the
        # space between tail and head is exact even while batches are in flight.
        self._placed = (head_pos - sb.log_tail) % self.log_size
        self._tail_mark = 0
        self._pending = PendingBatch(head_seq)
        self._sealed: list[PendingBatch] = []  # sealed, not yet durable, in order
        self._boundaries: list[PendingBatch] = []  # sealed for a checkpoint, not placed yet
        self._retrying = False  # a write failed: rewrite the sealed batches before more
        self._rewrite_wanted = False  # somebody asked for the rewrite since the last one
        self._ticked = False  # the commit interval passed since the writer last looked
        self._rewrite_started = trio.Event()
        self._failures = 0  # consecutive failed attempts
        self.durable_seq = head_seq - 1
        self._batch_end: dict[int, tuple[int, int]] = {head_seq - 1: (head_pos, self._placed)}
        self._resident: dict[tuple[int, int], Resident] = {}
        self.failed: BaseException | None = None
        self._wakeup = trio.Event()
        self._followers = 0  # commits waiting for the batch in flight, to lead the next
        self._room = trio.Event()
        self._absorbed: list[PendingBatch] = []  # a running checkpoint writes these home
        self._request_checkpoint: Callable[[], None] = lambda: None  # attach_checkpointer

    # ------------------------------------------------------------ MetadataSink

    def record(self, rec: bytes) -> None:
        self._pending.meta += rec
        if len(self._pending.meta) > self.max_batch // 2:
            self._wakeup.set()  # keep batches bounded even without commit requests

    def release(self, extents: list[Extent]) -> None:
        self.alloc.free_after(self._pending.seq, extents)

    # ------------------------------------------------------------------ appends

    @property
    def pending_seq(self) -> int:
        return self._pending.seq

    def need_barrier(self, write_gen: int) -> None:
        """The pending batch refers to data whose write completed at flush gen write_gen."""
        self._pending.barrier_gen = max(self._pending.barrier_gen, write_gen)

    async def wait_for_room(self, nbytes: int) -> None:
        """Keep the pending batch below max_batch: seal it first if this would overflow."""
        while not self._pending.empty and \
                self._pending.payload_bytes + len(self._pending.meta) + nbytes > self.max_batch:
            self.check_failed()
            pending = self._pending
            self._wakeup.set()
            with waiting(f"log batch {pending.seq} to be sealed"):
                await pending.sealed.wait()

    def append_data(self, ino: int, index: int, fblock: int, dblock: int,
                    payload: Buffer, nblocks: int) -> int:
        """Append a DATA record whose payload (already a private copy) holds nblocks blocks
        of file block fblock, to land at device block dblock. Returns the batch seq."""
        self.check_failed()
        batch = self._pending
        run = DataRun(fblock, dblock, nblocks, -1, batch.seq)
        batch.meta += fmt.rec_data(ino, fblock, dblock, nblocks, batch.payload_bytes)
        length = nblocks * self.bs
        batch.payloads.append((payload, length))
        batch.payload_bytes += length
        batch.data_runs.append(run)
        key = (ino, index)
        res = self._resident.get(key)
        # the blocks of older records not overwritten now keep their older log copy
        kept = self._trim_runs(res.runs, fblock, nblocks) if res is not None else []
        if res is None or res.seq != batch.seq:
            res = Resident(ino, index, batch.seq, kept)
            self._resident[key] = res
        else:
            res.runs = kept
        res.runs.append(run)
        return batch.seq

    def _trim_runs(self, runs: list[DataRun], fblock: int, nblocks: int) -> list[DataRun]:
        """runs without the blocks [fblock, fblock+nblocks): a run overwritten in part
        leaves the pieces before and after, which still hold the newest copy."""
        kept: list[DataRun] = []
        end = fblock + nblocks
        for r in runs:
            if not _overlaps(r, fblock, nblocks):
                kept.append(r)
                continue
            r_end = r.fblock + r.nblocks
            for lo, hi in ((r.fblock, min(fblock, r_end)), (max(end, r.fblock), r_end)):
                if lo < hi:
                    kept.append(self._piece(r, lo - r.fblock, hi - lo))
        return kept

    def _piece(self, run: DataRun, off: int, n: int) -> DataRun:
        piece = DataRun(run.fblock + off, run.dblock + off, n, -1, run.seq)
        if run.buf is not None:  # absorbed by the running checkpoint
            piece.buf, piece.buf_off = run.buf, run.buf_off + off * self.bs
        elif run.log_pos >= 0:
            piece.log_pos = run.log_pos + off * self.bs
        else:  # its batch is not placed yet: _assemble sets the piece's position too
            for batch in [self._pending] + self._boundaries + self._sealed:
                if batch.seq == run.seq:
                    batch.pieces.append((piece, run, off))
        return piece

    def is_resident(self, ino: int, index: int) -> bool:
        return (ino, index) in self._resident

    # ------------------------------------------------------------------- commit

    def check_failed(self) -> None:
        if self.failed is not None:
            raise LogFailed(5, f"the log cannot be written: {self.failed}")

    def has_pending(self) -> bool:
        return bool(self._boundaries) or not self._pending.empty or self.md.any_dirty

    def _batch(self, seq: int) -> PendingBatch:
        """The batch holding seq (sealed, absorbed or the pending one)."""
        for batch in self._sealed + self._boundaries + self._absorbed:
            if batch.seq == seq:
                return batch
        return self._pending

    async def commit(self, seq: int | None = None) -> None:
        """Wait until every batch up to seq (default: everything appended so far, including
        dirty inode attributes) is durable. LogFailed if a write of it failed meanwhile
        (it is rewritten later; a later commit may succeed).

        A commit that needs the pending batch and finds nothing in flight seals and writes
        it in its own task (it leads): no hand-off to the writer and back, and a lone
        committer never waits for company. One that finds a batch in flight waits for it
        (follows) and then leads the next one, which holds everything appended meanwhile:
        that is group commit. The writer task does the rest (failed batches, checkpoint
        boundaries, batches nobody commits, waiting for log space)."""
        self.check_failed()
        if seq is None:
            open_batch = not self._pending.empty or self.md.any_dirty
            seq = self._pending.seq if open_batch else self._pending.seq - 1
        while self.durable_seq < seq:
            self.check_failed()
            # (the pending batch is the newest: no search for it)
            batch = self._pending if seq >= self._pending.seq else self._batch(seq)
            if batch is self._pending and self._in_order():
                if not self._sealed:
                    led = self._seal_now()
                    if led is not None:
                        # Shielded: a sealed batch must be written (or fail) whatever
                        # happens to the task that leads it. Without a barrier to
                        # wait for, that is device writes made uncancellable
                        # themselves, at less cost than a cancel scope.
                        if led.barrier_gen < 0:
                            await self._write_batch(led, uncancellable=True)
                        else:
                            with trio.CancelScope(shield=True):
                                await self._write_batch(led)
                        if led.error is not None and not led.done.is_set():
                            raise LogFailed(5, f"log write failed: {led.error}")
                        continue
                else:
                    inflight = self._sealed[-1]
                    self._followers += 1
                    try:
                        with waiting(f"log batch {inflight.seq} before leading the next"):
                            await inflight.attempt.wait()
                    except BaseException:
                        self._followers -= 1
                        self._wakeup.set()  # the writer leads what this one would have
                        raise
                    self._followers -= 1
                    continue
            if batch is self._pending or batch in self._boundaries or self._retrying:
                self._wakeup.set()  # the writer's work (in flight already: nothing to do)
            if self._retrying and (batch is self._pending or batch in self._boundaries):
                self._rewrite_wanted = True  # new work waits behind the failed batches
            attempt = batch.attempt
            if attempt.is_set() and batch.error is not None:
                # that attempt failed before this caller came: ask for a rewrite, wait
                self._rewrite_wanted = True
                self._wakeup.set()
                started = self._rewrite_started
                with waiting(f"a rewrite of log batch {batch.seq}"):
                    await started.wait()
                continue
            with waiting(f"log batch {batch.seq} to be durable"):
                await attempt.wait()
            if batch.error is not None and not batch.done.is_set():
                raise LogFailed(5, f"log write failed: {batch.error}")

    def _in_order(self) -> bool:
        """May the pending batch be the next one written? Not while the writer has
        failed batches to rewrite, a checkpoint's boundary to write or absorbed batches
        (those come first), nor after the log failed."""
        return not (self._retrying or self._boundaries or self._absorbed
                    or self.failed is not None)

    def _seal_now(self) -> PendingBatch | None:
        """Seal and place the pending batch for a commit that writes it in its own task,
        if that needs no waiting: nothing in flight, and log space free now (otherwise
        None: the writer takes it and waits for space)."""
        self.md.flush_dirty()
        batch = self._pending
        if batch.empty:
            return None
        size = fmt.header_area_size(len(batch.meta), self.bs) + batch.payload_bytes
        if size > self.log_size - self.reserve:
            return None  # the writer reports it
        pos = self._try_place(size, batch)
        if pos is None:
            return None
        self._pending = PendingBatch(batch.seq + 1)
        batch.sealed.set()
        self._sealed.append(batch)
        self._placed_at(batch, pos)
        return batch

    # ------------------------------------------------------------------- writer

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: seals the pending batch and writes it; batches become durable
        strictly in order, and a failed one is rewritten in place. One batch is in flight:
        the next gathers every commit that arrives meanwhile (group commit), which on
        flush-bound devices beats writing batches in parallel (measured: at 2 or 4 in
        flight four O_DSYNC writers hardly shared a batch)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tick)
            task_status.started()
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                timed_out, self._ticked = self._ticked, False
                if self.failed is not None:
                    continue
                if self._retrying:
                    # Rewrite only when a commit asks (it found the failure, or waits
                    # behind it) or now and then for background durability: a rewrite
                    # started behind the back of the failed attempt's waiters would hide
                    # the failure from them.
                    if self._rewrite_wanted or timed_out:
                        self._rewrite_wanted = False
                        await self._rewrite_sealed()
                    continue
                # Nothing new is placed while a checkpoint holds absorbed batches: they
                # come first in the order in which batches become durable.
                while self.has_pending() and not self._sealed and not self._absorbed and \
                        not (self._followers and not self._boundaries):
                    batch = await self._seal_and_place()
                    if batch is None or self._retrying or self.failed is not None:
                        break
                    await self._write_batch(batch)

    async def _tick(self) -> None:
        """Wake the writer every commit interval: changes nobody commits become durable
        within it, and failed batches are retried. (A timer task, not a timeout around
        the writer's wait, which would cost a cancel scope per batch.)"""
        while True:
            await trio.sleep(self.commit_interval)
            self._ticked = True
            self._wakeup.set()

    async def _seal_and_place(self) -> PendingBatch | None:
        if self._boundaries:
            batch = self._boundaries.pop(0)  # sealed by seal_boundary already
        else:
            self.md.flush_dirty()
            batch = self._pending
            if batch.empty:
                return None
            self._pending = PendingBatch(batch.seq + 1)
            if batch.checkpoint:
                self._pending.checkpoint = False
            batch.sealed.set()
        self._sealed.append(batch)
        hdr = fmt.header_area_size(len(batch.meta), self.bs)
        try:
            pos = await self._place(hdr + batch.payload_bytes, batch)
        except CorruptFilesystem as exc:
            self.fail(exc)
            return None
        if pos < 0:
            return None  # a checkpoint absorbed it while it waited for room
        self._placed_at(batch, pos)
        return batch

    def _placed_at(self, batch: PendingBatch, pos: int) -> None:
        batch.pos = pos
        batch.placed_after = self._placed
        batch.segments, batch.total = self._assemble(batch, pos)

    async def _write_batch(self, batch: PendingBatch, uncancellable: bool = False) -> None:
        try:
            await self._write_placed(batch, uncancellable)
            batch.written = True
        except DeviceError as exc:
            batch.error = exc
            self.counters.writeback_errors += 1
            log.error("log write of batch %d failed: %s", batch.seq, exc)
        self._finish_attempt(batch)

    async def _write_placed(self, batch: PendingBatch, uncancellable: bool = False) -> None:
        """uncancellable: the device writes cannot be cancelled (the caller checked that
        there is no barrier flush to wait for, which could be)."""
        if batch.barrier_gen >= 0:
            await self.dev.flush_covering(batch.barrier_gen)
        off = batch.pos
        per = _CHUNK_SEGMENTS
        chunks = [batch.segments[i: i + per] for i in range(0, len(batch.segments), per)]
        for i, chunk in enumerate(chunks):
            # The last write carries the flush (one request; not RWF_DSYNC, which on
            # devices without FUA, such as loop devices, costs a flush before and after).
            if i == len(chunks) - 1:
                await self.dev.writev_flush(self.log_offset + off, chunk, "log",
                                            uncancellable=uncancellable)
            else:
                await self.dev.writev(self.log_offset + off, chunk, "log",
                                      uncancellable=uncancellable)
            off += sum(n for _, _, n in chunk)

    def _finish_attempt(self, batch: PendingBatch) -> None:
        """Batches become durable strictly in order (replay stops at the first invalid
        one). After a failed write every batch not yet durable fails its waiters as soon
        as its own write is over, and the writer rewrites them all at their places."""
        if batch.error is not None and not self._retrying:
            self._retrying = True
            self._failures += 1
            if self._failures >= 3:
                self.fail(batch.error)
        if not self._retrying:
            while self._sealed and self._sealed[0].written:
                self._acknowledge(self._sealed.pop(0))
        else:
            failure = batch.error or next((b.error for b in self._sealed if b.error), None)
            for b in self._sealed:
                if not b.done.is_set():
                    b.error = b.error or failure
                    b.attempt.set()
        batch.attempt.set()
        # The writer goes on unless the commits waiting for this batch lead the next.
        if self._retrying or self._boundaries or self._absorbed or \
                (self.has_pending() and not self._followers):
            self._wakeup.set()

    def _acknowledge(self, batch: PendingBatch) -> None:
        self._failures = 0
        self._batch_end[batch.seq] = (batch.pos + batch.total
                                      if batch.pos + batch.total + self.bs <= self.log_size
                                      else 0, batch.placed_after)
        self.durable_seq = batch.seq
        self.counters.log_batches += 1
        self.counters.log_bytes += batch.total
        self.alloc.release_durable(batch.seq)
        batch.error = None
        batch.done.set()
        batch.attempt.set()

    async def _rewrite_sealed(self) -> None:
        """After a failed write: write every sealed batch again, in order, at its place."""
        for batch in self._sealed:
            batch.attempt = trio.Event()
            batch.error = None
            batch.written = False
        started, self._rewrite_started = self._rewrite_started, trio.Event()
        started.set()
        for batch in list(self._sealed):
            try:
                await self._write_placed(batch)
            except DeviceError as exc:
                log.error("log rewrite of batch %d failed: %s", batch.seq, exc)
                self.counters.writeback_errors += 1
                self._failures += 1
                for b in self._sealed:
                    b.error = exc
                    b.attempt.set()
                if self._failures >= 3:
                    self.fail(exc)
                return
            batch.written = True
        self._retrying = False
        while self._sealed:
            self._acknowledge(self._sealed.pop(0))

    def fail(self, exc: BaseException) -> None:
        """Give up on the log: memory is ahead of the disk; refuse further changes."""
        if self.failed is None:
            log.error("the log cannot be written, the filesystem stops accepting changes: "
                      "%s", exc)
        self.failed = exc
        for b in self._sealed + self._boundaries + self._absorbed + [self._pending]:
            b.error = exc
            b.attempt.set()
        self._rewrite_started.set()  # waiters look again and find the log failed

    def _assemble(self, batch: PendingBatch, pos: int) -> tuple[list[Segment], int]:
        meta = batch.meta  # sealed: nothing appends to it any more
        hdr_area = fmt.header_area_size(len(meta), self.bs)
        total = hdr_area + batch.payload_bytes
        header = fmt.BatchHeader(self.uuid_tag, batch.seq, pos, total, len(meta),
                                 len(batch.payloads))
        hbuf = Buffer(hdr_area)
        hbuf.write(0, header.pack(0) + meta)  # the checksum covers it with crc 0
        crc = hbuf.crc32c()
        for buf, length in batch.payloads:
            crc = buf.crc32c(0, length, crc)
        hbuf.write(fmt.CRC_FIELD_OFFSET, crc.to_bytes(4, "little"))
        segments: list[Segment] = [(hbuf, 0, hdr_area)]
        segments += [(buf, 0, length) for buf, length in batch.payloads]
        off = pos + hdr_area
        for run in batch.data_runs:
            run.log_pos = off
            off += run.nblocks * self.bs
        for piece, run, blocks in batch.pieces:
            piece.log_pos = run.log_pos + blocks * self.bs
        return segments, total

    @property
    def used(self) -> int:
        """Bytes of the log between the tail and the head."""
        return self._placed - self._tail_mark

    async def _place(self, size: int, batch: PendingBatch) -> int:
        """Find the log position for a batch of this size, waiting for a checkpoint to
        free space when the log is too full. Batches up to a checkpoint's boundary may use
        the reserve at the end, which other batches leave free for them (and what does not
        fit even there, the checkpoint absorbs: then -1, see checkpoint.py)."""
        if size > self.log_size - self.reserve:
            raise CorruptFilesystem(f"log batch of {size} bytes exceeds the log")
        while True:
            if batch.absorbed:
                return -1
            pos = self._try_place(size, batch)
            if pos is not None:
                return pos
            self.request_checkpoint()
            room = self._room
            with waiting(f"log space for batch {batch.seq} ({size} bytes, "
                         f"{self.used} of {self.log_size} used)"):
                await room.wait()

    def _try_place(self, size: int, batch: PendingBatch) -> int | None:
        """The batch's log position if there is room for it now (taken), else None."""
        pos = self.head_pos
        waste = 0
        if pos + size > self.log_size:
            waste, pos = self.log_size - pos, 0
        limit = self.log_size - self.bs if batch.checkpoint else \
            self.log_size - self.reserve
        if self.used + waste + size > limit:
            return None
        self._placed += waste + size
        self.head_pos = pos + size
        if self.head_pos + self.bs > self.log_size:
            self.head_pos = 0
        if self.used > self.log_size // 2:
            self.request_checkpoint()
        return pos

    # --------------------------------------------------------------- checkpoints
    #
    # What a checkpoint (checkpoint.py) needs of the log. It never needs log space: when it
    # seals its boundary, the batches up to it that are not placed yet either fit into what
    # is left of the log, the reserve included (open_reserve), or are *absorbed* (absorb):
    # taken from the writer and never written to the log; they become durable with the
    # checkpoint's superblock (acknowledge_absorbed). Until then nothing new is placed:
    # the absorbed batches come first in the order in which batches become durable.

    def attach_checkpointer(self, request: Callable[[], None]) -> None:
        """request (which must not await) is called whenever the log wants a checkpoint."""
        self._request_checkpoint = request

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint: log space or memory held by logged folios runs short."""
        self._request_checkpoint()

    def open_reserve(self) -> list[PendingBatch]:
        """A checkpoint seals its boundary: the batches sealed so far may use the reserve
        (they are what frees it). Returns those of them not placed yet, and the pending
        batch if it holds anything, in order."""
        for batch in self._sealed:
            batch.checkpoint = True
        room, self._room = self._room, trio.Event()
        room.set()  # a batch waiting in _place looks again, with the reserve
        unplaced = [b for b in self._sealed if b.pos < 0]
        if not self._pending.empty:
            unplaced.append(self._pending)
        return unplaced

    def absorb(self, batches: list[PendingBatch]) -> None:
        """Take these batches (not placed, in order, the last maybe the pending one) away
        from the writer: the checkpoint writes their resident runs home, and they become
        durable with it (the pending one is absorbed when seal_boundary seals it)."""
        for b in batches:
            if b is not self._pending:
                b.absorbed = True
                self._sealed.remove(b)
                self._absorbed.append(b)
        self.counters.checkpoint_absorbed += len(batches)
        log.info("log full: checkpoint takes batches %d-%d out of place instead of logging "
                 "them", batches[0].seq, batches[-1].seq)

    def seal_boundary(self, absorbed: bool) -> int:
        """Seal the pending batch (if it holds anything) as a checkpoint's boundary, to be
        absorbed too if absorbed; returns the sequence number of the last batch the
        checkpoint covers. Sealed now, not when the writer gets to it: whatever is appended
        from here on is not in the checkpoint's snapshot, so it must go into the next
        batch."""
        if self._pending.empty:
            return self._pending.seq - 1
        batch = self._pending
        batch.checkpoint = True
        batch.sealed.set()
        self._pending = PendingBatch(batch.seq + 1)
        if absorbed:
            batch.absorbed = True
            self._absorbed.append(batch)
        else:
            self._boundaries.append(batch)
        self._wakeup.set()
        return batch.seq

    async def settle_for_checkpoint(self, boundary: int) -> list[PendingBatch]:
        """Wait until every batch up to boundary is durable, except the absorbed ones
        (returned, in order: they become durable with the checkpoint's superblock).
        LogFailed if a write failed."""
        if not self._absorbed:
            await self.commit(boundary)
            return []
        if self._sealed:  # placed before the absorbed ones: only their write remains
            await self.commit(self._sealed[-1].seq)
        # No batch is placed until the absorbed ones are acknowledged: the log goes on here.
        for b in self._absorbed:
            self._batch_end[b.seq] = (self.head_pos, self._placed)
        return list(self._absorbed)

    def acknowledge_absorbed(self) -> None:
        """The checkpoint's superblock is durable: so are the batches it absorbed."""
        for b in self._absorbed:
            self.durable_seq = b.seq
            self.alloc.release_durable(b.seq)
            b.error = None
            b.done.set()
            b.attempt.set()
            for run in b.data_runs:
                run.buf = None
            for piece, _, _ in b.pieces:
                piece.buf = None
        self._absorbed = []
        self._wakeup.set()

    def resident_runs(self, upto_seq: int | None = None) -> list[tuple[int, int, DataRun]]:
        """(ino, folio index, run) of every resident run (up to batch upto_seq): the runs
        themselves, not copies, so that those of a batch not placed yet learn their log
        position when it is."""
        return [(res.ino, res.index, r) for res in self._resident.values() for r in res.runs
                if upto_seq is None or r.seq <= upto_seq]

    def file_is_resident(self, ino: int) -> bool:
        return any(key[0] == ino for key in self._resident)

    @property
    def resident_count(self) -> int:
        """Folios whose newest version lives only in the log."""
        return len(self._resident)

    def batch_end(self, seq: int) -> int:
        """Log position just after batch seq (where replay continues)."""
        return self._batch_end[seq][0]

    def advance_tail(self, seq: int) -> None:
        """The checkpoint covering batches up to seq is durable: reclaim their log space
        and forget resident units whose newest record it covered."""
        end_pos, placed = self._batch_end[seq]
        self.tail_pos = end_pos
        self.tail_seq = seq + 1
        self._tail_mark = placed
        for s in [s for s in self._batch_end if s < seq]:
            del self._batch_end[s]
        for key, res in list(self._resident.items()):
            # runs up to seq are home now; later records of the same folio stay resident
            res.runs = [r for r in res.runs if r.seq > seq]
            if not res.runs:
                del self._resident[key]
        room, self._room = self._room, trio.Event()
        room.set()


def _overlaps(run: DataRun, fblock: int, nblocks: int) -> bool:
    return run.fblock < fblock + nblocks and fblock < run.fblock + run.nblocks
