"""Writeback: which dirty folios go out, when, and by which path.

Routing of a dirty folio (`Writeback.route`), decided from the folio's state at the moment
its writeback starts, with no await in between, so that nothing is decided twice (the
paths themselves are in submit.py):

* in a pending write group: the whole group goes into one log batch (or one RWF_ATOMIC
  write of k whole aligned units);
* resident (its newest copy is in the log): into the log again, or replay would roll a
  newer in-place copy back;
* atomic: one RWF_ATOMIC write of the unit if the device writes it untorn (hardware
  path), else into the log (software path; a checkpoint writes the home copy later);
* anything else in place, adjacent folios merged; a small synchronous write into new
  blocks goes into the log instead (one device write and one flush, instead of a data
  write, a flush ordering it before the batch that maps it, the batch, and a flush).

Write-through runs the same routing at once for the blocks a write just copied, holds those
folios under stable writeback until the data is durable, and only then lets the write
return. While any write-through is in flight on a file, writers to a folio under writeback
wait (stable pages). fsync and sync write back and commit.
"""
from __future__ import annotations

import enum
import errno
import logging
from collections import deque


from atomicfs.delalloc import extents_of
from atomicfs.errors import DeviceError, NoSpace
from atomicfs.journal import LogFailed
from atomicfs.metadata import Inode
from atomicfs.pagecache import Folio, Mapping, mask_runs, popcount
from atomicfs.submit import Held, Submitter, WriteOutcome

log = logging.getLogger(__name__)

# A synchronous write (fsync, write-through) of at most this much data into blocks that
# have no home yet goes into the log (see the module docstring).
SMALL_SYNC_LOG_BYTES = 256 << 10


class Route(enum.Enum):
    """Where a dirty folio goes (see the module docstring), in the order a call sends
    them out."""

    GROUP = 0
    HARDWARE = 1
    LOG = 2
    IN_PLACE = 3



class Writeback(Submitter):
    """Routing of dirty folios, write-through, fsync and sync."""

    # ------------------------------------------------------------------ routing

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
                    self.cache.dissolve_group(folio.group, 0)
        # Background writeback leaves a busy folio to whoever has it.
        todo = [(f, mask) for f, mask in items
                if f.group is not None or (mask & f.dirty and not f.busy)]
        small = waits and self._small_new_data(
            inode, [(f, mask & f.dirty) for f, mask in todo
                    if self.route(m, f) is Route.IN_PLACE])
        # The order to send them out in (groups, hardware, log, in place); each folio is
        # routed again when its writeback starts.
        queue = deque(sorted(todo, key=lambda it: self.route(m, it[0], small).value)
                      if len(todo) > 1 else todo)
        inplace: list[tuple[Folio, int]] = []
        tried: set[int] = set()  # write groups this call has sent (or failed to)
        with Held(self.cache) as held:
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
                         tried: set[int], held: Held) -> bool:
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

    # ------------------------------------------------------------------ in place

    async def _write_in_place(self, inode: Inode, m: Mapping, batch: list[tuple[Folio, int]],
                              out: WriteOutcome, writethrough: bool, small: bool,
                              held: Held) -> list[tuple[Folio, int]]:
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
