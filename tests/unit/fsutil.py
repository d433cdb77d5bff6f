"""Helpers of the unit layer: open a formatted image the way a mount does (without FUSE),
run the journal writer, and describe metadata canonically for comparisons."""
from __future__ import annotations

import os
import stat
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from atomicfs import format as fmt
from atomicfs.alloc import Allocator
from atomicfs.checkpoint import Checkpointer
from atomicfs.device import Device, DeviceOptions
from atomicfs.journal import Journal
from atomicfs.replay import ReplayResult, replay
from atomicfs.superblock import read_snapshot, read_superblock
from atomicfs.metadata import Extent, Inode, Metadata
from atomicfs.native import Buffer
from atomicfs.pagecache import PageCache
from atomicfs.stats import Counters
from atomicfs.volume import build_allocator


@dataclass
class Opened:
    dev: Device
    sb: fmt.Superblock
    md: Metadata
    alloc: Allocator
    journal: Journal
    checkpointer: Checkpointer  # over an empty page cache: home copies come from the log
    result: ReplayResult
    snapshot_extents: list[Extent]

    @property
    def bs(self) -> int:
        return self.sb.block_size

    def close(self) -> None:
        self.dev.close()


def open_fs(path: str, write_home: bool = True,
            options: DeviceOptions | None = None) -> Opened:
    """Recovery as Volume._load does it: superblock, snapshot, replay, free space."""
    dev = Device.open(path, options=options)
    try:
        sb = read_superblock(dev)
        md = Metadata(sb.block_size)
        snapshot, extents = read_snapshot(dev, sb)
        md.load(snapshot)
        md.next_ino = max(md.next_ino, sb.next_ino)
        result = replay(dev, sb, md, write_home=write_home)
        alloc = build_allocator(sb, md, extents)
        counters = Counters()
        journal = Journal(dev, sb, md, alloc, counters, result.head_pos, result.head_seq,
                          commit_interval=3600.0)  # batches go out on commit only
        cache = PageCache(sb.block_size, 1 << 20, sb.block_size, counters)
        checkpointer = Checkpointer(dev, sb, md, alloc, journal, cache, counters)
        checkpointer.snapshot_extents = list(extents)
        md.sink = journal
    except BaseException:
        dev.close()
        raise
    return Opened(dev, sb, md, alloc, journal, checkpointer, result, list(extents))


def reopen(o: Opened, write_home: bool = True) -> Opened:
    """A crash: forget everything in memory and recover from the image."""
    path = o.dev.path
    o.close()
    return open_fs(path, write_home=write_home)


@asynccontextmanager
async def running(journal: Journal) -> AsyncIterator[None]:
    """The journal writer task, for the duration of the block."""
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def reaped(o: "Opened", writer: bool = True) -> AsyncIterator[None]:
    """The device's completion reaper, and the journal writer unless writer=False, for the
    duration of the block; the filesystem closed after it."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(o.dev.run_reaper)
            if writer:
                await nursery.start(o.journal.run)
            yield
            nursery.cancel_scope.cancel()
    finally:
        o.close()


def canonical(md: Metadata) -> dict[str, Any]:
    """Everything that must survive a replay, independent of dict insertion order,
    including the fields derived at load time (parent, parsed atomicfs xattrs)."""
    inodes = {}
    for ino, i in md.inodes.items():
        inodes[ino] = (i.record_fields(), i.parent, i.target,
                       sorted(i.xattrs.items()),
                       list(i.extents) if i.extents is not None else None,
                       sorted(i.entries.items()) if i.entries is not None else None,
                       i.atomic_unit, i.writethrough, i.atomic_strict)
    return {"next_ino": md.next_ino, "inodes": inodes}


def create_file(md: Metadata, name: bytes, parent: Inode | None = None,
                mode: int = stat.S_IFREG | 0o644) -> Inode:
    parent = parent if parent is not None else md.root
    inode = md.new_inode(mode, 0, 0, now=1)
    md.add_entry(parent, name, inode, now=1)
    return inode


def pattern(tag: int, nbytes: int) -> bytes:
    """Recognisable block contents: every 8 bytes hold the tag and the position."""
    return b"".join((tag << 32 | i).to_bytes(8, "little") for i in range(nbytes // 8))


def payload(data: bytes) -> Buffer:
    buf = Buffer(len(data))
    buf.write(0, data)
    return buf


def read_blocks(path: str, dblock: int, count: int, bs: int = 4096) -> bytes:
    with open(path, "rb") as f:
        f.seek(dblock * bs)
        return f.read(count * bs)


def scribble(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a closed image (damage, torn writes)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
