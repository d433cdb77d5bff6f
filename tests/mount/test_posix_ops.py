"""Every namespace and attribute operation of issue 2 on real mounts, over an image file and
over a loop device. Where ext4's answer is the specification, the reference ext4 runs the
same steps."""
# Steps chain calls as `a() or b()`: the value of a None-returning call is not a bug here.
# mypy: disable-error-code="func-returns-value"
from __future__ import annotations

import errno
import os
import random
import socket
import stat
import struct
import threading
import time

import pytest

from tests.conftest import Mount, MountFactory, cli
from tests.mount.posix_helpers import (Step, afs, as_user, backing, compare_steps, ext4_dir,
                                       ext4_root, outcome, run_steps, tree_state)

__all__ = ["afs", "backing", "ext4_dir", "ext4_root"]  # fixtures used below

NS = 1_000_000_000


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def drop_kernel_cache(path: str) -> None:
    """Drop the kernel's cached pages of path, so the next read asks the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_all_caches(m: Mount, *paths: str) -> None:
    """Write everything back, then drop the daemon's and the kernel's copies."""
    m.control("sync")
    m.control("drop_caches")
    for p in paths:
        drop_kernel_cache(p)


# ------------------------------------------------------------------------- attributes

def test_chmod_chown_utimensat_nanoseconds(afs: Mount) -> None:
    path = afs / "f"
    write_file(path, b"x")
    st0 = os.stat(path)
    time.sleep(0.01)
    os.chmod(path, 0o4751)
    st1 = os.stat(path)
    assert stat.S_IMODE(st1.st_mode) == 0o4751 and stat.S_ISREG(st1.st_mode)
    assert st1.st_ctime_ns > st0.st_ctime_ns
    os.chown(path, 1234, 5678)
    st2 = os.stat(path)
    assert (st2.st_uid, st2.st_gid) == (1234, 5678)
    os.chown(path, -1, 42)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 42)
    atime, mtime = 1_600_000_000 * NS + 123_456_789, 1_700_000_000 * NS + 987_654_321
    os.utime(path, ns=(atime, mtime))
    st3 = os.stat(path)
    assert (st3.st_atime_ns, st3.st_mtime_ns) == (atime, mtime)
    assert st3.st_ctime_ns >= st2.st_ctime_ns
    # times before 1970 and far in the future survive too
    os.utime(path, ns=(-5 * NS - 1, 4_000_000_000 * NS + 1))
    st4 = os.stat(path)
    assert (st4.st_atime_ns, st4.st_mtime_ns) == (-5 * NS - 1, 4_000_000_000 * NS + 1)
    # utime(None) sets both to now
    before = time.time_ns()
    os.utime(path)
    st5 = os.stat(path)
    assert before - 10**8 <= st5.st_mtime_ns <= time.time_ns() + 10**8


def test_symlink_times_and_owner_apply_to_the_link(afs: Mount) -> None:
    write_file(afs / "target", b"t")
    os.symlink("target", afs / "link")
    os.utime(afs / "link", ns=(NS, 2 * NS), follow_symlinks=False)
    os.lchown(afs / "link", 7, 8)
    lst, tst = os.lstat(afs / "link"), os.stat(afs / "target")
    assert (lst.st_atime_ns, lst.st_mtime_ns, lst.st_uid, lst.st_gid) == (NS, 2 * NS, 7, 8)
    assert tst.st_mtime_ns != 2 * NS and (tst.st_uid, tst.st_gid) == (0, 0)


def test_attribute_side_effects_match_ext4(afs: Mount, ext4_dir: str) -> None:
    """chown clears set-user-ID (and set-group-ID when group-executable); a directory keeps
    them; modes and owners follow ext4."""
    def mode(p: str) -> str:
        return oct(os.lstat(p).st_mode)

    steps: list[Step] = [
        ("setup", lambda r: [write_file(f"{r}/s", b"x"), os.mkdir(f"{r}/d")] and "ok"),
        ("chmod 6755", lambda r: os.chmod(f"{r}/s", 0o6755) or mode(f"{r}/s")),
        ("chown clears suid/sgid", lambda r: os.chown(f"{r}/s", 1, 1) or mode(f"{r}/s")),
        ("chmod 2745", lambda r: os.chmod(f"{r}/s", 0o2745) or mode(f"{r}/s")),
        ("chown keeps sgid without group x",
         lambda r: os.chown(f"{r}/s", 2, 2) or mode(f"{r}/s")),
        ("dir 7777", lambda r: os.chmod(f"{r}/d", 0o7777) or mode(f"{r}/d")),
        ("chown dir keeps bits", lambda r: os.chown(f"{r}/d", 3, 3) or mode(f"{r}/d")),
        ("sgid dir passes group", lambda r: write_file(f"{r}/d/new", b"") or
         (os.stat(f"{r}/d/new").st_gid, mode(f"{r}/d/new"))),
        ("sgid dir subdir", lambda r: os.mkdir(f"{r}/d/sub") or
         (os.stat(f"{r}/d/sub").st_gid, mode(f"{r}/d/sub"))),
        ("mknod fifo mode", lambda r: os.mkfifo(f"{r}/p", 0o640) or mode(f"{r}/p")),
        ("chmod fifo", lambda r: os.chmod(f"{r}/p", 0o600) or mode(f"{r}/p")),
        ("write clears nothing for root", lambda r: os.chmod(f"{r}/s", 0o6755) or
         write_file(f"{r}/s", b"root") or mode(f"{r}/s")),
        ("truncate clears nothing for root", lambda r: os.chmod(f"{r}/s", 0o4755) or
         os.truncate(f"{r}/s", 0) or mode(f"{r}/s")),
    ]
    os.mkdir(afs / "t")
    compare_steps(run_steps(afs / "t", steps), run_steps(ext4_dir, steps))
    assert stat.S_IMODE(os.stat(afs / "t/s").st_mode) == 0o4755


# -------------------------------------------------------------------------- file data

def test_truncate_down_and_up_reads_zeros(afs: Mount) -> None:
    path = afs / "f"
    data = os.urandom(300_000)
    write_file(path, data)
    os.truncate(path, 5000)
    assert os.stat(path).st_size == 5000
    os.truncate(path, 250_000)
    want = data[:5000] + bytes(245_000)
    assert read_file(path) == want
    drop_all_caches(afs, path)
    assert read_file(path) == want
    # the same when the cut block was already on the device
    write_file(afs / "g", data[:8192])
    drop_all_caches(afs, afs / "g")
    os.truncate(afs / "g", 100)
    os.truncate(afs / "g", 8192)
    drop_all_caches(afs, afs / "g")
    assert read_file(afs / "g") == data[:100] + bytes(8092)
    # ftruncate on an open descriptor, then write past the end
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 10)
        os.pwrite(fd, b"end", 20)
    finally:
        os.close(fd)
    assert read_file(path) == data[:10] + bytes(10) + b"end"


def test_open_flags(afs: Mount) -> None:
    path = afs / "f"
    write_file(path, b"0123456789")
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(path).st_size == 0
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(5):
            os.write(a, b"a%d" % i)
            os.write(b, b"b%d" % i)
    finally:
        os.close(a)
        os.close(b)
    assert read_file(path) == b"a0b0a1b1a2b2a3b3a4b4"
    old = os.umask(0o027)
    try:
        fd = os.open(afs / "masked", os.O_CREAT | os.O_WRONLY, 0o777)
        os.close(fd)
        os.mkdir(afs / "maskeddir", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(afs / "masked").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(afs / "maskeddir").st_mode) == 0o750


def test_sparse_file_beyond_4gib(afs: Mount) -> None:
    path = afs / "sparse"
    offsets = [(4 << 30) - 3, 5 << 30, (7 << 30) + 12345]
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        for off in offsets:
            assert os.pwrite(fd, b"<%d>" % off, off) > 0
        os.fsync(fd)
        st = os.fstat(fd)
        assert st.st_size == offsets[-1] + len(b"<%d>" % offsets[-1])
        assert st.st_blocks * 512 <= 64 * 4096  # holes take no space
        assert os.pread(fd, 1 << 20, 1 << 30) == bytes(1 << 20)
        assert os.pread(fd, 16, 5 << 30) == (b"<%d>" % (5 << 30)).ljust(16, b"\0")
    finally:
        os.close(fd)
    drop_all_caches(afs, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in offsets:
            want = b"<%d>" % off
            assert os.pread(fd, len(want) + 8, off - 8) == bytes(8) + want
        assert os.pread(fd, 65536, (6 << 30) + 7) == bytes(65536)
    finally:
        os.close(fd)


# ------------------------------------------------------------------- names and links

def test_names_of_255_bytes(afs: Mount) -> None:
    names = ["a" * 255, "é" * 127 + "x", "\x01-" + "z" * 253]
    assert all(len(n.encode()) == 255 for n in names)
    for n in names:
        write_file(afs / n, n.encode())
    os.mkdir(afs / ("d" * 255))
    os.rename(afs / names[0], afs / ("d" * 255 + "/" + "r" * 255))
    assert read_file(afs / ("d" * 255 + "/" + "r" * 255)) == names[0].encode()
    assert sorted(os.listdir(afs.path)) == sorted(names[1:] + ["d" * 255])
    too_long = "y" * 256
    for make in (lambda p: write_file(p, b""), os.mkdir, os.mkfifo,
                 lambda p: os.symlink("t", p), lambda p: os.link(afs / names[1], p)):
        with pytest.raises(OSError) as info:
            make(afs / too_long)
        assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        os.stat(afs / ("é" * 128))  # 256 bytes in UTF-8
    assert info.value.errno == errno.ENAMETOOLONG


def test_hard_links_and_nlink(afs: Mount) -> None:
    os.mkdir(afs / "a")
    os.mkdir(afs / "b")
    write_file(afs / "a/orig", b"one")
    os.link(afs / "a/orig", afs / "b/second")
    os.link(afs / "b/second", afs / "third")
    sts = [os.stat(p) for p in (afs / "a/orig", afs / "b/second", afs / "third")]
    assert {s.st_ino for s in sts} == {sts[0].st_ino}
    assert [s.st_nlink for s in sts] == [3, 3, 3]
    with open(afs / "third", "r+b") as f:
        f.write(b"ONE")
    assert read_file(afs / "a/orig") == b"ONE"
    os.unlink(afs / "a/orig")
    assert os.stat(afs / "third").st_nlink == 2
    os.rename(afs / "third", afs / "a/moved")
    assert os.stat(afs / "b/second").st_nlink == 2
    os.unlink(afs / "b/second")
    assert os.stat(afs / "a/moved").st_nlink == 1
    assert read_file(afs / "a/moved") == b"ONE"
    # directory link counts follow subdirectories
    assert os.stat(afs.path).st_nlink == 4
    os.mkdir(afs / "a/sub")
    assert os.stat(afs / "a").st_nlink == 3
    os.rename(afs / "a/sub", afs / "b/sub")
    assert (os.stat(afs / "a").st_nlink, os.stat(afs / "b").st_nlink) == (2, 3)


def test_unlinked_open_file_keeps_data_until_closed(afs: Mount) -> None:
    data = os.urandom(200_000)
    write_file(afs / "f", data)
    free0 = os.statvfs(afs.path).f_bfree
    fd = os.open(afs / "f", os.O_RDWR)
    try:
        os.unlink(afs / "f")
        assert os.fstat(fd).st_nlink == 0
        os.pwrite(fd, b"more", len(data))
        assert os.pread(fd, len(data) + 4, 0) == data + b"more"
    finally:
        os.close(fd)
    afs.control("sync")
    assert not os.path.exists(afs / "f")
    assert os.statvfs(afs.path).f_bfree >= free0


def test_symlinks(afs: Mount) -> None:
    os.makedirs(afs / "x/y")
    write_file(afs / "x/y/file", b"deep")
    os.symlink("x/y", afs / "rel")
    os.symlink(afs / "x/y/file", afs / "abs")
    os.symlink("nowhere", afs / "dangling")
    os.symlink("loop2", afs / "loop1")
    os.symlink("loop1", afs / "loop2")
    assert read_file(afs / "rel/file") == b"deep"
    assert read_file(afs / "abs") == b"deep"
    assert os.readlink(afs / "rel") == "x/y"
    lst = os.lstat(afs / "rel")
    assert stat.S_ISLNK(lst.st_mode) and stat.S_IMODE(lst.st_mode) == 0o777
    assert lst.st_size == 3
    assert outcome(lambda: os.stat(afs / "dangling")) == "ENOENT"
    assert outcome(lambda: os.stat(afs / "loop1")) == "ELOOP"
    target = "/" + "seg/" * 1023 + "end"  # 4096 bytes is too long, 4095 is fine
    os.symlink(target[:4095], afs / "longest")
    assert os.readlink(afs / "longest") == target[:4095]
    assert outcome(lambda: os.symlink(target, afs / "toolong")) == "ENAMETOOLONG"
    drop_all_caches(afs)
    assert os.readlink(afs / "longest") == target[:4095]


def test_fifo_and_socket_nodes(afs: Mount) -> None:
    os.mkfifo(afs / "fifo", 0o600)
    assert stat.S_ISFIFO(os.stat(afs / "fifo").st_mode)
    got: list[bytes] = []

    def reader() -> None:
        with open(afs / "fifo", "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader)
    t.start()
    with open(afs / "fifo", "wb") as f:
        f.write(b"through the pipe")
    t.join(10)
    assert got == [b"through the pipe"]
    # bind() creates the socket node through mknod
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(afs / "sock")
        srv.listen(1)
        assert stat.S_ISSOCK(os.stat(afs / "sock").st_mode)
        cli_ = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cli_.connect(afs / "sock")
        conn, _ = srv.accept()
        cli_.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        cli_.close()
    finally:
        srv.close()
    os.mknod(afs / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.stat(afs / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(afs / "plain", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(afs / "plain").st_mode)
    assert os.stat(afs / "plain").st_size == 0


# ---------------------------------------------------------------------------- readdir

def test_readdir_of_thousands_of_entries(afs: Mount) -> None:
    os.mkdir(afs / "big")
    names = {f"entry-{i:05d}-" + "x" * (i % 200) for i in range(3000)}
    for n in names:
        os.close(os.open(afs / f"big/{n}", os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(afs / "big")
    assert len(listed) == len(set(listed)) == len(names)
    assert set(listed) == names
    with os.scandir(afs / "big") as it:
        inos = {e.name: e.inode() for e in it}
    for n in list(names)[:50]:
        assert inos[n] == os.stat(afs / f"big/{n}").st_ino
    # the pattern of rm -r: unlink while reading the directory
    seen: list[str] = []
    with os.scandir(afs / "big") as it:
        for e in it:
            seen.append(e.name)
            os.unlink(e.path)
    assert len(seen) == len(set(seen)) == len(names)
    assert os.listdir(afs / "big") == []
    os.rmdir(afs / "big")


def test_statfs_numbers_move(afs: Mount) -> None:
    s0 = os.statvfs(afs.path)
    assert s0.f_bsize == 4096 and s0.f_namemax == 255
    assert 0 < s0.f_bavail <= s0.f_bfree <= s0.f_blocks
    fd = os.open(afs / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.fsync(fd)
    finally:
        os.close(fd)
    s1 = os.statvfs(afs.path)
    assert s0.f_bfree - s1.f_bfree >= (16 << 20) // 4096
    assert s0.f_bavail - s1.f_bavail >= (16 << 20) // 4096
    assert s1.f_ffree == s0.f_ffree - 1
    assert s1.f_blocks == s0.f_blocks
    os.unlink(afs / "f")
    afs.control("sync")
    s2 = os.statvfs(afs.path)
    assert s2.f_bfree >= s0.f_bfree - 16 and s2.f_ffree == s0.f_ffree


# ----------------------------------------------------------------------------- xattrs

def test_xattrs_match_ext4(afs: Mount, ext4_dir: str) -> None:
    def get(p: str, n: str) -> bytes:
        return os.getxattr(p, n, follow_symlinks=False)

    steps: list[Step] = [
        ("setup", lambda r: [write_file(f"{r}/f", b""), os.mkdir(f"{r}/d"),
                             os.symlink("f", f"{r}/l"), os.mkfifo(f"{r}/p")] and "ok"),
        ("get missing", lambda r: get(f"{r}/f", "user.k")),
        ("set", lambda r: os.setxattr(f"{r}/f", "user.k", b"v1")),
        ("get", lambda r: get(f"{r}/f", "user.k")),
        ("create existing", lambda r: os.setxattr(f"{r}/f", "user.k", b"v2",
                                                  os.XATTR_CREATE)),
        ("replace missing", lambda r: os.setxattr(f"{r}/f", "user.n", b"v",
                                                  os.XATTR_REPLACE)),
        ("replace", lambda r: os.setxattr(f"{r}/f", "user.k", b"v3", os.XATTR_REPLACE)
         or get(f"{r}/f", "user.k")),
        ("create new", lambda r: os.setxattr(f"{r}/f", "user.n", b"", os.XATTR_CREATE)
         or get(f"{r}/f", "user.n")),
        ("list", lambda r: sorted(os.listxattr(f"{r}/f"))),
        ("binary value", lambda r: os.setxattr(f"{r}/f", "user.b", bytes(range(256)))
         or get(f"{r}/f", "user.b") == bytes(range(256))),
        ("remove", lambda r: os.removexattr(f"{r}/f", "user.k")
         or sorted(os.listxattr(f"{r}/f"))),
        ("remove missing", lambda r: os.removexattr(f"{r}/f", "user.k")),
        ("dir xattr", lambda r: os.setxattr(f"{r}/d", "user.d", b"dv")
         or get(f"{r}/d", "user.d")),
        ("trusted", lambda r: os.setxattr(f"{r}/f", "trusted.t", b"tv")
         or get(f"{r}/f", "trusted.t")),
        ("user on symlink", lambda r: os.setxattr(f"{r}/l", "user.k", b"v",
                                                  follow_symlinks=False)),
        ("user on fifo", lambda r: os.setxattr(f"{r}/p", "user.k", b"v")),
        ("list symlink", lambda r: os.listxattr(f"{r}/l", follow_symlinks=False)),
        ("name too long", lambda r: os.setxattr(f"{r}/f", "user." + "n" * 251, b"v")),
        ("empty name", lambda r: os.setxattr(f"{r}/f", "", b"v")),
        ("unknown namespace", lambda r: os.setxattr(f"{r}/f", "nonsense.k", b"v")),
        ("value too large", lambda r: os.setxattr(f"{r}/f", "user.big", bytes(65537))),
        ("get from missing file", lambda r: get(f"{r}/missing", "user.k")),
    ]
    os.mkdir(afs / "t")
    compare_steps(run_steps(afs / "t", steps), run_steps(ext4_dir, steps))
    assert os.getxattr(afs / "t/f", "user.n") == b""
    # atomicfs keeps values up to the VFS limit (ext4 without ea_inode stops near 4 KiB)
    os.setxattr(afs / "t/f", "user.big", os.urandom(65536))
    assert len(os.getxattr(afs / "t/f", "user.big")) == 65536


@pytest.mark.parametrize("name,value", [
    ("user.atomicfs.atomic_unit", b"3000"),
    ("user.atomicfs.atomic_unit", b"2048"),
    ("user.atomicfs.atomic_unit", b"16KB"),  # 16k is valid (size grammar), 16KB is not
    ("user.atomicfs.atomic_unit", b"4194304"),
    ("user.atomicfs.atomic_unit", b"lots"),
    ("user.atomicfs.writethrough", b"3"),  # 2 is the RFC write-through (issue 15)
    ("user.atomicfs.atomic_strict", b"yes"),
])
def test_invalid_atomicfs_xattr_changes_nothing(mnt: Mount, name: str, value: bytes) -> None:
    path = mnt / "f"
    write_file(path, b"payload")
    os.setxattr(path, "user.atomicfs.atomic_unit", b"16384")
    before = (sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)),
              mnt.stat("f")["atomic_unit"], os.stat(path).st_ctime_ns)
    assert outcome(lambda: os.setxattr(path, name, value)) == "EINVAL"
    after = (sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)),
             mnt.stat("f")["atomic_unit"], os.stat(path).st_ctime_ns)
    assert after == before and before[1] == 16384
    assert read_file(path) == b"payload"


# -------------------------------------------------------------------- permissions

# struct vfs_cap_data, revision 2: CAP_NET_RAW (13) permitted
CAP_NET_RAW = struct.pack("<5I", 0x02000000, 1 << 13, 0, 0, 0)


def _perm_steps() -> list[Step]:
    """Run as uid 65534 in the test directory (relative paths)."""
    def append(p: str) -> int:
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            return os.write(fd, b"+")
        finally:
            os.close(fd)

    def mine(p: str) -> tuple[int, int, str]:
        st = os.stat(p)
        return st.st_uid, st.st_gid, oct(st.st_mode)

    return [
        ("read 0600 root file", lambda r: read_file("secret")),
        ("read 0644 root file", lambda r: read_file("public")),
        ("write 0644 root file", lambda r: append("public")),
        ("truncate 0644 root file", lambda r: os.truncate("public", 0)),
        ("create in 0755 root dir", lambda r: write_file("mine", b"")),
        ("mkdir in 0755 root dir", lambda r: os.mkdir("mydir")),
        ("unlink in 0755 root dir", lambda r: os.unlink("public")),
        ("rename in 0755 root dir", lambda r: os.rename("public", "p2")),
        ("list 0700 dir", lambda r: os.listdir("private")),
        ("stat through 0700 dir", lambda r: os.stat("private/inner")),
        ("list 0711 dir", lambda r: os.listdir("traverse")),
        ("stat through 0711 dir", lambda r: oct(os.stat("traverse/inner").st_mode)),
        ("create in 0777 dir", lambda r: write_file("open/mine", b"m") or mine("open/mine")),
        ("mkdir in 0777 dir", lambda r: os.mkdir("open/mydir", 0o750) or mine("open/mydir")),
        ("chmod own file", lambda r: os.chmod("open/mine", 0o600) or mine("open/mine")),
        ("chmod root file", lambda r: os.chmod("public", 0o666)),
        ("chown own file to root", lambda r: os.chown("open/mine", 0, 0)),
        ("chgrp own file to other group", lambda r: os.chown("open/mine", -1, 0)),
        ("utime root file to a time", lambda r: os.utime("public", ns=(1, 1))),
        ("utime root file to now", lambda r: os.utime("public")),
        ("utime 0666 root file to now", lambda r: os.utime("sticky/shared")),
        ("sticky: unlink root file", lambda r: os.unlink("sticky/shared")),
        ("sticky: write 0666 root file", lambda r: append("sticky/shared")),
        ("sticky: rename root file", lambda r: os.rename("sticky/shared", "sticky/x")),
        ("sticky: own file", lambda r: write_file("sticky/mine", b"") or
         os.unlink("sticky/mine")),
        ("write 4777 file clears suid",
         lambda r: (append("suid"), oct(os.stat("suid").st_mode))),
        ("truncate 6777 file clears suid and sgid",
         lambda r: (os.truncate("suid_t", 1), oct(os.stat("suid_t").st_mode))),
        ("O_TRUNC 6777 file clears suid and sgid",
         lambda r: (os.close(os.open("suid_o", os.O_WRONLY | os.O_TRUNC)),
                    oct(os.stat("suid_o").st_mode))),
        ("write 2766 file of another group clears sgid",
         lambda r: (append("sgid_nx"), oct(os.stat("sgid_nx").st_mode))),
        ("write file with capabilities drops them",
         lambda r: (append("capable"), os.listxattr("capable"))),
        ("setxattr root file", lambda r: os.setxattr("public", "user.k", b"v")),
        ("getxattr root file", lambda r: os.getxattr("public", "user.r")),
        ("getxattr 0600 root file", lambda r: os.getxattr("secret", "user.r")),
        ("setxattr own file", lambda r: os.setxattr("open/mine", "user.k", b"v")
         or os.getxattr("open/mine", "user.k")),
        ("trusted xattr", lambda r: os.setxattr("open/mine", "trusted.k", b"v")),
        ("list trusted as user", lambda r: os.listxattr("public")),
        ("access", lambda r: [os.access(p, m) for p in ("secret", "public", "open")
                              for m in (os.R_OK, os.W_OK, os.X_OK)]),
        ("link root file into 0777 dir", lambda r: os.link("secret", "open/hl")),
        ("mknod fifo in 0777 dir", lambda r: os.mkfifo("open/fifo") or mine("open/fifo")),
        ("execute 0644 file", lambda r: os.execv("public", ["public"])),
    ]


def _perm_setup(root: str) -> None:
    os.chmod(root, 0o755)
    write_file(f"{root}/secret", b"s")
    os.chmod(f"{root}/secret", 0o600)
    write_file(f"{root}/public", b"p")
    os.setxattr(f"{root}/public", "user.r", b"readable")
    os.setxattr(f"{root}/secret", "user.r", b"hidden")
    os.setxattr(f"{root}/public", "trusted.t", b"root")
    write_file(f"{root}/suid", b"")
    os.chmod(f"{root}/suid", 0o4777)
    for name, mode in (("suid_t", 0o6777), ("suid_o", 0o6777), ("sgid_nx", 0o2766),
                       ("capable", 0o777)):
        write_file(f"{root}/{name}", b"data")
        os.chmod(f"{root}/{name}", mode)
    # after a write found none (the kernel may then stop asking), file capabilities are set
    with open(f"{root}/capable", "ab") as f:
        f.write(b"+")
    os.setxattr(f"{root}/capable", "security.capability", CAP_NET_RAW)
    for d, mode in (("private", 0o700), ("traverse", 0o711), ("open", 0o777),
                    ("sticky", 0o1777)):
        os.mkdir(f"{root}/{d}")
        os.chmod(f"{root}/{d}", mode)
    os.mkdir(f"{root}/private/inner")
    os.mkdir(f"{root}/traverse/inner")
    write_file(f"{root}/sticky/shared", b"")
    os.chmod(f"{root}/sticky/shared", 0o666)


def test_permissions_as_another_user_match_ext4(afs: Mount, ext4_dir: str) -> None:
    steps = _perm_steps()
    results = {}
    for name, root in (("atomicfs", afs / "t"), ("ext4", ext4_dir)):
        if name == "atomicfs":
            os.mkdir(root)
        _perm_setup(root)
        results[name] = as_user_steps(root, steps)
    compare_steps(results["atomicfs"], results["ext4"])
    got = dict(results["atomicfs"])
    assert got["read 0600 root file"] == "EACCES"
    assert got["read 0644 root file"] == b"p"
    assert got["create in 0755 root dir"] == "EACCES"
    assert got["create in 0777 dir"] == (65534, 65534, oct(stat.S_IFREG | 0o644))
    assert got["sticky: unlink root file"] == "EPERM"
    assert got["write 4777 file clears suid"] == (1, oct(stat.S_IFREG | 0o777))
    assert got["truncate 6777 file clears suid and sgid"] == (None, oct(stat.S_IFREG | 0o777))
    assert got["O_TRUNC 6777 file clears suid and sgid"] == (None, oct(stat.S_IFREG | 0o777))
    assert got["write 2766 file of another group clears sgid"] == (1, oct(stat.S_IFREG | 0o766))
    assert got["write file with capabilities drops them"] == (1, [])


def as_user_steps(root: str, steps: list[Step]) -> list[tuple[str, object]]:
    return as_user(lambda: run_steps(root, steps), cwd=root)


def test_allow_other_is_needed_for_other_users(backing: str, mounter: MountFactory) -> None:
    private = mounter(backing)
    write_file(private / "f", b"root's")
    os.chmod(private / "f", 0o644)
    assert as_user(lambda: read_file("f"), cwd=private.path) == "EACCES"
    assert as_user(lambda: os.listdir("."), cwd=private.path) == "EACCES"
    private.umount()
    shared = mounter(backing, "allow_other")
    assert as_user(lambda: read_file("f"), cwd=shared.path) == b"root's"
    assert as_user(lambda: os.listdir("."), cwd=shared.path) == ["f"]


def test_concurrent_namespace_changes_stay_consistent(mnt: Mount,
                                                      mounter: MountFactory) -> None:
    """Four threads create, rename, link, unlink and list in shared directories; the
    result survives unmount, checks clean and remounts identical."""
    for d in ("a", "b", "c"):
        os.mkdir(mnt / d)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(400):
                d = rng.choice("abc")
                name = f"{d}/t{seed}-{rng.randrange(40)}"
                op = rng.randrange(6)
                try:
                    if op == 0:
                        write_file(mnt / name, os.urandom(rng.randrange(5000)))
                    elif op == 1:
                        os.rename(mnt / name, mnt / f"{rng.choice('abc')}/t{seed}-{i}")
                    elif op == 2:
                        os.link(mnt / name, mnt / f"{rng.choice('abc')}/l{seed}-{i}")
                    elif op == 3:
                        os.unlink(mnt / name)
                    elif op == 4:
                        os.listdir(mnt / d)
                    else:
                        os.setxattr(mnt / name, "user.s", str(seed).encode())
                except FileNotFoundError:
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    tree_state(mnt.path)  # reading directories moves their access times once (relatime)
    state = tree_state(mnt.path)
    assert len(state) > 50
    mnt.umount()
    assert "clean" in cli("fsck", mnt.target).stdout
    again = mounter(mnt.target)
    assert tree_state(again.path) == state
