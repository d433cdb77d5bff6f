"""Namespace operations on a real mount answer as kernel ext4 does: the same scenario runs on
a reference ext4 (loop device) and on atomicfs (image file and loop device), step by step, and
every result or errno must match. Key values are also asserted outright, so that a change
on both sides cannot hide."""
# Steps chain calls as `a() or b()`: the value of a None-returning call is not a bug here.
# mypy: disable-error-code="func-returns-value"
from __future__ import annotations

import os
import stat
from typing import Any

from tests.conftest import Mount
from tests.mount.posix_helpers import (RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, Step,
                                       afs, backing,
                                       compare_steps, ext4_dir, ext4_root, outcome, renameat2,
                                       run_steps)

__all__ = ["afs", "backing", "ext4_dir", "ext4_root"]  # fixtures used below

def _touch(path: str, data: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(data)


def _open_close(path: str, flags: int) -> str:
    os.close(os.open(path, flags, 0o644))
    return "ok"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _kind(path: str) -> str:
    mode = os.lstat(path).st_mode
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode), "other")


def _pwrite(path: str, off: int, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, off)
    finally:
        os.close(fd)


L255 = "a" * 255
L256 = "b" * 256

STEPS: list[Step] = [
    ("setup", lambda r: [os.mkdir(f"{r}/d"), os.mkdir(f"{r}/d/sub"), os.mkdir(f"{r}/e"),
                         _touch(f"{r}/f", b"file f"), _touch(f"{r}/d/g", b"g"),
                         os.symlink("f", f"{r}/sl"), os.mkfifo(f"{r}/fifo")] and "ok"),
    ("mkdir existing dir", lambda r: os.mkdir(f"{r}/d")),
    ("mkdir over file", lambda r: os.mkdir(f"{r}/f")),
    ("mkdir in missing dir", lambda r: os.mkdir(f"{r}/nope/x")),
    ("mkdir below a file", lambda r: os.mkdir(f"{r}/f/x")),
    ("rmdir non-empty", lambda r: os.rmdir(f"{r}/d")),
    ("rmdir a file", lambda r: os.rmdir(f"{r}/f")),
    ("rmdir missing", lambda r: os.rmdir(f"{r}/missing")),
    ("rmdir dot", lambda r: os.rmdir(f"{r}/e/.")),
    ("rmdir dotdot", lambda r: os.rmdir(f"{r}/d/sub/..")),
    ("unlink a dir", lambda r: os.unlink(f"{r}/d")),
    ("unlink missing", lambda r: os.unlink(f"{r}/missing")),
    ("create O_EXCL existing", lambda r: _open_close(f"{r}/f", os.O_CREAT | os.O_EXCL)),
    ("open dir for writing", lambda r: _open_close(f"{r}/d", os.O_WRONLY)),
    ("O_DIRECTORY on a file", lambda r: _open_close(f"{r}/f", os.O_RDONLY | os.O_DIRECTORY)),
    ("open missing", lambda r: _open_close(f"{r}/missing", os.O_RDONLY)),
    ("O_CREAT through dangling dir", lambda r: _open_close(f"{r}/nope/f", os.O_CREAT)),
    ("create 255-byte name", lambda r: _open_close(f"{r}/{L255}", os.O_CREAT | os.O_WRONLY)),
    ("stat 255-byte name", lambda r: _kind(f"{r}/{L255}")),
    ("mkdir 255-byte name", lambda r: os.mkdir(f"{r}/d/{L255}")),
    ("create 256-byte name", lambda r: _open_close(f"{r}/{L256}", os.O_CREAT | os.O_WRONLY)),
    ("stat 256-byte name", lambda r: os.stat(f"{r}/{L256}")),
    ("mkdir 256-byte name", lambda r: os.mkdir(f"{r}/{L256}")),
    ("symlink 256-byte name", lambda r: os.symlink("f", f"{r}/{L256}")),
    ("link to 256-byte name", lambda r: os.link(f"{r}/f", f"{r}/{L256}")),
    ("rename to 256-byte name", lambda r: os.rename(f"{r}/f", f"{r}/{L256}")),
    ("unlink 256-byte name", lambda r: os.unlink(f"{r}/{L256}")),
    ("mkfifo 256-byte name", lambda r: os.mkfifo(f"{r}/{L256}")),
    ("link a directory", lambda r: os.link(f"{r}/d", f"{r}/dlink")),
    ("link onto existing", lambda r: os.link(f"{r}/f", f"{r}/d/g")),
    ("link missing source", lambda r: os.link(f"{r}/missing", f"{r}/x")),
    ("link", lambda r: os.link(f"{r}/f", f"{r}/d/f2") or os.stat(f"{r}/f").st_nlink),
    ("nlink after unlink", lambda r: os.unlink(f"{r}/d/f2") or os.stat(f"{r}/f").st_nlink),
    ("symlink onto existing", lambda r: os.symlink("x", f"{r}/f")),
    ("symlink 4095-byte target", lambda r: os.symlink("t" * 4095, f"{r}/longlink")
     or len(os.readlink(f"{r}/longlink"))),
    ("readlink a file", lambda r: os.readlink(f"{r}/f")),
    ("readlink", lambda r: os.readlink(f"{r}/sl")),
    ("follow symlink", lambda r: _read(f"{r}/sl")),
    ("dangling symlink", lambda r: os.symlink("gone", f"{r}/dangle") or
     _read(f"{r}/dangle")),
    ("lstat dangling", lambda r: _kind(f"{r}/dangle")),
    ("mkfifo existing", lambda r: os.mkfifo(f"{r}/fifo")),
    ("fifo kind", lambda r: _kind(f"{r}/fifo")),
    ("rename file over dir", lambda r: os.rename(f"{r}/f", f"{r}/e")),
    ("rename dir over file", lambda r: os.rename(f"{r}/e", f"{r}/f")),
    ("rename dir over non-empty", lambda r: os.rename(f"{r}/e", f"{r}/d")),
    ("rename into own subdir", lambda r: os.rename(f"{r}/d", f"{r}/d/sub/x")),
    ("rename missing", lambda r: os.rename(f"{r}/missing", f"{r}/x")),
    ("rename into missing dir", lambda r: os.rename(f"{r}/f", f"{r}/nope/x")),
    ("rename dir over empty dir", lambda r: os.mkdir(f"{r}/e2") or
     os.rename(f"{r}/e2", f"{r}/e") or sorted(os.listdir(r))),
    ("rename file over file", lambda r: _touch(f"{r}/h", b"h") or
     os.rename(f"{r}/h", f"{r}/d/g") or _read(f"{r}/d/g")),
    ("rename hard links of one inode", lambda r: os.link(f"{r}/f", f"{r}/f3") or
     os.rename(f"{r}/f", f"{r}/f3") or (sorted(os.listdir(r)), os.stat(f"{r}/f").st_nlink)),
    ("noreplace onto existing", lambda r: renameat2(f"{r}/f3", f"{r}/f", RENAME_NOREPLACE)),
    ("noreplace", lambda r: renameat2(f"{r}/f3", f"{r}/f4", RENAME_NOREPLACE) or
     os.path.exists(f"{r}/f3")),
    ("exchange with missing", lambda r: renameat2(f"{r}/f", f"{r}/missing",
                                                  RENAME_EXCHANGE)),
    ("exchange both flags", lambda r: renameat2(f"{r}/f", f"{r}/f4",
                                                RENAME_EXCHANGE | RENAME_NOREPLACE)),
    ("exchange file and dir", lambda r: renameat2(f"{r}/f", f"{r}/d", RENAME_EXCHANGE) or
     (_kind(f"{r}/f"), _kind(f"{r}/d"), sorted(os.listdir(f"{r}/f")), _read(f"{r}/d"))),
    ("exchange into own subtree", lambda r: renameat2(f"{r}/f", f"{r}/f/sub",
                                                      RENAME_EXCHANGE)),
    ("truncate a dir", lambda r: os.truncate(f"{r}/f", 0)),
    ("truncate negative", lambda r: os.truncate(f"{r}/d", -1)),
    ("truncate beyond max size", lambda r: os.truncate(f"{r}/d", 1 << 44)),
    ("write beyond max size", lambda r: _pwrite(f"{r}/d", (1 << 44) - 1, b"xx")),
    ("write near 4 GiB * 3", lambda r: _pwrite(f"{r}/d", 3 << 32, b"far")),
    ("size after far write", lambda r: os.stat(f"{r}/d").st_size),
    ("fsync a directory", lambda r: _fsync_dir(r)),
    ("rmdir non-empty via mounted name", lambda r: os.rmdir(f"{r}/f")),
    ("O_EXCL on a dangling symlink", lambda r: _open_close(f"{r}/dangle",
                                                          os.O_CREAT | os.O_EXCL)),
    ("O_NOFOLLOW on a symlink", lambda r: _open_close(f"{r}/sl", os.O_RDONLY | os.O_NOFOLLOW)),
    ("empty symlink target", lambda r: os.symlink("", f"{r}/empty-link")),
    ("trailing slash on a file", lambda r: os.rename(f"{r}/d/g", f"{r}/d/g2/")),
    ("write to a directory fd", lambda r: _write_dir(f"{r}/f")),
    ("in a removed directory", lambda r: _in_removed_dir(f"{r}/gone")),
    ("whiteout", lambda r: _touch(f"{r}/wo", b"w") or
     renameat2(f"{r}/wo", f"{r}/wo2", RENAME_WHITEOUT) or
     (_whiteout(f"{r}/wo"), _read(f"{r}/wo2"))),
    ("whiteout over a file", lambda r: _touch(f"{r}/wo3", b"3") or
     renameat2(f"{r}/wo3", f"{r}/wo2", RENAME_WHITEOUT) or
     (_whiteout(f"{r}/wo3"), _read(f"{r}/wo2"))),
    ("whiteout noreplace onto existing", lambda r: _touch(f"{r}/wo4") or
     renameat2(f"{r}/wo4", f"{r}/wo2", RENAME_WHITEOUT | RENAME_NOREPLACE)),
    ("whiteout with exchange", lambda r: renameat2(f"{r}/wo4", f"{r}/wo2",
                                                   RENAME_WHITEOUT | RENAME_EXCHANGE)),
    ("whiteout of a directory", lambda r: os.mkdir(f"{r}/wod") or
     renameat2(f"{r}/wod", f"{r}/wod2", RENAME_WHITEOUT) or
     (_whiteout(f"{r}/wod"), _kind(f"{r}/wod2"))),
    ("final listing", lambda r: sorted(os.listdir(r))),
]


def _whiteout(path: str) -> tuple[bool, int, int]:
    """A whiteout: a character device numbered 0/0 (mode bits as the kernel leaves them)."""
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode), st.st_rdev, st.st_nlink


def _write_dir(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.write(fd, b"x")
    finally:
        os.close(fd)


def _in_removed_dir(path: str) -> list[Any]:
    """What create, mkdir and listing do through a descriptor of a removed directory."""
    os.mkdir(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(path)
        return [outcome(lambda: os.mkdir("x", dir_fd=fd)),
                outcome(lambda: os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))),
                outcome(lambda: os.listdir(fd)),
                outcome(lambda: os.stat(fd).st_nlink)]
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return "ok"


def test_errno_values_match_ext4(afs: Mount, ext4_dir: str) -> None:
    os.mkdir(afs / "t")
    got = run_steps(afs / "t", STEPS)
    want = run_steps(ext4_dir, STEPS)
    compare_steps(got, want)
    results = dict(got)
    assert results["mkdir existing dir"] == "EEXIST"
    assert results["rmdir non-empty"] == "ENOTEMPTY"
    assert results["create 256-byte name"] == "ENAMETOOLONG"
    assert results["stat 255-byte name"] == "file"
    assert results["rename file over dir"] == "EISDIR"
    assert results["rename dir over file"] == "ENOTDIR"
    assert results["noreplace onto existing"] == "EEXIST"
    assert results["link"] == 2 and results["nlink after unlink"] == 1
    assert results["size after far write"] == (3 << 32) + 3
