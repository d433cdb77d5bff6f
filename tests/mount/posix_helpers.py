"""Helpers for the POSIX, persistence, ENOSPC and bad-input mount tests.

`ext4_dir` is a kernel ext4 on a loop device: the reference the errno values of atomicfs are
compared with, in the same test run. `afs` mounts atomicfs over an image file and over a
loop device (the test runs once for each).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import pickle
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import Mount, MountFactory, cli, kernel_fs, make_image, need

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
NOBODY = 65534


def renameat2(old: str, new: str, flags: int) -> None:
    """rename(2) with flags (glibc has no Python binding for it)."""
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old)


def outcome(fn: Callable[[], Any]) -> Any:
    """fn's result, or the errno name it failed with: comparable across filesystems."""
    try:
        return fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


Step = tuple[str, Callable[[str], Any]]


def run_steps(root: str, steps: list[Step]) -> list[tuple[str, Any]]:
    """Each step's outcome on the tree at root, labelled."""
    return [(name, outcome(lambda: fn(root))) for name, fn in steps]


def compare_steps(got: list[tuple[str, Any]], want: list[tuple[str, Any]]) -> None:
    mismatches = [(g[0], g[1], w[1]) for g, w in zip(got, want) if g != w]
    assert not mismatches, "step, atomicfs, ext4:\n" + "\n".join(map(repr, mismatches))


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def ext4_root(mount_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernel ext4 on a loop device, for reference behaviour."""
    need(shutil.which("mkfs.ext4"), "mkfs.ext4 (package e2fsprogs)")
    # as atomicfs: 4 KiB blocks
    with kernel_fs(tmp_path_factory.mktemp("ext4"), 256 << 20,
                   ["mkfs.ext4", "-q", "-F", "-b", "4096"]) as mnt:
        os.chmod(mnt, 0o755)
        yield mnt


@pytest.fixture
def ext4_dir(ext4_root: str) -> Iterator[str]:
    """A fresh, empty directory on the reference ext4, removed after the test."""
    path = os.path.join(ext4_root, uuid.uuid4().hex)
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["image", "loop"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A formatted atomicfs target: an image file, or a loop device."""
    if request.param == "image":
        return make_image(tmp_path / "fs.img")
    dev: str = request.getfixturevalue("loop_device")
    cli("mkfs", dev)
    return dev


@pytest.fixture
def afs(backing: str, mounter: MountFactory) -> Mount:
    """atomicfs mounted with allow_other over each kind of backing."""
    return mounter(backing, "allow_other")


# ------------------------------------------------------------------ another user's view

def as_user(fn: Callable[[], Any], uid: int = NOBODY, gid: int = NOBODY,
            cwd: str | None = None, umask: int = 0o022) -> Any:
    """Run fn in a forked child with the given ids (no supplementary groups) and return
    its result; OSErrors come back as their errno names (see `outcome`). The child enters
    cwd while still root: the test's temporary directories are private to root, so
    another user can only reach the tree through relative paths."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            if cwd is not None:
                os.chdir(cwd)
            os.umask(umask)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result: Any = outcome(fn)
            payload = pickle.dumps(("ok", result))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = pickle.dumps(("error", repr(exc)))
            code = 1
        with os.fdopen(wfd, "wb") as out:
            out.write(payload)
        os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind != "ok":
        raise AssertionError(f"child as uid {uid} failed: {value}")
    return value


def tree_state(root: str) -> dict[str, tuple[Any, ...]]:
    """Everything stat and xattrs say about each path under root (no data is read, so no
    access time moves)."""
    state: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                xattrs = tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)))
            state[rel] = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_size,
                          st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev, target,
                          xattrs)
    return state
