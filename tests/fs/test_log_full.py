"""A full log never stops the filesystem (issue 17: fsync waited forever with the log 95% full).

Driven through the Operations object on a real image with a small log (8 MiB), software
path, many resident atomic units. Each test bounds its run with a generous timeout: a hang
fails it, nothing asserts a time."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Awaitable, Callable

import pyfuse3
import pytest
import trio

from atomicfs import format as fmt
from atomicfs.device import parse_inject
from atomicfs.errors import DeviceError
from atomicfs.fs import AtomicFS
from atomicfs.journal import Journal
from atomicfs.mkfs import mkfs
from atomicfs.options import parse_mount_options
from atomicfs.volume import Volume
from tests.fs.helpers import Ctx, open_fs

UNIT = 16 << 10
MiB = 1 << 20
HANG = 60  # seconds: far beyond any legitimate wait here


async def _open(fs: AtomicFS, name: bytes) -> int:
    fi, _ = await fs.create(2, name, 0o644, os.O_RDWR, Ctx())  # in /db (inode 2)
    return fi.fh


def _pattern(tag: int, size: int) -> bytes:
    block = bytes([tag % 251 + 1]) * UNIT
    return block * (size // UNIT)


async def _wait_until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(HANG):
        while not cond():
            await trio.sleep(0.005)


def _stuck_batch(j: Journal) -> bool:
    """The log writer waits for room: a batch is sealed but not placed."""
    return bool(j._sealed) and j._sealed[-1].pos < 0


async def _fill_past_the_reserve(fs: AtomicFS, vol: Volume, fa: int, fb: int,
                                 acked: dict[int, bytearray], *, fail_super: bool) -> None:
    """Bring the log to where a checkpoint's batches cannot fit: the writer waits for
    room with one batch, the pending batch is full, and metadata records (as dirty inodes
    flushed at the seal add in real runs) make it larger than what is left. Then let the
    checkpoint run (its superblock write failing if fail_super). acked gets each file's
    content as of its last successful fsync."""
    j = vol.journal
    data_of = {fa: bytearray(acked[fa]), fb: bytearray(acked[fb])}

    async def sync(fh: int) -> None:
        try:
            await fs.fsync(fh, False)
        except pyfuse3.FUSEError:
            assert fail_super
            raise
        acked[fh][:] = data_of[fh]

    async def fill() -> None:
        """fsyncs of 1 MiB of whole units each: one ~1 MiB log batch apiece."""
        for i in range(1, 40):
            off = (i % 4) * MiB
            data = _pattern(i, MiB)
            await fs.write(fa, off, data)
            data_of[fa][off: off + MiB] = data
            await sync(fa)

    async def pending() -> None:
        data = _pattern(99, MiB + MiB // 4)
        await fs.write(fb, 0, data)
        data_of[fb][: len(data)] = data
        await sync(fb)

    async def guarded(fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except pyfuse3.FUSEError:
            pass  # the log failed with the checkpoint (fail_super): asserted in sync

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            async with vol.checkpointer._lock:  # no checkpoint until the log is full
                nursery.start_soon(guarded, fill)
                await _wait_until(lambda: _stuck_batch(j))
                nursery.start_soon(guarded, pending)
                await _wait_until(lambda: j._pending.size > j.max_batch - 2 * UNIT)
                stuck = j._sealed[-1]
                size = fmt.header_area_size(len(stuck.meta), j.bs) + stuck.payload_bytes
                waste = j.log_size - j.head_pos if j.head_pos + size > j.log_size else 0
                room = j.log_size - j.bs - (j.used + waste + size)
                inode = fs.handles[fa].inode
                rec = len(fmt.rec_inode(inode.record_fields()))
                for _ in range(max(0, room - j._pending.size) // rec + 64):
                    vol.md.log_inode(inode)
                assert j._pending.size > room
                if fail_super:
                    vol.dev.set_inject(parse_inject("super"))
            # the checkpointer (woken by the full log) or this call does it
            try:
                await vol.checkpointer.checkpoint()
            except DeviceError:
                assert fail_super
    assert vol.counters.checkpoint_absorbed >= 1, "the scenario did not arise"


async def _setup(fs: AtomicFS, vol: Volume) -> tuple[int, int, dict[int, bytearray]]:
    assert await fs.mkdir(1, b"db", 0o755, Ctx())
    await fs.setxattr(2, b"user.atomicfs.atomic_unit", str(UNIT).encode(), Ctx())
    fa, fb = await _open(fs, b"a"), await _open(fs, b"b")
    for fh in (fa, fb):
        await fs.write(fh, 0, _pattern(0, 4 * MiB))
        await fs.fsync(fh, False)
    await vol.checkpointer.checkpoint()
    return fa, fb, {fa: bytearray(_pattern(0, 4 * MiB)), fb: bytearray(_pattern(0, 4 * MiB))}


async def test_checkpoint_completes_when_its_batches_do_not_fit_in_the_log(
        tmp_path: Path) -> None:
    """Before the fix the checkpoint waited for log space that only it could free, and
    every fsync with it, forever. Now it takes those batches out of place."""
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 * MiB)  # an 8 MiB log
    opts = parse_mount_options(["atomic_path=software"])
    async with open_fs(img, opts) as d:
        fs, vol = d.fs, d.fs.vol
        fa, fb, acked = await _setup(fs, vol)
        await _fill_past_the_reserve(fs, vol, fa, fb, acked, fail_super=False)
        for fh, data in acked.items():
            assert bytes(await fs.read(fh, 0, 4 * MiB)) == bytes(data)
            await fs.release(fh)
    # Everything fsynced is there after a remount (replay of whatever the log holds).
    async with open_fs(img, opts) as d:
        assert await d.read("/db/a") == bytes(acked[fa])
        assert await d.read("/db/b") == bytes(acked[fb])


@pytest.mark.daemon_log(allow=[r"super write at \d+ failed: Input/output error"])
async def test_absorbed_batches_touch_no_home_before_the_checkpoint_is_durable(
        tmp_path: Path) -> None:
    """The superblock write of the absorbing checkpoint fails (as a crash before it would
    leave the disk): the filesystem stops, and on the next mount every unit reads as its
    last fsync left it: the absorbed writes went to new blocks, no home was touched."""
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 * MiB)
    opts = parse_mount_options(["atomic_path=software"])
    vol = Volume.open(img, opts)
    try:
        async with trio.open_nursery() as nursery:
            await vol.start(nursery)
            fs = AtomicFS(vol)
            fa, fb, acked = await _setup(fs, vol)
            await _fill_past_the_reserve(fs, vol, fa, fb, acked, fail_super=True)
            assert vol.journal.failed is not None
            nursery.cancel_scope.cancel()
    finally:
        vol.close()
    async with open_fs(img, parse_mount_options(["atomic_path=software"])) as d:
        assert await d.read("/db/a") == bytes(acked[fa])
        assert await d.read("/db/b") == bytes(acked[fb])


async def test_checkpointer_hears_requests_after_a_checkpoint_by_someone_else(
        tmp_path: Path) -> None:
    """A checkpoint run by another task (start-up recovery, the sync control, umount)
    replaced the event the checkpointer was waiting on, so it stayed deaf to a full log
    until its 30 s timer: long enough for PostgreSQL to fill the log (issue 17)."""
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 * MiB)
    async with open_fs(img, parse_mount_options(["atomic_path=software"])) as d:
        vol = d.fs.vol
        await d.create("/f", b"x" * 4096)
        await trio.sleep(0.1)  # the checkpointer waits for a request now
        await vol.checkpointer.checkpoint()  # by someone else
        before = vol.counters.checkpoints
        await d.create("/g", b"y" * 4096)
        vol.journal.request_checkpoint()
        with trio.fail_after(10):  # the checkpointer's timer is 30 s
            while vol.counters.checkpoints == before:
                await trio.sleep(0.01)


async def test_log_filled_again_and_again_by_concurrent_fsyncs_and_checkpoints(
        tmp_path: Path) -> None:
    """Four writers of random 8 KiB units with fsyncs, checkpoints at random moments, a
    slow device, an 8 MiB log that fills many times over: every fsync returns, and the
    data is all there after a remount."""
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 * MiB)
    opts = parse_mount_options(["atomic_path=software", "delay=1"])
    size = 2 * MiB
    expect: dict[bytes, bytearray] = {}
    async with open_fs(img, opts) as d:
        fs, vol = d.fs, d.fs.vol
        assert await d.mkdir("/db")
        await d.setxattr("/db", "user.atomicfs.atomic_unit", b"8192")
        rounds = [0]

        async def writer(k: int) -> None:
            name = b"f%d" % k
            fh = await _open(fs, name)
            data = expect[name] = bytearray(os.urandom(size))
            await fs.write(fh, 0, bytes(data))
            await fs.fsync(fh, False)
            rnd = random.Random(k)
            while vol.counters.log_bytes < 6 * vol.journal.log_size:
                for _ in range(rnd.randint(1, 40)):
                    off = rnd.randrange(size // 8192) * 8192
                    page = os.urandom(8192)
                    await fs.write(fh, off, page)
                    data[off: off + 8192] = page
                await fs.fsync(fh, rnd.random() < 0.5)
                rounds[0] += 1
            await fs.release(fh)

        async def checkpoints() -> None:
            rnd = random.Random(99)
            while vol.counters.log_bytes < 6 * vol.journal.log_size:
                await trio.sleep(rnd.random() * 0.3)
                await vol.checkpointer.checkpoint()

        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for k in range(4):
                    nursery.start_soon(writer, k)
                nursery.start_soon(checkpoints)
        assert vol.counters.log_bytes >= 6 * vol.journal.log_size
        assert rounds[0] > 0
    async with open_fs(img, opts) as d:
        for name, data in expect.items():
            assert await d.read("/db/" + name.decode()) == bytes(data)
