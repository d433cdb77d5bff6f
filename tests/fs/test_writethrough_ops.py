"""Write-through in the daemon itself, driving the Operations object (no mount): what the
kernel's inode lock hides on a real mount (it serialises write(2) calls to one file)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio

from atomicfs.fs import AtomicFS
from atomicfs.mkfs import mkfs
from atomicfs.options import parse_mount_options
from atomicfs.volume import Volume


class Ctx:
    """Stands in for pyfuse3.RequestContext, which Python cannot construct."""

    uid = 0
    gid = 0
    pid = 0
    umask = 0o022


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[AtomicFS]:
    img = str(tmp_path / "fs.img")
    mkfs(img, size=128 << 20)
    vol = Volume.open(img, parse_mount_options(["delay=200"]))
    try:
        async with trio.open_nursery() as nursery:
            await vol.start(nursery)
            yield AtomicFS(vol)
            await vol.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        vol.close()


async def _make_file(fs: AtomicFS, name: bytes, size: int) -> int:
    fi, attr = await fs.create(1, name, 0o644, os.O_RDWR, Ctx())
    await fs.write(fi.fh, 0, b"\0" * size)
    await fs.fsync(fi.fh, False)
    await fs.release(fi.fh)
    return attr.st_ino


async def test_writethroughs_to_different_folios_of_one_file_overlap(ops: AtomicFS) -> None:
    """Two write-throughs to different folios of one file, on a device where each write
    takes 200 ms, finish together (~200 ms), not one after the other (400 ms)."""
    ino = await _make_file(ops, b"f", 1 << 20)  # homes exist: the writes go in place
    await ops.vol.checkpointer.checkpoint()  # nothing resident in the log
    fh = (await ops.open(ino, os.O_RDWR | os.O_DSYNC, Ctx())).fh
    m = ops.vol.cache.mappings[ino]
    seen_inflight = []

    async def write_at(off: int) -> None:
        await ops.write(fh, off, b"x" * 4096)

    async def watch() -> None:
        await trio.sleep(0.1)
        seen_inflight.append(m.wt_inflight)

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_at, 0)
        nursery.start_soon(write_at, 512 << 10)
        nursery.start_soon(watch)
    elapsed = time.monotonic() - t0
    assert seen_inflight == [2]  # both in flight at once; the mapping was stable
    assert m.wt_inflight == 0 and not m.stable
    assert elapsed < 0.35, f"write-throughs to two folios did not overlap ({elapsed:.2f}s)"
    assert ops.vol.counters.writethrough_writes == 2


async def test_writer_waits_for_folio_under_writethrough_then_wins(ops: AtomicFS) -> None:
    """A buffered write to a folio under write-through waits (stable pages) until the
    device write is over (200 ms here), then modifies the folio: its data wins."""
    ino = await _make_file(ops, b"g", 256 << 10)
    await ops.vol.checkpointer.checkpoint()
    wt = (await ops.open(ino, os.O_RDWR | os.O_DSYNC, Ctx())).fh
    plain = (await ops.open(ino, os.O_RDWR, Ctx())).fh
    done: dict[str, float] = {}
    t0 = time.monotonic()

    async def writethrough() -> None:
        await ops.write(wt, 0, b"A" * 4096)
        done["A"] = time.monotonic() - t0

    async def buffered() -> None:
        await trio.sleep(0.05)  # A is in flight now
        await ops.write(plain, 0, b"B" * 4096)
        done["B"] = time.monotonic() - t0

    before = ops.vol.counters.stable_waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writethrough)
        nursery.start_soon(buffered)
    assert done["B"] >= 0.18, "B changed the folio while A's device write was in flight"
    assert ops.vol.counters.stable_waits == before + 1
    assert ops.vol.counters.stable_wait_ns > 0.1e9
    data = await ops.read(plain, 0, 4096)
    assert bytes(data) == b"B" * 4096


async def test_writer_does_not_wait_for_plain_background_writeback(ops: AtomicFS) -> None:
    """Without write-throughs in flight the mapping is not stable: a writer to a folio
    under ordinary background writeback does not wait; the folio is simply dirty again."""
    ino = await _make_file(ops, b"h", 1 << 20)
    await ops.vol.checkpointer.checkpoint()
    fh = (await ops.open(ino, os.O_RDWR, Ctx())).fh
    await ops.write(fh, 0, b"1" * (512 << 10))  # more than a small sync write: in place
    inode = ops.md.inodes[ino]
    m = ops.vol.cache.mappings[ino]
    t0 = time.monotonic()
    done: dict[str, float] = {}

    async def background() -> None:
        await ops.vol.wb.writeback_mapping(inode, m, wait=False)

    async def writer() -> None:
        await trio.sleep(0.05)  # the background writeback is in flight
        assert m.busy, "expected writeback in flight"
        await ops.write(fh, 0, b"2" * 4096)
        done["write"] = time.monotonic() - t0

    before = ops.vol.counters.stable_waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(background)
        nursery.start_soon(writer)
    assert done["write"] < 0.15
    assert ops.vol.counters.stable_waits == before
    assert m.folios[0].dirty & 1  # dirty again: written later
    data = await ops.read(fh, 0, 4096)
    assert bytes(data) == b"2" * 4096
