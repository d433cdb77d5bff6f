"""A mounted filesystem without FUSE: the layers wired together, recovery, statistics.

`Volume.open` opens the target, reads the newest superblock and the metadata snapshot,
replays the log (writing logged atomic data home) and rebuilds free space. `start` runs the
journal writer, the flusher and the checkpointer in a nursery; `shutdown` writes everything
back and leaves a clean checkpoint. fs.py drives a Volume from FUSE requests; the tests in
tests/fs drive it directly.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import trio

from atomicfs import format as fmt
from atomicfs import owner
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

    @classmethod
    def open(cls, path: str, opts: MountOptions) -> "Volume":
        # Read-only: the device is opened O_RDONLY, so nothing can reach it by mistake.
        dev = Device.open(path, readonly=opts.ro,
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
        if self.dev.owner is not None:
            await nursery.start(self.dev.owner.run, self.journal.fail)
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
