"""Writeback, delalloc and the flusher on a Volume over an image file, without a mount:
routing, the paths' results, the end of every writeback (cancellation included), the
reservation invariant, and throttling on the page cache's room event."""
from __future__ import annotations

import errno
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
import trio
import trio.testing

from atomicfs.journal import LogFailed
from atomicfs.metadata import Inode
from atomicfs.options import MountOptions, parse_mount_options
from atomicfs.pagecache import IOKind, Mapping
from atomicfs.volume import Volume
from atomicfs.writeback import Route
from tests.fs.helpers import make_image

UNIT = 16 << 10


@asynccontextmanager
async def volume(tmp_path: Path, opts: MountOptions | None = None,
                 clean: bool = True) -> AsyncIterator[Volume]:
    vol = Volume.open(make_image(str(tmp_path / "fs.img")), opts or MountOptions())
    vol.delalloc.debug = True  # the reservation invariant after every change
    try:
        async with trio.open_nursery() as nursery:
            await vol.start(nursery)
            yield vol
            vol.delalloc.check()
            assert await vol.shutdown() == clean
            vol.delalloc.check()
            nursery.cancel_scope.cancel()
    finally:
        vol.close()


def new_file(vol: Volume, unit: int = 0) -> tuple[Inode, Mapping]:
    inode = vol.md.new_inode(0o100644, 0, 0, 0)
    if unit:
        inode.atomic_unit = unit
    return inode, vol.mapping(inode)


async def test_routes(tmp_path: Path) -> None:
    async with volume(tmp_path) as vol:
        inode, m = new_file(vol)
        await vol.filemap.write(inode, m, 0, b"p" * 8192)
        folio = m.folios[0]
        assert vol.wb.route(m, folio) is Route.IN_PLACE
        assert vol.wb.route(m, folio, small=True) is Route.LOG  # a small sync append
        ai, am = new_file(vol, UNIT)
        await vol.filemap.write(ai, am, 0, b"a" * UNIT)
        unit = am.folios[0]
        assert unit.atomic
        assert vol.wb.route(am, unit) is Route.LOG  # no RWF_ATOMIC on an image file
        await vol.filemap.write(ai, am, UNIT, b"g" * 2 * UNIT)  # a write group
        assert vol.wb.route(am, am.folios[1]) is Route.GROUP
        await vol.wb.sync_all()


async def test_in_place_writeback_converts_reservations(tmp_path: Path) -> None:
    async with volume(tmp_path) as vol:
        inode, m = new_file(vol)
        await vol.filemap.write(inode, m, 0, b"x" * 40960)
        assert vol.alloc._reserved == 10 and inode.extents.mapped_blocks == 0  # type: ignore[union-attr]
        ios = vol.counters.writeback_ios
        out = await vol.wb.write_folios(inode, m, [(f, f.dirty) for f in m.dirty.values()])
        assert not out.failed and not m.dirty and not m.busy
        assert vol.alloc._reserved == 0 and inode.extents.mapped_blocks == 10  # type: ignore[union-attr]
        assert vol.counters.writeback_ios == ios + 1  # one merged device write
        assert bytes(await vol.filemap.read(inode, m, 0, 40960)) == b"x" * 40960


async def test_software_atomic_path_logs_the_unit(tmp_path: Path) -> None:
    async with volume(tmp_path) as vol:
        inode, m = new_file(vol, UNIT)
        await vol.filemap.write(inode, m, 0, b"u" * UNIT)
        await vol.wb.fsync(inode, datasync=True)
        folio = m.folios[0]
        assert not folio.dirty and folio.io is IOKind.NONE and folio.logged_seq > 0
        assert vol.journal.is_resident(inode.ino, 0)
        assert vol.counters.atomic_writebacks_software == 1
        # resident now: a later partial write goes into the log too, never in place
        await vol.filemap.write(inode, m, 100, b"v")
        assert vol.wb.route(m, folio) is Route.LOG
        await vol.checkpointer.checkpoint()
        assert not vol.journal.is_resident(inode.ino, 0) and folio.io is IOKind.NONE


async def test_write_through_holds_logged_folios_until_durable(tmp_path: Path) -> None:
    async with volume(tmp_path) as vol:
        inode, m = new_file(vol, UNIT)
        kinds: list[IOKind] = []
        commit = vol.journal.commit

        async def watching_commit(seq: int | None = None) -> None:
            kinds.append(m.folios[0].io)
            await commit(seq)

        vol.journal.commit = watching_commit  # type: ignore[method-assign]
        await vol.filemap.write(inode, m, 0, b"w" * UNIT, writethrough=True)
        assert kinds[0] is IOKind.LOG_HELD
        assert m.folios[0].io is IOKind.NONE and not m.stable


async def test_cancelled_writeback_ends_and_keeps_the_books(tmp_path: Path) -> None:
    """Cancelling a writeback never leaves a folio under I/O: the device write, once
    submitted, completes (its blocks and buffer are in use until then), and whatever the
    writeback had not finished is dirty again."""
    async with volume(tmp_path, parse_mount_options(["delay=300"])) as vol:
        inode, m = new_file(vol)
        await vol.filemap.write(inode, m, 0, b"c" * 8192)
        await vol.filemap.write(inode, m, 65536, b"d" * 4096)
        items = [(f, f.dirty) for f in m.dirty.values()]
        with trio.move_on_after(0.1):  # while the writes are in flight
            await vol.wb.write_folios(inode, m, items)
        assert not m.busy and all(f.io is IOKind.NONE for f, _ in items)
        vol.delalloc.check()
        vol.dev.set_delay(0)
        await vol.wb.sync_all()
        assert not m.dirty and vol.alloc._reserved == 0
        assert bytes(await vol.filemap.read(inode, m, 0, 8192)) == b"c" * 8192


async def test_an_error_between_start_and_end_makes_the_blocks_dirty_again(
        tmp_path: Path) -> None:
    async with volume(tmp_path) as vol:
        inode, m = new_file(vol)
        await vol.filemap.write(inode, m, 0, b"e" * 8192)
        folio = m.folios[0]

        async def broken(*args: object, **kwargs: object) -> int:
            raise RuntimeError("not a device error")

        vol.wb._device_write = broken  # type: ignore[method-assign]
        # one device write runs in the caller's task, several in a nursery (a group)
        with pytest.raises(Exception) as info:
            await vol.wb.write_folios(inode, m, [(folio, folio.dirty)])
        assert "not a device error" in repr(getattr(info.value, "exceptions", info.value))
        assert folio.io is IOKind.NONE and folio.dirty == 0b11 and folio.reserved == 0b11
        vol.delalloc.check()
        del vol.wb._device_write
        await vol.wb.sync_all()
        assert not folio.dirty


async def test_truncate_and_unlink_release_reservations(tmp_path: Path) -> None:
    async with volume(tmp_path) as vol:
        inode, m = new_file(vol)
        await vol.filemap.write(inode, m, 0, b"t" * 65536)
        assert vol.alloc._reserved == 16
        await vol.filemap.truncate(inode, m, 10000)
        assert vol.alloc._reserved == 3
        await vol.filemap.drop_inode(inode)
        assert vol.alloc._reserved == 0 and inode.ino not in vol.cache.mappings


async def test_throttled_writer_waits_for_room_not_a_timer(tmp_path: Path) -> None:
    opts = MountOptions(cache_size=1 << 20, dirty_expire=3600)
    async with volume(tmp_path, opts) as vol:
        inode, m = new_file(vol)
        fl = vol.flusher
        fl.kick_flusher = lambda: None  # type: ignore[method-assign]  # we write back
        await vol.filemap.write(inode, m, 0, b"d" * (fl.dirty_limit + 65536))
        assert fl._over_dirty_limit()
        done = trio.Event()

        async def writer() -> None:
            await vol.filemap.write(inode, m, 4 << 20, b"e" * 4096)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set() and vol.counters.throttle_waits >= 1
            await vol.wb.writeback_mapping(inode, m, wait=True)  # ends writeback: room
            with trio.fail_after(5):
                await done.wait()


@pytest.mark.daemon_log(allow=[r"the log cannot be written.*: \[Errno 5\] test$"])
async def test_a_failed_log_fails_throttled_writers(tmp_path: Path) -> None:
    opts = MountOptions(cache_size=1 << 20, dirty_expire=3600)
    async with volume(tmp_path, opts, clean=False) as vol:
        inode, m = new_file(vol)
        await vol.filemap.write(inode, m, 0, b"d" * (vol.flusher.dirty_limit + 65536))
        vol.flusher.kick_flusher = lambda: None  # type: ignore[method-assign]
        failed: list[int] = []

        async def writer() -> None:
            try:
                await vol.filemap.write(inode, m, 4 << 20, b"e" * 4096)
            except OSError as exc:
                failed.append(exc.errno or 0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            vol.journal.fail(LogFailed(errno.EIO, "test"))
            await vol.flusher.flush_some()  # finds the log failed: wakes them
        assert failed == [errno.EIO]
        with pytest.raises(LogFailed):
            await vol.journal.commit()
        await vol.filemap.drop_inode(inode)  # nothing can be written: forget it
