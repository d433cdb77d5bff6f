"""The previous checkpoint as a fallback, through a Volume: blocks its files map are not
handed out again while it is the fallback, so falling back never shows a file holding
another file's data."""
from __future__ import annotations

import errno
import hashlib
import os
import random

import pyfuse3
import pytest

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
            await vol.wb.checkpoint()
        assert (vol.alloc.held_blocks == 0) == (cycles == 2)
