"""Which timestamps each operation moves, compared with kernel ext4: the same sequence runs
on both, and for every step the set of (object, time) pairs that changed must match."""
from __future__ import annotations

import os
import time
from typing import Callable

from tests.conftest import Mount
from tests.mount.posix_helpers import afs, backing, ext4_dir, ext4_root

__all__ = ["afs", "backing", "ext4_dir", "ext4_root"]  # fixtures used below

Op = tuple[str, Callable[[str], object]]


def _write(path: str, data: bytes, mode: str = "ab") -> None:
    with open(path, mode) as f:
        f.write(data)


def _read(path: str) -> None:
    with open(path, "rb") as f:
        f.read()


def _open_trunc(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))


OPS: list[Op] = [
    ("create file", lambda r: _write(f"{r}/d/f", b"", "wb")),
    ("write", lambda r: _write(f"{r}/d/f", b"data")),
    ("read", lambda r: _read(f"{r}/d/f")),
    ("read again", lambda r: _read(f"{r}/d/f")),
    ("truncate down", lambda r: os.truncate(f"{r}/d/f", 2)),
    ("truncate same size", lambda r: os.truncate(f"{r}/d/f", 2)),
    ("open O_TRUNC", lambda r: _open_trunc(f"{r}/d/f")),
    ("chmod", lambda r: os.chmod(f"{r}/d/f", 0o600)),
    ("chown", lambda r: os.chown(f"{r}/d/f", 5, 5)),
    ("chown -1 -1", lambda r: os.chown(f"{r}/d/f", -1, -1)),  # ctime moves on ext4
    ("chown -1 -1 of a directory", lambda r: os.chown(f"{r}/e", -1, -1)),
    ("setxattr", lambda r: os.setxattr(f"{r}/d/f", "user.k", b"v")),
    ("removexattr", lambda r: os.removexattr(f"{r}/d/f", "user.k")),
    ("link", lambda r: os.link(f"{r}/d/f", f"{r}/e/g")),
    ("unlink one link", lambda r: os.unlink(f"{r}/e/g")),
    ("rename in dir", lambda r: os.rename(f"{r}/d/f", f"{r}/d/f2")),
    ("rename across dirs", lambda r: os.rename(f"{r}/d/f2", f"{r}/e/f")),
    ("mkdir", lambda r: os.mkdir(f"{r}/d/sub")),
    ("rmdir", lambda r: os.rmdir(f"{r}/d/sub")),
    ("symlink", lambda r: os.symlink("x", f"{r}/d/s")),
    ("mkfifo", lambda r: os.mkfifo(f"{r}/d/p")),
    ("listdir", lambda r: os.listdir(f"{r}/d")),
    ("utime now", lambda r: os.utime(f"{r}/e/f")),
    ("unlink last link", lambda r: os.unlink(f"{r}/e/f")),
]

WATCH = ["d", "e", "d/f", "d/f2", "e/f"]


def _times(root: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for rel in WATCH:
        try:
            st = os.lstat(f"{root}/{rel}")
        except FileNotFoundError:
            continue
        out[rel] = (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)
    return out


def _changes(root: str) -> list[tuple[str, list[str]]]:
    os.mkdir(f"{root}/d")
    os.mkdir(f"{root}/e")
    result = []
    for name, op in OPS:
        before = _times(root)
        time.sleep(0.02)  # ext4 takes times from a coarse clock
        op(root)
        after = _times(root)
        moved = sorted(f"{rel}.{which}" for rel in before.keys() & after.keys()
                       for which, b, a in zip("amc", before[rel], after[rel]) if a != b)
        result.append((name, moved))
    return result


def test_timestamps_move_as_on_ext4(afs: Mount, ext4_dir: str) -> None:
    os.mkdir(afs / "t")
    got = _changes(afs / "t")
    want = _changes(ext4_dir)
    mismatches = [(g[0], g[1], w[1]) for g, w in zip(got, want) if g != w]
    assert not mismatches, "step, atomicfs, ext4:\n" + "\n".join(map(repr, mismatches))
    steps = dict(got)
    assert steps["write"] == ["d/f.c", "d/f.m"]
    assert steps["chmod"] == ["d/f.c"]
