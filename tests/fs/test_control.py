"""The user.atomicfs.* attributes (control.py) and the Volume facade they and fs.py use,
driven through the Operations object without a mount."""
from __future__ import annotations

import errno
import json
import os

import pytest

from atomicfs.control import InjectedDaemonFault
from atomicfs.options import MountOptions
from tests.fs.helpers import Driver, expect_errno, open_fs

UNIT = 16384


@pytest.mark.daemon_log(allow=[r"^control inject refused: a test knob, for root on mounts started"])
async def test_commands_on_the_root(drv: Driver) -> None:
    await drv.create("f", os.urandom(3 * UNIT))
    for cmd in (b"sync", b"checkpoint", b"commit", b"flush", b"drop_caches"):
        await drv.setxattr("", "user.atomicfs.control", cmd)
    assert await drv.read("f", UNIT, 10) != b""
    for bad in (b"sync=1", b"nonsense", b"inject=data"):
        code = errno.EPERM if bad.startswith(b"inject") else errno.EINVAL
        await expect_errno(code, drv.setxattr("", "user.atomicfs.control", bad))
    drv.ctx.uid = 1000  # neither root nor the mount's owner nor the root's owner
    await expect_errno(errno.EPERM, drv.setxattr("", "user.atomicfs.control", b"sync"))


@pytest.mark.daemon_log(allow=[r"^control (fault|delay) refused: (fault|delay) must be ",
                               r"^getattr failed unexpectedly; the request gets EIO$"])
async def test_test_knobs_need_the_testing_option(fs_image: str) -> None:
    async with open_fs(fs_image, MountOptions(testing=True)) as d:
        await expect_errno(errno.EINVAL, d.setxattr("", "user.atomicfs.control", b"fault=x"))
        await expect_errno(errno.EINVAL, d.setxattr("", "user.atomicfs.control",
                                                    b"delay=nonsense"))
        await d.setxattr("", "user.atomicfs.control", b"fault=request")
        await expect_errno(errno.EIO, d.attr(""))  # the next request fails, once
        await d.attr("")
        # fault=daemon is the one exception the Operations let through to pyfuse3
        with pytest.raises(InjectedDaemonFault):
            await d.setxattr("", "user.atomicfs.control", b"fault=daemon")


async def test_stat_and_limits(drv: Driver) -> None:
    await drv.mkdir("db")
    await drv.setxattr("db", "user.atomicfs.atomic_unit", b"16k")
    await drv.setxattr("db", "user.atomicfs.atomic_strict", b"1")
    await drv.create("db/page", os.urandom(UNIT))
    await drv.create("plain", b"x")
    assert await drv.getxattr("db/page", "user.atomicfs.limits") == \
        f"{UNIT} 1048576 1 {UNIT}\n".encode()
    assert await drv.getxattr("plain", "user.atomicfs.limits") == b"4096 1048576 1 0\n"
    await expect_errno(errno.ENODATA, drv.getxattr("db", "user.atomicfs.limits"))
    page = json.loads(await drv.getxattr("db/page", "user.atomicfs.stat"))
    assert page["atomic_unit"] == UNIT and page["atomic_strict"] is True
    root = json.loads(await drv.getxattr("", "user.atomicfs.stat"))
    assert root["pid"] == os.getpid() and root["file"]["ino"] == 1
    drv.ctx.uid = 1000  # the root's statistics name the image: root and the owner only
    await expect_errno(errno.EACCES, drv.getxattr("", "user.atomicfs.stat"))
    assert json.loads(await drv.getxattr("plain", "user.atomicfs.stat"))["size"] == 1


async def test_o_dsync_handle_shows_in_the_file_stat(drv: Driver) -> None:
    await drv.create("f")
    assert json.loads(await drv.getxattr("f", "user.atomicfs.stat"))["writethrough"] is False
    fh = await drv.open("f", os.O_RDWR | os.O_DSYNC)
    st = json.loads(await drv.getxattr("f", "user.atomicfs.stat"))
    assert st["writethrough"] is True and st["writethrough_mode"] == "durable"
    await drv.fs.release(fh)


async def test_announcements(drv: Driver) -> None:
    await drv.create("f")
    counters = drv.fs.vol.counters
    fh = await drv.open("f")
    ctl = "user.atomicfs.control"
    await drv.setxattr("f", ctl, b"write_begin=t1:0:16384:ad")
    before = counters.atomic_writes_announced
    assert await drv.fs.write(fh, 0, os.urandom(UNIT)) == UNIT
    assert counters.atomic_writes_announced == before + 1
    await drv.fs.write(fh, UNIT, os.urandom(UNIT))  # another range: not announced
    assert counters.atomic_writes_announced == before + 1
    await drv.setxattr("f", ctl, b"write_end=t1")
    await expect_errno(errno.ENOENT, drv.setxattr("f", ctl, b"write_end=t1"))
    for bad in (b"write_begin=t2:0:12288:a", b"write_begin=t2:4096:8192:a",
                b"write_begin=t2:0:4096:x", b"write_begin=:0:4096:a"):
        await expect_errno(errno.EINVAL, drv.setxattr("f", ctl, bad))
    await drv.setxattr("f", ctl, b"write_begin=t3:*:4096:w")
    assert drv.fs.control.announced
    await drv.fs.release(fh)  # the last close drops what a dead writer left
    assert not drv.fs.control.announced


async def test_writeback_error_is_reported_once_per_descriptor(drv: Driver) -> None:
    await drv.create("f", b"data")
    before = await drv.open("f")
    inode = drv.fs.md.inodes[await drv.ino("f")]
    drv.fs.vol.mapping(inode).record_error()  # as a failed background writeback does
    unseen = await drv.open("f")  # opened after the error, before anybody saw it
    await expect_errno(errno.EIO, drv.fs.fsync(before, False))
    await drv.fs.fsync(before, False)  # reported once
    await expect_errno(errno.EIO, drv.fs.fsync(unseen, False))
    after = await drv.open("f")  # opened after the error was seen
    await drv.fs.fsync(after, False)
    for fh in (before, unseen, after):
        await drv.fs.release(fh)


async def test_opening_creates_no_mapping_and_errors_still_reach_earlier_opens(
        drv: Driver) -> None:
    # an empty file opened and closed (create, stat, unlink of many files) costs no
    # page-cache mapping; a descriptor opened before the mapping existed still sees a
    # writeback error recorded later, once
    await drv.create("f")
    ino = await drv.ino("f")
    fh = await drv.open("f")
    assert ino not in drv.fs.vol.cache.mappings
    inode = drv.fs.md.inodes[ino]
    drv.fs.vol.mapping(inode).record_error()
    await expect_errno(errno.EIO, drv.fs.fsync(fh, False))
    await drv.fs.fsync(fh, False)  # reported once
    await drv.fs.release(fh)


async def test_flush_is_left_to_the_kernel(drv: Driver) -> None:
    # ENOSYS: the kernel stops sending FLUSH at close (a round trip that did nothing)
    await drv.create("f")
    fh = await drv.open("f")
    await expect_errno(errno.ENOSYS, drv.fs.flush(fh))
    await drv.fs.release(fh)


async def test_a_failed_log_refuses_changes(drv: Driver) -> None:
    await drv.create("f", b"data")
    fh = await drv.open("f")
    journal = drv.fs.vol.journal
    journal.failed = OSError(errno.EIO, "test")
    try:
        await expect_errno(errno.EIO, drv.mkdir("d"))
        await expect_errno(errno.EIO, drv.fs.fsync(fh, False))
        await expect_errno(errno.EIO, drv.fs.write(fh, 0, b"x"))
        await expect_errno(errno.EIO, drv.setxattr("f", "user.k", b"v"))
        assert await drv.read("f") == b"data"  # reads go on
    finally:
        journal.failed = None
    await drv.fs.release(fh)
