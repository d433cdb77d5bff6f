"""Shared fixtures: real images, loop devices, an XFS host for the hardware path, and real
atomicfs mounts driven through the `atomicfs` command.

In CI (CI=true) a missing /dev/fuse, loop device support or root is a failure, not a skip.
Every mount, loop device and daemon a test starts is torn down even when the test fails; a
session finaliser sweeps up anything left under the test's temporary directories.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from atomicfs.crashtest.env import kill_daemon
from atomicfs.crashtest.env import mounted_fstype as mounted_at  # the type mounted at a path

pytest_plugins = ["tests.daemonlog_plugin", "pytester"]

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ATOMICFS = [sys.executable, "-m", "atomicfs"]
_SESSION_LOOPS: list[str] = []
_SESSION_DIRS: list[str] = []


def need(condition: Any, why: str) -> None:
    """Skip when a requirement is missing, except in CI, where it fails the test."""
    if condition:
        return
    if CI:
        pytest.fail(f"CI requires {why}", pytrace=False)
    pytest.skip(f"needs {why}")


def cli(*args: str, check: bool = True, timeout: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run `atomicfs ARGS`; with check, fail the test with its stderr on non-zero exit."""
    res = subprocess.run(ATOMICFS + list(args), capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        pytest.fail(f"atomicfs {' '.join(args)} exited {res.returncode}: {res.stderr.strip()}",
                    pytrace=False)
    return res


def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


# --------------------------------------------------------------------------- environment

@pytest.fixture(scope="session")
def mount_env() -> None:
    need(os.geteuid() == 0, "root (loop devices and FUSE mounts)")
    need(os.path.exists("/dev/fuse"), "/dev/fuse")
    need(shutil.which("fusermount3"), "fusermount3 (package fuse3)")
    need(shutil.which("losetup"), "losetup (package util-linux)")


def make_image(path: Path | str, size: str = "256M", *mkfs_args: str) -> str:
    """A sparse image file formatted with atomicfs."""
    cli("mkfs", str(path), "--size", size, *mkfs_args)
    return str(path)


@pytest.fixture
def image(tmp_path: Path) -> str:
    """A formatted 256 MiB sparse image file."""
    return make_image(tmp_path / "fs.img")


def attach_loop(backing: str) -> str:
    dev = run("losetup", "--find", "--show", "--direct-io=on", backing).stdout.strip()
    _SESSION_LOOPS.append(dev)
    return dev


def detach_loop(dev: str) -> None:
    for _ in range(50):
        res = run("losetup", "-d", dev, check=False)
        if res.returncode == 0 or "No such device" in res.stderr:
            break
        time.sleep(0.1)
    if dev in _SESSION_LOOPS:
        _SESSION_LOOPS.remove(dev)


@pytest.fixture
def loop_device(mount_env: None, tmp_path: Path) -> Iterator[str]:
    """A loop device over a fresh 256 MiB sparse file (not formatted)."""
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(256 << 20)
    dev = attach_loop(str(backing))
    try:
        yield dev
    finally:
        detach_loop(dev)


@contextlib.contextmanager
def kernel_fs(base: Path, size: int, mkfs: list[str]) -> Iterator[str]:
    """A kernel filesystem made by mkfs on a sparse image of size bytes under base, on a
    loop device, mounted; unmounted and detached afterwards."""
    img = base / "fs.img"
    with open(img, "wb") as f:
        f.truncate(size)
    run(*mkfs, str(img))
    mnt = base / "mnt"
    mnt.mkdir()
    dev = attach_loop(str(img))
    try:
        run("mount", dev, str(mnt))
        _SESSION_DIRS.append(str(mnt))
        try:
            yield str(mnt)
        finally:
            _unmount_kernel(str(mnt))
    finally:
        detach_loop(dev)


@pytest.fixture(scope="session")
def xfs_dir(mount_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A directory on kernel XFS (on a loop device), where image files report atomic
    write limits: the hardware path is tested there, for real."""
    need(shutil.which("mkfs.xfs"), "mkfs.xfs (package xfsprogs)")
    with kernel_fs(tmp_path_factory.mktemp("xfs"), 3 << 30,
                   ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]) as mnt:
        yield mnt


def _unmount_kernel(path: str) -> None:
    for _ in range(50):
        if mounted_at(path) is None:
            break
        if run("umount", path, check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        run("umount", "-l", path, check=False)
    if path in _SESSION_DIRS:
        _SESSION_DIRS.remove(path)


# --------------------------------------------------------------------------------- mounts

class Mount:
    """A live atomicfs mount started through the command line."""

    def __init__(self, target: str, path: str, options: list[str]) -> None:
        self.target = target
        self.path = path
        self.options = options
        self.pid = 0

    def __truediv__(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    def start(self) -> "Mount":
        args = ["mount", self.target, self.path]
        for opt in self.options:
            args += ["-o", opt]
        cli(*args, timeout=60)
        self.pid = int(self.stat()["pid"])
        from tests.daemonlog_plugin import watch_now  # registered by pytest_plugins
        watch_now()  # the daemon runs: its log is certain to be taken
        return self

    def stat(self, rel: str = "") -> dict[str, Any]:
        raw = os.getxattr(os.path.join(self.path, rel), "user.atomicfs.stat")
        return json.loads(raw)

    def counters(self) -> dict[str, int]:
        return self.stat()["counters"]

    def control(self, command: str) -> None:
        os.setxattr(self.path, "user.atomicfs.control", command.encode())

    @property
    def alive(self) -> bool:
        return mounted_at(self.path) == "fuse.atomicfs"

    def umount(self, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = cli("umount", self.path, check=check, timeout=300)
        return res

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and detach the dead mount."""
        kill_daemon(self.pid, self.path)

    def cleanup(self) -> None:
        if not self.alive:
            return
        try:
            res = cli("umount", self.path, check=False, timeout=120)
            if res.returncode == 0 and not self.alive:
                return
        except subprocess.TimeoutExpired:
            pass
        self.kill()


MountFactory = Callable[..., Mount]


@pytest.fixture
def mounter(mount_env: None, tmp_path: Path) -> Iterator[MountFactory]:
    """mounter(target, *options) mounts target on a fresh directory and returns a Mount;
    every mount is unmounted (or killed and detached) at the end of the test."""
    mounts: list[Mount] = []
    counter = [0]

    def factory(target: str, *options: str, path: str | None = None) -> Mount:
        if path is None:
            counter[0] += 1
            mp = tmp_path / f"mnt{counter[0]}"
            mp.mkdir(exist_ok=True)
            path = str(mp)
        m = Mount(target, path, list(options))
        mounts.append(m)
        _SESSION_DIRS.append(path)
        return m.start()

    try:
        yield factory
    finally:
        for m in reversed(mounts):
            m.cleanup()
            if m.path in _SESSION_DIRS:
                _SESSION_DIRS.remove(m.path)


@pytest.fixture
def mnt(image: str, mounter: MountFactory) -> Mount:
    """A fresh atomicfs on an image file, mounted."""
    return mounter(image)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Last line of defence: nothing a test started outlives the session."""
    for path in list(_SESSION_DIRS):
        fstype = mounted_at(path)
        if fstype == "fuse.atomicfs":
            run("fusermount3", "-u", "-z", path, check=False)
        elif fstype is not None:
            run("umount", "-l", path, check=False)
    for dev in list(_SESSION_LOOPS):
        run("losetup", "-d", dev, check=False)
