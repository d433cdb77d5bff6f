"""The previous checkpoint as a fallback, through a Volume: blocks its files map are not
handed out again while it is the fallback, so falling back never shows a file holding
another file's data."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import struct

import pyfuse3
import pytest

from atomicfs import format as fmt
from atomicfs.fsck import fsck
from atomicfs.native import crc32c
from atomicfs.options import MountOptions
from tests.fs import damage
from tests.fs.helpers import ROOT, Driver, open_fs

MiB = 1 << 20


def chunk(tag: str, i: int) -> bytes:
    seed = hashlib.sha256(f"{tag}{i}".encode()).digest()
    return seed * (MiB // len(seed))


async def _fill(d: Driver, name: str) -> int:
    """Write 1 MiB chunks into name until ENOSPC; returns how many went in whole."""
    fh = (await d.fs.create(ROOT, name.encode(), 0o644, os.O_RDWR, d.ctx))[0].fh
    n = 0
    try:
        while True:
            try:
                await d.fs.write(fh, n * MiB, chunk(name, n))
                await d.fs.fsync(fh, False)
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.ENOSPC
                return n
            n += 1
            assert n < 200
    finally:
        await d.fs.release(fh)


@pytest.mark.daemon_log(allow=[r"the newest metadata snapshot is damaged \(metadata snapshot "
                               r"checksum mismatch\); mounted the previous checkpoint"])
async def test_blocks_of_the_fallback_are_not_reused(fs_image: str) -> None:
    """Delete a file after a checkpoint and fill the filesystem: its blocks may only be
    reused once the fallback no longer maps it. Then damage the newest snapshot: in the
    checkpoint mounted instead, every file holds its own data."""
    async with open_fs(fs_image) as d:
        await d.create("keep", chunk("keep", 0))
        await d.create("doomed", b"".join(chunk("doomed", i) for i in range(8)))
    async with open_fs(fs_image) as d:
        await d.unlink("doomed")
        for inode in [i for i in d.fs.md.inodes.values() if i.nlink == 0]:
            await d.fs.forget([(inode.ino, inode.lookups)])
        filled = await _fill(d, "filler")
        assert filled >= 8  # doomed's blocks were needed, and became free
    assert fsck(fs_image).clean  # no file maps a block a kept checkpoint gave another
    damage.damage_snapshot(fs_image, random.Random(1), recompute=False, nbits=32)
    async with open_fs(fs_image, MountOptions(ro=True)) as d:
        rec = d.fs.vol.recovered
        assert rec is not None and rec.fallback
        assert await d.read("keep") == chunk("keep", 0)
        names = await d.listdir("")
        if b"doomed" in names:
            assert await d.read("doomed") == b"".join(chunk("doomed", i) for i in range(8))
        if b"filler" in names:
            data = await d.read("filler")
            for i in range(len(data) // MiB):
                assert data[i * MiB: (i + 1) * MiB] == chunk("filler", i), i


@pytest.mark.parametrize("cycles", [1, 2])
async def test_held_blocks_return_after_two_checkpoints(fs_image: str, cycles: int) -> None:
    """The space of a deleted file comes back once a checkpoint that no longer maps it
    is the fallback: after two checkpoints, not after one."""
    async with open_fs(fs_image) as d:
        await d.create("f", b"".join(chunk("f", i) for i in range(4)))
    async with open_fs(fs_image) as d:
        vol = d.fs.vol
        await d.unlink("f")
        for inode in [i for i in d.fs.md.inodes.values() if i.nlink == 0]:
            await d.fs.forget([(inode.ino, inode.lookups)])
        await vol.journal.commit()
        assert vol.alloc.held_blocks >= 4 * MiB // vol.bs
        for _ in range(cycles):
            await vol.checkpointer.checkpoint()
        assert (vol.alloc.held_blocks == 0) == (cycles == 2)


def _write_old_layout(path: str) -> None:
    """Rewrite both superblock slots in the layout of images made before the previous
    checkpoint was named (shorter, no prev_* fields)."""
    for sb in damage.slots(path):
        assert sb is not None
        body = sb.pack()[: fmt.SB_SIZE_OLD]
        body = body[:12] + struct.pack("<I", fmt.SB_SIZE_OLD) + body[16:]
        raw = body + struct.pack("<I", crc32c(body))
        damage.write_at(path, (sb.seq % fmt.SB_SLOTS) * sb.block_size,
                        raw + bytes(fmt.MIN_BLOCK_SIZE - len(raw)))


async def test_an_image_of_the_older_superblock_layout_mounts(fs_image: str) -> None:
    async with open_fs(fs_image) as d:
        await d.create("before", b"old layout")
    _write_old_layout(fs_image)
    assert all(s is not None and not s.prev_snap_block for s in damage.slots(fs_image))
    assert fsck(fs_image).clean
    async with open_fs(fs_image) as d:
        assert await d.read("before") == b"old layout"
        await d.create("after", b"new layout")
    assert damage.newest(fs_image).prev_snap_block  # its checkpoints name the previous one
    async with open_fs(fs_image) as d:
        assert await d.read("after") == b"new layout"
    assert fsck(fs_image).clean
