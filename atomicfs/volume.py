"""A mounted filesystem without FUSE: the layers wired together, recovery, statistics.

`Volume.open` opens the target, reads the newest superblock and the metadata snapshot,
replays the log (writing logged atomic data home) and rebuilds free space. `start` runs the
journal writer, the flusher and the checkpointer in a nursery; `shutdown` writes everything
back and leaves a clean checkpoint. fs.py and control.py drive a Volume from FUSE requests
through its facade (the metadata-space rule, fsync, errseq, sync and the other commands),
never through the layers behind it; the tests in tests/fs drive it directly.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import trio

from atomicfs import format as fmt
from atomicfs import fuseconn, fuseloop, owner
from atomicfs.alloc import Allocator
from atomicfs.checkpoint import Checkpointer
from atomicfs.delalloc import Delalloc
from atomicfs.device import Device, DeviceOptions
from atomicfs.errors import CorruptFilesystem, DeviceError, NoSpace, UserError
from atomicfs.filemap import FileMap
from atomicfs.flusher import Flusher
from atomicfs.journal import Journal
from atomicfs.metadata import EXTENT_SNAP, Inode, Metadata
from atomicfs.options import MountOptions
from atomicfs.pagecache import Mapping, PageCache
from atomicfs.recovery import LogOverlay, Recovered, hold_kept_blocks, recover
from atomicfs.replay import ReplayResult, surviving_data, write_data_home
from atomicfs.stats import Counters
from atomicfs.superblock import read_superblock
from atomicfs.watchdog import Watchdog
from atomicfs.submit import WritebackPolicy
from atomicfs.writeback import Writeback

log = logging.getLogger(__name__)

LOG_ROOM = 2048  # log bytes a namespace change may add (inode and dirent records, names)
SNAPSHOT_SLACK = 16  # blocks, for extents that writeback maps before the next checkpoint


def build_allocator(sb: fmt.Superblock, md: Metadata,
                    snapshot_extents: list[tuple[int, int]]) -> Allocator:
    """Free space is whatever no file and no snapshot uses; overlaps are damage. (Mount
    and fsck get theirs from consistency.check_metadata; this one serves tools and tests
    that have metadata without a recovery.)"""
    alloc = Allocator(sb.total_blocks, sb.data_start)
    alloc.extent_record_bytes = EXTENT_SNAP
    alloc.block_size = sb.block_size
    for dblock, count in snapshot_extents:
        alloc.mark_used(dblock, count)
    for inode in md.inodes.values():
        if inode.extents is None:
            continue
        for _f, dblock, count in inode.extents:
            try:
                alloc.mark_used(dblock, count)
            except ValueError as exc:
                raise CorruptFilesystem(f"inode {inode.ino}: {exc}") from exc
    return alloc


class Volume:
    def __init__(self, dev: Device, sb: fmt.Superblock, md: Metadata, alloc: Allocator,
                 journal: Journal, opts: MountOptions, counters: Counters,
                 needs_checkpoint: bool) -> None:
        self.dev = dev
        self.sb = sb
        self.md = md
        self.alloc = alloc
        self.journal = journal
        self.opts = opts
        self.counters = counters
        self.bs = sb.block_size
        self.cache = PageCache(self.bs, opts.cache_size, max(opts.folio_size, self.bs),
                               counters, align=dev.caps.dio_mem_align)
        self.watchdog = Watchdog()
        self.checkpointer = Checkpointer(dev, sb, md, alloc, journal, self.cache, counters,
                                         self.watchdog)
        self.delalloc = Delalloc(alloc, md, self.cache)
        self.wb = Writeback(dev, md, journal, self.cache, self.delalloc, self.checkpointer,
                            counters, WritebackPolicy(opts.atomic_path, opts.debug,
                                                      opts.unsafe_atomic))
        self.flusher = Flusher(md, alloc, journal, self.cache, self.wb, self.checkpointer,
                               counters, opts.dirty_expire)
        self.filemap = FileMap(dev, md, self.cache, self.delalloc, self.flusher, self.wb,
                               counters)
        self.needs_checkpoint = needs_checkpoint
        self.replayed: ReplayResult | None = None
        self.recovered: Recovered | None = None
        self.ro = opts.ro
        self.started_ns = time.time_ns()

    # ---------------------------------------------------------------- open / close

    @property
    def claim(self) -> owner.Owner | None:
        """The owner claim the device holds (it releases it when it closes)."""
        c = self.dev.owner
        return c if isinstance(c, owner.Owner) else None

    @classmethod
    def open(cls, path: str, opts: MountOptions) -> "Volume":
        # Read-only: the device is opened O_RDONLY, so nothing can reach it by mistake.
        dev = owner.open_device(path, readonly=opts.ro,
                          options=DeviceOptions(opts.inject, opts.delay_ms / 1000.0,
                                                opts.record))
        try:
            return cls._load(dev, opts)
        except BaseException:
            dev.close()
            raise

    @classmethod
    def _load(cls, dev: Device, opts: MountOptions) -> "Volume":
        sb = read_superblock(dev)
        if opts.atomic_path == "hardware" and dev.caps.atomic_unit_max == 0:
            raise UserError(f"{dev.path} does not support atomic writes "
                            "(statx reports no atomic write limits); use atomic_path=auto "
                            "or software")
        if opts.atomic_unit and opts.atomic_unit < sb.block_size:
            raise UserError(f"atomic_unit={opts.atomic_unit} is below the filesystem block "
                            f"size {sb.block_size}")
        if dev.readonly:
            owner.check(dev, sb, "mount")  # refuses a live owner, claims nothing
        else:
            dev.owner = owner.Owner.claim(dev, sb)  # before anything is written
        try:
            rec = recover(dev, sb)
            problems = rec.check.problems
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise CorruptFilesystem(problems[0] + more)
            if not opts.ro:
                write_data_home(dev, rec.sb, rec.md, rec.result)
        except CorruptFilesystem as exc:
            raise UserError(f"{dev.path}: filesystem damaged: {exc}; "
                            "run `atomicfs fsck` for details") from exc
        except DeviceError as exc:
            raise UserError(f"{dev.path}: cannot read the filesystem: {exc}") from exc
        for line in rec.slot_problems + ([rec.kept_problem] if rec.kept_problem else []):
            log.warning("%s: %s; run `atomicfs fsck --repair`", dev.path, line)
        if rec.fallback:
            log.warning("%s: the newest metadata snapshot is damaged (%s); mounted the "
                        "previous checkpoint's. Lost: %s", dev.path, rec.fallback,
                        "; ".join(rec.lost))
        result = rec.result
        if result.batches:
            log.info("replayed %d log batches (%d records, %d data blocks written home)",
                     result.batches, result.records, result.data_blocks_written)
        return cls.from_recovered(dev, rec, opts)

    @classmethod
    def from_recovered(cls, dev: Device, rec: Recovered, opts: MountOptions) -> "Volume":
        """The Volume over metadata recovery loaded and checked (fsck --repair uses it to
        write its result as a mount would)."""
        sb, md, result = rec.sb, rec.md, rec.result
        alloc = rec.check.alloc
        assert alloc is not None
        if not opts.ro:
            hold_kept_blocks(alloc, rec)
        counters = Counters()
        journal = Journal(dev, sb, md, alloc, counters, result.head_pos, result.head_seq,
                          commit_interval=opts.commit_interval)
        md.sink = journal
        vol = cls(dev, sb, md, alloc, journal, opts, counters,
                  needs_checkpoint=result.batches > 0 or rec.fallback is not None)
        vol.checkpointer.snapshot_extents = list(rec.snap_extents)
        vol.checkpointer.previous_snapshot_extents = list(rec.kept_extents)
        vol.replayed = result
        vol.recovered = rec
        if opts.ro:
            # Reads see the replayed atomic data where it lies in the log.
            overlay = LogOverlay(dev, sb.block_size,
                                 surviving_data(sb, md, result.data))
            vol.filemap.dev = overlay  # type: ignore[assignment]
        return vol

    async def start(self, nursery: trio.Nursery) -> None:
        """Run the background tasks; finish recovery (orphans, checkpoint)."""
        await nursery.start(self.dev.run_reaper)
        await nursery.start(self.watchdog.run)
        if self.ro:
            return  # no writer, no flusher, no checkpoint, no orphan removal
        await nursery.start(self.journal.run)
        await nursery.start(self.flusher.run_flusher)
        await nursery.start(self.checkpointer.run)
        if self.claim is not None:
            await nursery.start(self.claim.run, self.journal.fail)
        orphans = [i for i in self.md.inodes.values() if i.nlink == 0
                   and i.ino != fmt.ROOT_INO]
        for inode in orphans:
            self.md.delete_inode(inode)
        if orphans:
            log.info("removed %d orphaned inodes", len(orphans))
        if orphans or self.needs_checkpoint:
            await self._checkpoint_if_room()

    async def _checkpoint_if_room(self) -> None:
        """A checkpoint that finds no room for the snapshot loses nothing (the log keeps
        every change and the next mount replays it), so it does not fail the caller."""
        try:
            await self.checkpointer.checkpoint()
        except NoSpace as exc:
            log.warning("no room for a metadata snapshot (%s); the log keeps the changes",
                        exc)

    async def shutdown(self) -> bool:
        """Write back everything and checkpoint; False if anything could not be written."""
        if self.ro:
            return True
        ok = True
        try:
            ok = await self.wb.sync_all()
            # Nobody writes any more: anything still dirty could not be written.
            ok = ok and not any(m.dirty for m in self.cache.mappings.values())
            if self.journal.failed is None and (self.journal.used or
                                                self.journal.has_pending()):
                await self.journal.commit()
                await self._checkpoint_if_room()
        except (DeviceError, OSError) as exc:
            log.error("final writeback failed: %s", exc)
            ok = False
        if self.journal.failed is not None:
            ok = False
        return ok

    def close(self) -> None:
        self.dev.close()

    # ------------------------------------------------------- metadata space (facade)

    def check_writable(self) -> None:
        """OSError(EIO) once the log has failed: the filesystem accepts no more changes."""
        if self.journal.failed is not None:
            raise OSError(errno.EIO, "the log failed; no changes are accepted")

    async def prepare_change(self, nbytes: int = LOG_ROOM, growth: int = 0) -> None:
        """Before a metadata change: refuse when the log failed, keep the pending log batch
        within its size limit (a burst of changes would otherwise grow one batch past what
        the log can hold), and make room for `growth` more bytes of metadata. Call before
        any lookup the change depends on: this may wait."""
        self.check_writable()
        await self.journal.wait_for_room(nbytes)
        if not self._metadata_fits(growth):
            # commit the log so that blocks of recent deletes become free (the check
            # itself, metadata_room, follows without an await before the change)
            await self.flusher.make_room()
        self.check_writable()

    def metadata_room(self, growth: int) -> None:
        """NoSpace unless the metadata can grow by `growth` bytes (see `_metadata_fits`);
        file data may not use the room the metadata needs (the allocator's reserve
        follows its size). Call right before the change, with no await in between."""
        if not self._metadata_fits(growth):
            raise NoSpace(f"no room for {growth} more bytes of metadata")
        self.update_meta_reserve()

    def update_meta_reserve(self) -> None:
        """Keep file data out of the room the next snapshot needs (it grows between
        checkpoints; the checkpointer sizes it only at each checkpoint)."""
        self.alloc.set_snapshot_estimate(self.md.snapshot_bytes, self.bs)

    def _metadata_fits(self, growth: int) -> bool:
        """Whether the metadata, grown by `growth` bytes, can still be checkpointed, now and
        ever after: a checkpoint writes the new snapshot while the current and the
        previous one (the fallback) live, and then frees only the previous one, so free
        space must hold the next snapshot three times less the two that will be freed
        (3 * next - current - previous). Without this the log fills and the filesystem
        stops."""
        if growth <= 0:
            return True
        a = self.alloc
        nxt = 1 + (self.md.snapshot_bytes + growth + self.bs - 1) // self.bs + SNAPSHOT_SLACK
        kept = self.checkpointer.kept_snapshot_blocks
        return 3 * nxt - kept <= a.free_blocks - a.reserved_blocks

    async def make_room(self) -> bool:
        """After NoSpace from a write: free what recent deletes and the fallback checkpoint
        hold; whether anything could help."""
        return await self.flusher.make_room()

    def space(self) -> tuple[int, int, int]:
        """statfs's data blocks, free blocks and blocks available to users. Blocks held for
        the fallback checkpoint count as free: a write that needs them gets them after
        the checkpoints make_room runs."""
        a = self.alloc
        return (a.data_blocks,
                max(0, a.free_blocks - a.reserved_blocks - a.meta_reserve) + a.held_blocks,
                a.available_blocks + a.held_blocks)

    # ---------------------------------------------------- files and commands (facade)

    async def delete_inode(self, inode: Inode) -> None:
        """Remove an inode nobody references: its cached data and I/O first."""
        await self.filemap.drop_inode(inode)
        if inode.ino in self.md.inodes:
            self.md.delete_inode(inode)

    async def fsync(self, inode: Inode, datasync: bool) -> None:
        """Write back a file and commit (DeviceError/LogFailed for failures of this call;
        errors of earlier background writeback are reported by `errseq_check`)."""
        await self.wb.fsync(inode, datasync)

    def errseq_sample(self, inode: Inode) -> int:
        """The writeback-error sequence a new descriptor of a regular file starts from: it
        sees errors recorded after it opened, and also the latest one if nobody has seen
        it yet (Linux errseq_sample)."""
        m = self.cache.mappings.get(inode.ino)
        if m is None:
            return 0  # as a new mapping would answer (no error yet); opening creates none
        return m.err_seq if m.err_seen else m.err_seq - 1

    def errseq_check(self, inode: Inode, since: int) -> int | None:
        """The newer error sequence if a writeback error was recorded after `since`, now
        seen (file_check_and_advance_wb_err); None if there was none."""
        m = self.cache.mappings.get(inode.ino)
        if m is None or since >= m.err_seq:
            return None
        m.err_seen = True
        return m.err_seq

    def reserved_blocks(self, inode: Inode) -> int:
        """Blocks of the file's dirty data not yet allocated (delayed allocation)."""
        return self.delalloc.reserved_in(self.cache.mappings.get(inode.ino))

    async def change_folio_size(self, inode: Inode) -> None:
        """Before a file's atomic unit changes: its dirty data goes out and its logged units
        are made home, so that no log state refers to the old folio layout; then its
        folios are dropped (OSError EIO if its data could not be written)."""
        m = self.cache.mappings.get(inode.ino)
        if m is None:
            return
        out = await self.wb.writeback_mapping(inode, m, wait=True)
        if out.failed or m.dirty:
            raise OSError(errno.EIO, f"cannot write back inode {inode.ino}")
        if self.journal.file_is_resident(inode.ino):
            await self.checkpointer.checkpoint()
        await self.cache.wait_unused(m)
        self.wb.settle_size(inode, m)
        self.cache.drop_mapping(inode.ino)

    def hardware_ok(self, unit: int) -> bool:
        """Whether the device writes units of this size atomically."""
        return self.wb.hardware_ok(unit)

    async def sync(self) -> bool:
        """Write back everything, commit and checkpoint; False if anything failed."""
        ok = await self.wb.sync_all()
        if self.journal.failed is None:
            await self.checkpointer.checkpoint()
        return ok and self.journal.failed is None

    async def checkpoint(self) -> None:
        await self.checkpointer.checkpoint()

    async def commit(self) -> None:
        """Make everything logged so far durable."""
        await self.journal.commit()

    async def flush(self) -> None:
        """Background writeback of all dirty data, now."""
        await self.flusher.flush_some(everything=True)

    def drop_caches(self) -> None:
        self.cache.evict(self.cache.limit)

    # ----------------------------------------------------------------- file policy

    def effective_unit(self, inode: Inode) -> int:
        return inode.atomic_unit if inode.atomic_unit > 0 else 0

    def mapping(self, inode: Inode) -> Mapping:
        unit = self.effective_unit(inode)
        folio_size = unit if unit else self.cache.default_folio_size
        m = self.cache.mappings.get(inode.ino)
        if m is not None and m.folio_size != folio_size:
            raise RuntimeError(f"mapping of inode {inode.ino} has the old folio size")
        return self.cache.mapping(inode, folio_size)

    def writethrough_of(self, inode: Inode) -> bool:
        """Durable write-through (xattr 1, or the mount option)."""
        return inode.writethrough == 1 or (inode.writethrough == -1 and self.opts.writethrough)

    def writethrough_mode(self, inode: Inode) -> str | None:
        """"durable", "rfc" (xattr 2: written through without a cache flush) or None."""
        if self.writethrough_of(inode):
            return "durable"
        return "rfc" if inode.writethrough == 2 else None

    def strict_of(self, inode: Inode) -> bool:
        return inode.atomic_strict == 1 or (inode.atomic_strict == -1
                                            and self.opts.atomic_strict)

    # ------------------------------------------------------------------ statistics

    def atomic_path(self) -> str:
        if self.opts.atomic_path == "software":
            return "software"
        return "hardware" if self.dev.caps.atomic_unit_max else "software"

    def mount_stats(self) -> dict[str, Any]:
        c = self.cache
        a = self.alloc
        return {
            "pid": os.getpid(),
            "cache": {"bytes": c.bytes, "limit": c.limit, "dirty_bytes": c.dirty_bytes,
                      "writeback_bytes": c.writeback_bytes, "logged_bytes": c.logged_bytes,
                      "pinned_bytes": c.pinned_bytes, "spare_bytes": c.spare_bytes,
                      "folios": sum(len(m.folios) for m in c.mappings.values()),
                      "mappings": len(c.mappings)},
            "device": {"path": self.dev.path, "size": self.dev.caps.size,
                       "block_device": self.dev.caps.is_blockdev,
                       "block_size": self.bs,
                       "atomic_unit_min": self.dev.caps.atomic_unit_min,
                       "atomic_unit_max": self.dev.caps.atomic_unit_max,
                       "atomic_path": self.atomic_path(),
                       "flushes": self.dev.flushes, "write_ios": self.dev.write_ios,
                       "write_bytes": self.dev.write_bytes},
            "folio_states": self._folio_states(),
            "counters": self.counters.as_dict(),
            "requests": self.watchdog.stats(),
            "latency": self.watchdog.latency(self.dev.latency),
            "log": {"size": self.journal.log_size, "used": self.journal.used,
                    "durable_seq": self.journal.durable_seq,
                    "tail_seq": self.journal.tail_seq,
                    "resident_folios": self.journal.resident_count,
                    "failed": str(self.journal.failed) if self.journal.failed else None},
            "space": {"block_size": self.bs, "data_blocks": a.data_blocks,
                      "free_blocks": a.free_blocks, "available_blocks": a.available_blocks,
                      "reserved_blocks": a.reserved_blocks,
                      "pending_free_blocks": a.pending_blocks,
                      "metadata_reserve_blocks": a.meta_reserve,
                      "inodes": len(self.md.inodes)},
            "options": self.opts.describe(),
            "fuse_conn": fuseconn.state(),
            "request_loop": fuseloop.state(),
        }

    def _folio_states(self) -> dict[str, int]:
        """The folio counts of every file summed (`stable`: files with stable pages)."""
        total = dict.fromkeys(("cached", "dirty", "writeback", "atomic", "logged",
                               "writethrough_inflight", "stable"), 0)
        for m in self.cache.mappings.values():
            for k, v in m.counts().items():
                total[k] = total.get(k, 0) + v
        return total

    def file_stats(self, inode: Inode, handle_writethrough: bool = False) -> dict[str, Any]:
        unit = self.effective_unit(inode)
        m = self.cache.mappings.get(inode.ino)
        folios = m.counts() if m is not None else {
            "cached": 0, "bytes": 0, "dirty": 0, "writeback": 0, "atomic": 0, "logged": 0,
            "writethrough_inflight": 0, "stable": 0}
        return {
            "ino": inode.ino,
            "size": inode.size,
            "atomic_unit": unit,
            "writethrough": self.writethrough_mode(inode) is not None or handle_writethrough,
            "writethrough_mode": "durable" if handle_writethrough else
            self.writethrough_mode(inode),
            "atomic_strict": self.strict_of(inode) if unit else False,
            "atomic_path": self.wb.atomic_path_of(unit),
            "folio_size": m.folio_size if m is not None else (unit or
                                                             self.cache.default_folio_size),
            "folios": folios,
            "stable": bool(folios["stable"]),
            "writethrough_inflight": folios["writethrough_inflight"],
            "writeback_errors": m.err_seq if m is not None else 0,
            "mapped_blocks": inode.extents.mapped_blocks if inode.extents is not None else 0,
        }
