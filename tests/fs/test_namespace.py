"""Namespace operations of AtomicFS driven directly (no mount): rules and errno values as
ext4 gives them."""
from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest

from atomicfs.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE
from tests.fs.helpers import ROOT, Driver, expect_errno, open_fs

LONG = "n" * 256
MAX = "m" * 255


async def test_mkdir_rmdir_link_counts(drv: Driver) -> None:
    assert (await drv.attr("")).st_nlink == 2
    a = await drv.mkdir("a")
    assert stat.S_ISDIR(a.st_mode) and a.st_nlink == 2
    await drv.mkdir("a/b")
    await drv.create("a/f")
    assert (await drv.attr("a")).st_nlink == 3  # ".", its name in /, "b/.."
    assert (await drv.attr("")).st_nlink == 3
    await expect_errno(errno.ENOTEMPTY, drv.rmdir("a"))
    await expect_errno(errno.ENOTDIR, drv.rmdir("a/f"))
    await expect_errno(errno.ENOENT, drv.rmdir("a/missing"))
    await expect_errno(errno.EEXIST, drv.mkdir("a/b"))
    await expect_errno(errno.EEXIST, drv.mkdir("a/f"))
    await expect_errno(errno.EISDIR, drv.unlink("a/b"))
    await drv.rmdir("a/b")
    await drv.unlink("a/f")
    assert (await drv.attr("a")).st_nlink == 2
    await drv.rmdir("a")
    assert (await drv.attr("")).st_nlink == 2
    await expect_errno(errno.ENOENT, drv.attr("a"))


async def test_operations_under_a_file_are_enotdir(drv: Driver) -> None:
    ino = await drv.create("f", b"x")
    fs, ctx = drv.fs, drv.ctx
    await expect_errno(errno.ENOTDIR, fs.lookup(ino, b"x", ctx))
    await expect_errno(errno.ENOTDIR, fs.mkdir(ino, b"x", 0o755, ctx))
    await expect_errno(errno.ENOTDIR, fs.create(ino, b"x", 0o644, os.O_RDWR, ctx))
    await expect_errno(errno.ENOTDIR, fs.opendir(ino, ctx))
    await expect_errno(errno.ENOTDIR, fs.unlink(ino, b"x", ctx))
    await expect_errno(errno.EISDIR, fs.open(ROOT, os.O_RDONLY, ctx))


async def test_create_existing_name(drv: Driver) -> None:
    await drv.create("f", b"data")
    await expect_errno(errno.EEXIST, drv.create("f"))
    assert await drv.read("f") == b"data"


async def test_names_of_255_bytes_work_and_256_fail(drv: Driver) -> None:
    await drv.create(MAX, b"x")
    await drv.mkdir("d" * 255)
    await drv.symlink("target", "s" * 255)
    await drv.link(MAX, "l" * 255)
    await drv.rename(MAX, "r" * 255)
    assert (await drv.attr("r" * 255)).st_nlink == 2
    assert sorted(len(n) for n in await drv.listdir("")) == [1, 2] + [255] * 4
    await drv.create("short")
    attempts = {
        "create": lambda: drv.create(LONG), "mkdir": lambda: drv.mkdir(LONG),
        "symlink": lambda: drv.symlink("t", LONG), "link": lambda: drv.link("short", LONG),
        "rename to": lambda: drv.rename("short", LONG),
        "rename from": lambda: drv.rename(LONG, "x"),
        "mknod": lambda: drv.mknod(LONG, stat.S_IFIFO | 0o644),
        "lookup": lambda: drv.attr(LONG), "unlink": lambda: drv.unlink(LONG),
        "rmdir": lambda: drv.rmdir(LONG),
    }
    for what, attempt in attempts.items():
        with pytest.raises(pyfuse3.FUSEError) as info:
            await attempt()
        assert info.value.errno == errno.ENAMETOOLONG, what
    assert len(await drv.listdir("")) == 7


async def test_hard_links(drv: Driver) -> None:
    ino = await drv.create("a", b"shared")
    await drv.mkdir("d")
    attr = await drv.link("a", "d/b")
    assert attr.st_ino == ino and attr.st_nlink == 2
    assert (await drv.attr("a")).st_nlink == 2
    assert await drv.read("d/b") == b"shared"
    await expect_errno(errno.EEXIST, drv.link("a", "d/b"))
    await expect_errno(errno.EPERM, drv.link("d", "d2"))
    await drv.unlink("a")
    assert (await drv.attr("d/b")).st_nlink == 1
    assert await drv.read("d/b") == b"shared"


async def test_unlinked_open_file_lives_until_released(drv: Driver) -> None:
    ino = await drv.create("f", b"still here")
    free_before = (await drv.fs.statfs(drv.ctx)).f_bfree
    fh = await drv.open("f")
    await drv.unlink("f")
    assert bytes(await drv.fs.read(fh, 0, 100)) == b"still here"
    assert (await drv.fs.getattr(ino, drv.ctx)).st_nlink == 0
    await drv.fs.release(fh)
    lookups = drv.fs.md.inodes[ino].lookups
    await drv.fs.forget([(ino, lookups)])
    assert ino not in drv.fs.md.inodes
    await drv.fs.vol.journal.commit()
    assert (await drv.fs.statfs(drv.ctx)).f_bfree >= free_before


async def test_symlink_and_readlink(drv: Driver) -> None:
    attr = await drv.symlink("../some/where", "s")
    assert stat.S_ISLNK(attr.st_mode) and attr.st_size == len("../some/where")
    assert await drv.fs.readlink(attr.st_ino, drv.ctx) == b"../some/where"
    ino = await drv.create("f")
    await expect_errno(errno.EINVAL, drv.fs.readlink(ino, drv.ctx))
    await drv.symlink("x" * 4095, "long")
    await expect_errno(errno.ENAMETOOLONG, drv.symlink("x" * 4096, "toolong"))
    await expect_errno(errno.EEXIST, drv.symlink("t", "f"))


async def test_mknod_types(drv: Driver) -> None:
    fifo = await drv.mknod("p", stat.S_IFIFO | 0o640)
    sock = await drv.mknod("s", stat.S_IFSOCK | 0o600)
    chr_ = await drv.mknod("c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
    assert stat.S_ISSOCK(sock.st_mode)
    assert stat.S_ISCHR(chr_.st_mode) and chr_.st_rdev == os.makedev(1, 3)
    assert fifo.st_rdev == 0
    await expect_errno(errno.EEXIST, drv.mknod("p", stat.S_IFIFO | 0o600))
    await expect_errno(errno.EINVAL, drv.mknod("bad", 0o110000 | 0o644))
    await expect_errno(errno.EINVAL, drv.mknod("dir", stat.S_IFDIR | 0o755))


async def test_truncate_down_and_up_reads_zeros(drv: Driver) -> None:
    data = os.urandom(3 * 65536 + 1234)
    await drv.create("f", data)
    await drv.setattr("f", st_size=5000)
    assert await drv.read("f") == data[:5000]
    await drv.setattr("f", st_size=200_000)
    got = await drv.read("f")
    assert len(got) == 200_000
    assert got[:5000] == data[:5000] and got[5000:] == bytes(195_000)
    await drv.fs.vol.wb.sync_all()  # the zeros must also be what reaches the device
    drv.fs.vol.drop_caches()
    assert await drv.read("f") == got
    await expect_errno(errno.EISDIR, drv.setattr("", st_size=0))
    await expect_errno(errno.EFBIG, drv.setattr("f", st_size=1 << 50))


async def test_sparse_file_and_offset_beyond_4gib(drv: Driver) -> None:
    off = (5 << 30) + 12345
    await drv.create("f")
    await drv.write("f", off, b"far away")
    attr = await drv.attr("f")
    assert attr.st_size == off + 8
    assert await drv.read("f", off - 10, 100) == bytes(10) + b"far away"
    assert await drv.read("f", 1 << 30, 8192) == bytes(8192)
    assert attr.st_blocks <= 2 * 4096 // 512


async def test_setattr_mode_owner_times(drv: Driver) -> None:
    await drv.create("f")
    before = await drv.attr("f")
    a = await drv.setattr("f", st_mode=stat.S_IFREG | 0o4711)
    assert a.st_mode == stat.S_IFREG | 0o4711
    assert a.st_ctime_ns >= before.st_ctime_ns
    a = await drv.setattr("f", st_uid=1234, st_gid=5678)
    assert (a.st_uid, a.st_gid) == (1234, 5678)
    a = await drv.setattr("f", st_atime_ns=1_000_000_123, st_mtime_ns=2_000_000_456)
    assert (a.st_atime_ns, a.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    # chmod of a directory never turns it into something else
    d = await drv.mkdir("d")
    a = await drv.setattr("d", st_mode=stat.S_IFREG | 0o700)
    assert a.st_mode == stat.S_IFDIR | 0o700 and a.st_ino == d.st_ino


async def test_setgid_directory_passes_its_group(drv: Driver) -> None:
    await drv.mkdir("g")
    await drv.setattr("g", st_gid=777, st_mode=stat.S_IFDIR | 0o2775)
    drv.ctx.gid = 100
    f = await drv.create("g/f")
    d = await drv.mkdir("g/sub")
    assert (await drv.fs.getattr(f, drv.ctx)).st_gid == 777
    assert d.st_gid == 777 and d.st_mode & stat.S_ISGID
    other = await drv.create("plain")
    assert (await drv.fs.getattr(other, drv.ctx)).st_gid == 100


# ---------------------------------------------------------------------------- rename

async def test_rename_file_over_file(drv: Driver) -> None:
    await drv.create("a", b"new")
    old = await drv.create("b", b"old")
    await drv.rename("a", "b")
    assert await drv.read("b") == b"new"
    await expect_errno(errno.ENOENT, drv.attr("a"))
    assert drv.fs.md.inodes[old].nlink == 0


async def test_rename_directory_rules(drv: Driver) -> None:
    for d in ("d1", "d1/sub", "d2", "empty", "full", "full/x"):
        await drv.mkdir(d)
    await drv.create("f")
    await expect_errno(errno.EISDIR, drv.rename("f", "empty"))
    await expect_errno(errno.ENOTDIR, drv.rename("d1", "f"))
    await expect_errno(errno.ENOTEMPTY, drv.rename("d2", "full"))
    await expect_errno(errno.EINVAL, drv.rename("d1", "d1/sub/inner"))
    await expect_errno(errno.EINVAL, drv.rename("d1", "d1/new"))
    await expect_errno(errno.ENOENT, drv.rename("missing", "x"))
    await drv.rename("d2", "empty")  # a directory replaces an empty directory
    assert (await drv.attr("")).st_nlink == 2 + 3  # d1, empty (was d2), full
    # moving a directory moves its ".." link
    await drv.rename("d1/sub", "full/sub")
    assert (await drv.attr("d1")).st_nlink == 2
    assert (await drv.attr("full")).st_nlink == 4
    sub = await drv.ino("full/sub")
    assert (await drv.fs.lookup(sub, b"..", drv.ctx)).st_ino == await drv.ino("full")


async def test_rename_noreplace(drv: Driver) -> None:
    await drv.create("a", b"a")
    await drv.create("b", b"b")
    await expect_errno(errno.EEXIST, drv.rename("a", "b", RENAME_NOREPLACE))
    assert await drv.read("b") == b"b"
    await drv.rename("a", "c", RENAME_NOREPLACE)
    assert await drv.read("c") == b"a"
    await expect_errno(errno.EINVAL, drv.rename("c", "d", RENAME_NOREPLACE | RENAME_EXCHANGE))


async def test_rename_exchange(drv: Driver) -> None:
    await drv.mkdir("p")
    await drv.mkdir("q")
    await drv.create("p/f", b"file")
    await drv.mkdir("q/d")
    await drv.create("q/d/inside", b"in")
    await drv.rename("p/f", "q/d", RENAME_EXCHANGE)
    assert await drv.read("q/d") == b"file"
    assert await drv.read("p/f/inside") == b"in"
    assert (await drv.attr("p")).st_nlink == 3 and (await drv.attr("q")).st_nlink == 2
    f_dir = await drv.ino("p/f")
    assert (await drv.fs.lookup(f_dir, b"..", drv.ctx)).st_ino == await drv.ino("p")
    await expect_errno(errno.ENOENT, drv.rename("p/f", "q/none", RENAME_EXCHANGE))
    await expect_errno(errno.EINVAL, drv.rename("p", "p/f/inside", RENAME_EXCHANGE))


async def test_rename_between_links_of_one_inode_changes_nothing(drv: Driver) -> None:
    await drv.create("a", b"x")
    await drv.link("a", "b")
    await drv.rename("a", "b")
    assert sorted(await drv.listdir("")) == [b".", b"..", b"a", b"b"]
    assert (await drv.attr("a")).st_nlink == 2


async def test_rename_to_same_name(drv: Driver) -> None:
    await drv.mkdir("d")
    await drv.rename("d", "d")
    assert (await drv.attr("d")).st_nlink == 2


# ---------------------------------------------------------------------------- readdir

async def test_readdir_large_directory_in_batches(drv: Driver) -> None:
    await drv.mkdir("big")
    names = {f"file-{i:05d}".encode() for i in range(3000)}
    for n in names:
        await drv.create("big/" + n.decode())
    listed = await drv.listdir("big", batch=97)
    assert len(listed) == len(set(listed)) == 3002
    assert set(listed) - {b".", b".."} == names


async def test_readdir_while_the_directory_changes(drv: Driver) -> None:
    """Names present throughout a listing appear exactly once, whatever else changes."""
    await drv.mkdir("d")
    for i in range(500):
        await drv.create(f"d/k{i:04d}")
    counter = [0]

    async def churn() -> None:
        counter[0] += 1
        await drv.create(f"d/new{counter[0]}")
        await drv.unlink(f"d/k{counter[0] * 7:04d}")

    listed = await drv.listdir("d", batch=50, between=churn)
    assert len(listed) == len(set(listed))
    stable = {f"k{i:04d}".encode() for i in range(500) if i % 7 or i // 7 > counter[0]}
    assert stable <= set(listed)


# ------------------------------------------------------------------------------ xattrs

async def test_xattr_basics(drv: Driver) -> None:
    await drv.create("f")
    await drv.setxattr("f", "user.k", b"v1")
    await drv.setxattr("f", "user.empty", b"")
    await drv.setxattr("f", "trusted.t", b"root only")
    assert await drv.getxattr("f", "user.k") == b"v1"
    assert await drv.getxattr("f", "user.empty") == b""
    assert sorted(await drv.listxattr("f")) == [b"trusted.t", b"user.empty", b"user.k"]
    await drv.setxattr("f", "user.k", b"v2")
    assert await drv.getxattr("f", "user.k") == b"v2"
    await drv.removexattr("f", "user.k")
    await expect_errno(errno.ENODATA, drv.getxattr("f", "user.k"))
    await expect_errno(errno.ENODATA, drv.removexattr("f", "user.k"))
    await expect_errno(errno.E2BIG, drv.setxattr("f", "user.big", bytes(65537)))
    await expect_errno(errno.ERANGE, drv.setxattr("f", "user." + "x" * 251, b"v"))
    await expect_errno(errno.EOPNOTSUPP, drv.setxattr("f", "bogus.ns", b"v"))
    drv.ctx.uid = 1000  # trusted.* is invisible to others
    assert sorted(await drv.listxattr("f")) == [b"user.empty"]
    await expect_errno(errno.ENODATA, drv.getxattr("f", "trusted.t"))


async def test_user_xattrs_on_symlinks_and_fifos_are_refused(drv: Driver) -> None:
    await drv.symlink("t", "s")
    await drv.mknod("p", stat.S_IFIFO | 0o644)
    for path in ("s", "p"):
        await expect_errno(errno.EPERM, drv.setxattr(path, "user.k", b"v"))
        await expect_errno(errno.ENODATA, drv.getxattr(path, "user.k"))


@pytest.mark.parametrize("name,value", [
    ("user.atomicfs.atomic_unit", b"3"),
    ("user.atomicfs.atomic_unit", b"4095"),
    ("user.atomicfs.atomic_unit", b"2048"),
    ("user.atomicfs.atomic_unit", b"12288"),
    ("user.atomicfs.atomic_unit", b"16KB"),  # 16000: decimal, not a power of two
    ("user.atomicfs.atomic_unit", b"16kb"),  # refused, as coreutils refuses it
    ("user.atomicfs.atomic_unit", b"-4096"),
    ("user.atomicfs.atomic_unit", b""),
    ("user.atomicfs.atomic_unit", b"4194304"),
    ("user.atomicfs.atomic_unit", b"0x4000"),
    ("user.atomicfs.writethrough", b"3"),  # 2 is the RFC's write-through
    ("user.atomicfs.writethrough", b"yes"),
    ("user.atomicfs.writethrough", b""),
    ("user.atomicfs.atomic_strict", b"true"),
    ("user.atomicfs.atomic_strict", b"01"),
])
async def test_invalid_atomicfs_xattr_is_einval_and_changes_nothing(
        drv: Driver, name: str, value: bytes) -> None:
    await drv.create("f", b"payload")
    await drv.setxattr("f", "user.atomicfs.atomic_unit", b"16384")
    await drv.setxattr("f", "user.atomicfs.writethrough", b"0")
    await drv.setxattr("f", "user.atomicfs.atomic_strict", b"0")
    before = {n: await drv.getxattr("f", n.decode()) for n in await drv.listxattr("f")}
    ctime = (await drv.attr("f")).st_ctime_ns
    stat_before = drv.fs.vol.file_stats(drv.fs.md.inodes[await drv.ino("f")])
    await expect_errno(errno.EINVAL, drv.setxattr("f", name, value))
    after = {n: await drv.getxattr("f", n.decode()) for n in await drv.listxattr("f")}
    assert after == before
    assert (await drv.attr("f")).st_ctime_ns == ctime
    inode = drv.fs.md.inodes[await drv.ino("f")]
    assert drv.fs.vol.file_stats(inode)["atomic_unit"] == stat_before["atomic_unit"] == 16384
    assert await drv.read("f") == b"payload"


async def test_valid_atomicfs_xattrs_apply_and_inherit(drv: Driver) -> None:
    await drv.mkdir("db")
    await drv.setxattr("db", "user.atomicfs.atomic_unit", b"8192")
    await drv.setxattr("db", "user.atomicfs.writethrough", b"1")
    await drv.create("db/page", os.urandom(16384))
    await drv.mkdir("db/sub")
    await drv.create("db/sub/deeper")
    for path in ("db/page", "db/sub/deeper"):
        inode = drv.fs.md.inodes[await drv.ino(path)]
        st = drv.fs.vol.file_stats(inode)
        assert st["atomic_unit"] == 8192 and st["writethrough"] is True
    await drv.setxattr("db/page", "user.atomicfs.atomic_unit", b"0")
    assert drv.fs.vol.file_stats(drv.fs.md.inodes[await drv.ino("db/page")])[
        "atomic_unit"] == 0
    await drv.removexattr("db/page", "user.atomicfs.writethrough")
    assert drv.fs.vol.file_stats(drv.fs.md.inodes[await drv.ino("db/page")])[
        "writethrough"] is False


async def test_virtual_xattrs_are_not_listed_nor_writable(drv: Driver) -> None:
    await drv.create("f")
    assert b"ino" in await drv.getxattr("f", "user.atomicfs.stat")
    assert await drv.listxattr("f") == []
    await expect_errno(errno.EPERM, drv.setxattr("f", "user.atomicfs.stat", b"{}"))
    await expect_errno(errno.EINVAL, drv.setxattr("f", "user.atomicfs.control", b"sync"))
    await expect_errno(errno.EINVAL, drv.setxattr("", "user.atomicfs.control", b"nonsense"))


# ------------------------------------------------------------------------ statfs, ENOSPC

async def test_statfs_moves_with_data(drv: Driver) -> None:
    s0 = await drv.fs.statfs(drv.ctx)
    assert s0.f_namemax == 255 and s0.f_bsize == 4096
    assert 0 < s0.f_bavail <= s0.f_bfree <= s0.f_blocks
    await drv.create("f", os.urandom(4 << 20))
    s1 = await drv.fs.statfs(drv.ctx)
    assert s0.f_bfree - s1.f_bfree >= 1024
    assert s1.f_ffree == s0.f_ffree - 1
    await drv.unlink("f")
    await drv.fs.forget([(await drv.ino(""), 0)])
    ino = max(drv.fs.md.inodes)
    await drv.fs.forget([(ino, drv.fs.md.inodes[ino].lookups)])
    await drv.fs.vol.wb.sync_all()
    await drv.fs.vol.checkpointer.checkpoint()
    s2 = await drv.fs.statfs(drv.ctx)
    assert s2.f_bfree >= s0.f_bfree - 8


async def test_enospc_then_recovers(drv: Driver) -> None:
    chunk = os.urandom(1 << 20)
    written = 0
    n = 0
    with pytest.raises(pyfuse3.FUSEError) as info:
        while True:
            n += 1
            fh = (await drv.fs.create(ROOT, f"f{n}".encode(), 0o644, os.O_RDWR,
                                      drv.ctx))[0].fh
            try:
                for i in range(4):
                    await drv.fs.write(fh, i << 20, chunk)
                    written += 1
                await drv.fs.fsync(fh, False)
            finally:
                await drv.fs.release(fh)
            assert written < 200, "a 64 MiB filesystem took 200 MiB"
    assert info.value.errno == errno.ENOSPC
    assert written >= 32, written
    for i in range(1, n):
        await drv.unlink(f"f{i}")
        ino = [i for i in drv.fs.md.inodes.values() if i.nlink == 0]
        for inode in ino:
            await drv.fs.forget([(inode.ino, inode.lookups)])
    await drv.fs.vol.wb.sync_all()
    await drv.fs.vol.checkpointer.checkpoint()
    await drv.create("again", chunk * 8)
    assert await drv.read("again", 7 << 20, 1 << 20) == chunk


async def test_metadata_growth_stops_with_enospc_and_stays_checkpointable(
        fs_image: str) -> None:
    async with open_fs(fs_image) as d:
        made = 0
        with pytest.raises(pyfuse3.FUSEError) as info:
            for i in range(2000):
                await d.create(f"f{i}")
                await d.setxattr(f"f{i}", "user.big", bytes([i % 256]) * 65536)
                made += 1
        assert info.value.errno == errno.ENOSPC
        assert made >= 100
        await d.fs.vol.checkpointer.checkpoint()  # must find room for the snapshot
        await d.unlink("f0")
        await d.setxattr("f1", "user.small", b"fits again")
    async with open_fs(fs_image) as d:  # the shutdown above checkpointed; all is there
        names = set(await d.listdir(""))
        assert {f"f{i}".encode() for i in range(1, made)} <= names and b"f0" not in names
        assert await d.getxattr(f"f{made - 1}", "user.big") == bytes([(made - 1) % 256]) * 65536
        assert await d.getxattr("f1", "user.small") == b"fits again"
