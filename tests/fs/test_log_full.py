"""A full log never stops the filesystem (issue 17: fsync waited forever with the log 95% full).

Driven through the Operations object on a real image with a small log (8 MiB), software
path, many resident atomic units. Each test bounds its run with a generous timeout: a hang
fails it, nothing asserts a time."""
from __future__ import annotations

import os
from pathlib import Path

import trio

from atomicfs import format as fmt
from atomicfs.fs import AtomicFS
from atomicfs.journal import Journal
from atomicfs.mkfs import mkfs
from atomicfs.options import parse_mount_options
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


async def _wait_until(cond: object, what: str) -> None:
    with trio.fail_after(HANG):
        while not cond():  # type: ignore[operator]
            await trio.sleep(0.005)


def _stuck_batch(j: Journal) -> bool:
    """The log writer waits for room: a batch is sealed but not placed."""
    return bool(j._sealed) and j._sealed[-1].pos < 0


async def test_checkpoint_completes_when_its_batches_do_not_fit_in_the_log(
        tmp_path: Path) -> None:
    """The log is at its limit with a batch waiting for room and a full pending batch; the
    checkpoint's own batches do not fit even in the reserve (the pending batch grew by
    metadata records). Before the fix the checkpoint waited for log space that only it
    could free, and every fsync with it, forever. Now it writes those batches home."""
    img = str(tmp_path / "fs.img")
    mkfs(img, size=64 * MiB)  # an 8 MiB log
    opts = parse_mount_options(["atomic_path=software"])
    async with open_fs(img, opts) as d:
        fs, vol = d.fs, d.fs.vol
        j = vol.journal
        assert await d.mkdir("/db")
        await d.setxattr("/db", "user.atomicfs.atomic_unit", str(UNIT).encode())
        fa, fb = await _open(fs, b"a"), await _open(fs, b"b")
        for fh in (fa, fb):
            await fs.write(fh, 0, _pattern(0, 4 * MiB))
            await fs.fsync(fh, False)
        await vol.wb.checkpoint()
        expect = {fa: bytearray(_pattern(0, 4 * MiB)), fb: bytearray(_pattern(0, 4 * MiB))}
        done: list[str] = []

        async def fill() -> None:
            """fsyncs of 1 MiB of whole units each: one ~1 MiB log batch apiece."""
            for i in range(1, 40):
                off = (i % 4) * MiB
                data = _pattern(i, MiB)
                await fs.write(fa, off, data)
                expect[fa][off: off + MiB] = data
                await fs.fsync(fa, False)
            done.append("fill")

        async def pending() -> None:
            data = _pattern(99, MiB + MiB // 4)
            await fs.write(fb, 0, data)
            expect[fb][: len(data)] = data
            await fs.fsync(fb, False)
            done.append("pending")

        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:
                async with vol.wb._ckpt_lock:  # no checkpoint until the log is full
                    nursery.start_soon(fill)
                    await _wait_until(lambda: _stuck_batch(j), "the writer waits for room")
                    nursery.start_soon(pending)
                    await _wait_until(lambda: j._pending.size > j.max_batch - 2 * UNIT,
                                      "a full pending batch")
                    # How much the checkpoint's batches may take, then make the boundary
                    # batch larger than that by metadata records of one inode (what the
                    # dirty inodes flushed at the seal add in real runs).
                    stuck = j._sealed[-1]
                    size = fmt.header_area_size(len(stuck.meta), j.bs) + stuck.payload_bytes
                    waste = j.log_size - j.head_pos if j.head_pos + size > j.log_size else 0
                    room = j.log_size - j.bs - (j.used + waste + size)
                    inode = vol.md.inodes[fs.handles[fa].inode.ino]
                    rec = len(fmt.rec_inode(inode.record_fields()))
                    for _ in range((room - j._pending.size) // rec + 64):
                        vol.md.log_inode(inode)
                    assert j._pending.size > room
                # the checkpointer (woken by the full log) or this call does it
                await vol.wb.checkpoint()
        assert sorted(done) == ["fill", "pending"]
        assert vol.counters.checkpoint_absorbed >= 1, "the scenario did not arise"
        for fh, data in expect.items():
            assert bytes(await fs.read(fh, 0, 4 * MiB)) == bytes(data)
            await fs.release(fh)
    # Everything fsynced is there after a remount (replay of whatever the log holds).
    async with open_fs(img, opts) as d:
        assert await d.read("/db/a") == bytes(expect[fa])
        assert await d.read("/db/b") == bytes(expect[fb])


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
        await vol.wb.checkpoint()  # by someone else
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
            rnd = __import__("random").Random(k)
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
            rnd = __import__("random").Random(99)
            while vol.counters.log_bytes < 6 * vol.journal.log_size:
                await trio.sleep(rnd.random() * 0.3)
                await vol.wb.checkpoint()

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
