"""The kernel keeps a file's page cache when its mtime changes (native/fuseconn.c turns
libfuse's auto_inval_data off): data just written is read back from the kernel's cache even
after a stat refreshed the attributes, and the kernel still sees every change, including
truncation and O_DIRECT writes, so what it serves is never stale. With
FUSE_HANDLE_KILLPRIV_V2 (also native/fuseconn.c) writes come without a getxattr each; what
that leaves to the filesystem, clearing setuid/setgid bits, test_posix_ops checks."""
from __future__ import annotations

import mmap
import os

from tests.conftest import Mount

SIZE = 256 * 1024


def _fuse_reads(mnt: Mount) -> int:
    return int(mnt.stat()["latency"]["fuse"].get("read", {}).get("count", 0))


def test_the_session_was_set_up_without_auto_inval_data(mnt: Mount) -> None:
    conn = mnt.stat()["fuse_conn"]
    assert conn == {"wrapped": True, "auto_inval_data": False, "handle_killpriv_v2": True}


def test_writes_come_without_a_getxattr_each(mnt: Mount) -> None:
    def getxattrs() -> int:
        return int(mnt.stat()["latency"]["fuse"].get("getxattr", {}).get("count", 0))
    fd = os.open(mnt / "w", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        before = getxattrs()
        for i in range(50):
            os.pwrite(fd, b"y" * 4096, i * 4096)
    finally:
        os.close(fd)
    # without the flag: one per write (50); with it the kernel asks again only after it
    # refreshed the attributes, and `atomicfs stat` reads its own through getxattr
    assert getxattrs() - before <= 3


def test_a_stat_after_writes_keeps_the_cache(mnt: Mount) -> None:
    path = mnt / "f"
    data = os.urandom(SIZE)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, data, 0)
        before = _fuse_reads(mnt)
        for i in range(4):
            os.pwrite(fd, data[:4096], i * 8192)  # the mtime changes...
            st = os.fstat(fd)  # ...and a getattr shows it
            assert st.st_size == SIZE
            assert os.pread(fd, SIZE, 0)[:4096] == data[:4096]
        assert _fuse_reads(mnt) == before  # all from the kernel's cache
    finally:
        os.close(fd)


def test_the_cache_follows_truncation_and_direct_writes(mnt: Mount) -> None:
    path = mnt / "g"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"a" * SIZE, 0)
        assert os.pread(fd, 16, SIZE - 16) == b"a" * 16
        os.truncate(path, 4096)  # through another path: the kernel truncates its cache
        assert os.fstat(fd).st_size == 4096
        assert os.pread(fd, SIZE, 0) == b"a" * 4096
        os.truncate(path, 8192)  # extended again: zeros, not the old cached bytes
        assert os.pread(fd, 8192, 0) == b"a" * 4096 + bytes(4096)
        dfd = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            buf.write(b"d" * 4096)
            assert os.pwrite(dfd, buf, 0) == 4096  # O_DIRECT: the kernel drops the range
        finally:
            os.close(dfd)
        assert os.pread(fd, 4096, 0) == b"d" * 4096
    finally:
        os.close(fd)
