"""Where a crash test runs, and the real mounts it makes; everything it starts it stops.

Device kinds:

* `file`: image files in the working directory (default under /var/tmp);
* `loop`: the same images, mounted through loop devices (`losetup --direct-io=on`);
* `xfs`: image files on a kernel XFS mount, where statx reports atomic write limits, so
  atomicfs takes its hardware path (RWF_ATOMIC). If the working directory is not on XFS,
  a private XFS host is made (a sparse image, mkfs.xfs -m reflink=1, a loop device, a
  mount) and removed at the end.

Crash-state images are built in a scratch directory on tmpfs (/dev/shm) when there is
one: they are written once, checked, and deleted, and tmpfs supports O_DIRECT.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

from atomicfs.crashtest.states import sparse_copy
from atomicfs.errors import UserError

log = logging.getLogger(__name__)

XFS_MAGIC = 0x58465342
ATOMICFS = [sys.executable, "-m", "atomicfs"]
DEVICES = ("file", "loop", "xfs")
XFS_HOST_SIZE = 4 << 30


def run(args: list[str], timeout: float = 300, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).splitlines()
        raise UserError(f"{' '.join(args[:4])}...: exit {res.returncode}: "
                        f"{msg[-1] if msg else ''}")
    return res


def atomicfs_cli(*args: str, timeout: float = 300, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
    return run(ATOMICFS + list(args), timeout=timeout, check=check)


def is_xfs(path: str) -> bool:
    import ctypes
    import ctypes.util

    class Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return buf.f_type == XFS_MAGIC


def mounted_fstype(path: str) -> str | None:
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].replace("\\040", " ") == real:
                found = parts[2]
    return found


class Env:
    """Working directory, scratch space, device kind; an ExitStack of everything made."""

    def __init__(self, device: str = "file", workdir: str | None = None,
                 keep: bool = False) -> None:
        if device not in DEVICES:
            raise UserError(f"unknown device kind {device!r} (one of {', '.join(DEVICES)})")
        self.device = device
        self.keep = keep
        self._stack = contextlib.ExitStack()
        self._given_workdir = workdir
        self.workdir = ""
        self.datadir = ""  # where images live (on XFS for the xfs kind)
        self.scratch = ""
        self._counter = 0

    def __enter__(self) -> "Env":
        try:
            self._setup()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _setup(self) -> None:
        if self._given_workdir:
            os.makedirs(self._given_workdir, exist_ok=True)
            self.workdir = tempfile.mkdtemp(prefix="crash-", dir=self._given_workdir)
        else:
            self.workdir = tempfile.mkdtemp(prefix="atomicfs-crash-", dir="/var/tmp")
        if not self.keep:
            self._stack.callback(shutil.rmtree, self.workdir, True)
        self.datadir = self.workdir
        if self.device == "xfs" and not is_xfs(self.workdir):
            self.datadir = self._make_xfs_host()
        shm = "/dev/shm"
        if os.path.isdir(shm) and os.access(shm, os.W_OK):
            self.scratch = tempfile.mkdtemp(prefix="atomicfs-crash-", dir=shm)
            self._stack.callback(shutil.rmtree, self.scratch, True)
        else:
            self.scratch = os.path.join(self.workdir, "scratch")
            os.makedirs(self.scratch)

    # ---------------------------------------------------------------- devices

    def _make_xfs_host(self) -> str:
        if not shutil.which("mkfs.xfs"):
            raise UserError("--device xfs needs mkfs.xfs (package xfsprogs)")
        img = os.path.join(self.workdir, "xfs-host.img")
        with open(img, "wb") as f:
            f.truncate(XFS_HOST_SIZE)
        run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", img])
        dev = self.attach_loop(img)
        mnt = os.path.join(self.workdir, "xfs")
        os.makedirs(mnt)
        run(["mount", dev, mnt])
        self._stack.callback(self._umount_kernel, mnt)
        log.info("XFS host for the hardware path at %s on %s", mnt, dev)
        return mnt

    @staticmethod
    def _umount_kernel(path: str) -> None:
        for _ in range(50):
            if mounted_fstype(path) is None:
                return
            if run(["umount", path], check=False).returncode == 0:
                return
            time.sleep(0.1)
        run(["umount", "-l", path], check=False)

    def attach_loop(self, backing: str) -> str:
        """A loop device over backing, detached when the Env closes (or earlier)."""
        dev = run(["losetup", "--find", "--show", "--direct-io=on", backing]).stdout.strip()
        self._stack.callback(detach_loop, dev)
        return dev

    def new_path(self, name: str, scratch: bool = False) -> str:
        self._counter += 1
        return os.path.join(self.scratch if scratch else self.datadir,
                            f"{self._counter:04d}-{name}")

    def make_base(self, unit: int, size: str = "256M") -> str:
        """A freshly made atomicfs image (for loop: made through a loop device)."""
        path = self.new_path("base.img")
        if self.device == "loop":
            with open(path, "wb") as f:
                f.truncate(_parse_size(size))
            with self.target_for(path) as dev:
                atomicfs_cli("mkfs", dev, "--atomic-unit", str(unit))
        else:
            atomicfs_cli("mkfs", path, "--size", size, "--atomic-unit", str(unit))
        return path

    @contextlib.contextmanager
    def target_for(self, image: str) -> Iterator[str]:
        """What to mount for an image: itself, a loop device over it, or (xfs) a copy on
        the XFS host."""
        if self.device == "loop":
            dev = run(["losetup", "--find", "--show", "--direct-io=on", image]).stdout.strip()
            try:
                yield dev
            finally:
                detach_loop(dev)
        elif self.device == "xfs" and not os.path.realpath(image).startswith(
                os.path.realpath(self.datadir) + os.sep):
            copy = self.new_path("state.img")
            sparse_copy(image, copy)
            try:
                yield copy
            finally:
                os.unlink(copy)
        else:
            yield image


def detach_loop(dev: str) -> None:
    for _ in range(50):
        res = run(["losetup", "-d", dev], check=False)
        if res.returncode == 0 or "No such device" in res.stderr \
                or "not found" in res.stderr:
            return
        time.sleep(0.1)
    log.warning("could not detach %s", dev)


def _parse_size(text: str) -> int:
    from atomicfs.sizes import parse_size
    return parse_size(text)


# ---------------------------------------------------------------------------- mounts

class Mount:
    """A live `atomicfs mount`, stopped on exit of `mounted` whatever happened."""

    def __init__(self, target: str, path: str) -> None:
        self.target = target
        self.path = path
        self.pid = 0
        self.live = False

    def stat(self) -> dict:
        return json.loads(os.getxattr(self.path, "user.atomicfs.stat"))

    def umount(self) -> bool:
        """Write back and unmount; False if the daemon reported errors."""
        res = atomicfs_cli("umount", self.path, check=False, timeout=600)
        self.live = mounted_fstype(self.path) == "fuse.atomicfs"
        if res.returncode != 0:
            log.warning("umount %s: %s", self.path, res.stderr.strip())
        return res.returncode == 0 and not self.live

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and detach the dead mount."""
        kill_daemon(self.pid, self.path)
        self.live = False


def kill_daemon(pid: int, mountpoint: str) -> None:
    """The crash: SIGKILL the daemon (pid 0: none known), wait until it is gone, and
    detach its dead mount."""
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_gone(pid)
    run(["fusermount3", "-u", "-z", mountpoint], check=False)


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][0] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.01)


@contextlib.contextmanager
def mounted(env: Env, target: str, options: list[str]) -> Iterator[Mount]:
    path = env.new_path("mnt")
    os.makedirs(path)
    m = Mount(target, path)
    try:
        args = ["mount", target, path] + [a for o in options for a in ("-o", o)]
        atomicfs_cli(*args, timeout=120)
        m.live = True
        m.pid = int(m.stat()["pid"])
        yield m
    finally:
        if m.live or mounted_fstype(path) == "fuse.atomicfs":
            try:
                if not m.umount():
                    m.kill()
            except subprocess.TimeoutExpired:
                m.kill()
        if m.pid:
            wait_gone(m.pid)
        with contextlib.suppress(OSError):
            os.rmdir(path)
