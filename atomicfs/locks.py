"""Exclusive access on this host to the object under a target, whatever path reaches it.

A filesystem can be reached as an image file (directly, through a symlink or a bind mount),
as a loop device over that file (one or several), or as a partition of such a loop device.
Each path is locked where all the others meet it:

* an image file: an exclusive flock(2) on the file itself (shared for read-only opens),
  which the kernel keys on the inode, so every name and bind mount of it conflicts;
* a block device: O_EXCL, which the kernel enforces against other O_EXCL openers, mounted
  filesystems and claims of the whole disk or its partitions (Device.open takes it);
* a loop device: also the flock of its backing file (found through sysfs and checked
  against the device and inode numbers the loop driver reports), so an image mount and a
  loop mount of one file exclude each other;
* and for both, every *other* loop device over the same file is probed with O_EXCL: one
  that is in use (mounted, or opened by a daemon) refuses the open.

Each side takes its own lock before probing the others, so of two concurrent openers at
least one sees the other. What this cannot see (another host, a backing file whose name is
gone) is left to the on-disk owner record (atomicfs.owner).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterator

log = logging.getLogger(__name__)

LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: device, inode, rdevice, offset, sizelimit, number, encrypt type,
# encrypt key size, flags, file name, crypt name, encrypt key, init[2]
_LOOP_INFO64 = struct.Struct("<QQQQQIIII64s64s32s16s")
SYS_BLOCK = "/sys/block"


class Busy(Exception):
    """Another opener holds the object; the message says through what, if known."""


@dataclass(frozen=True)
class FileId:
    dev: int
    ino: int


@dataclass
class LoopDevice:
    name: str  # loop5
    backing_path: str  # as sysfs reports it (may be stale: renamed, deleted)
    backing: FileId | None

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


@dataclass
class HostLock:
    """Descriptors held for the life of an opened target (a loop device's backing file)."""

    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def take(path: str, fd: int, st: os.stat_result, readonly: bool) -> HostLock:
    """Lock what lies under the target opened as fd; Busy if another opener holds it."""
    held = HostLock()
    try:
        if stat.S_ISREG(st.st_mode):
            _flock(fd, readonly, "the image")
            _probe_loops(FileId(st.st_dev, st.st_ino), skip=None)
            return held
        loop, partition = _loop_of(st.st_rdev)
        if loop is None or loop.backing is None:
            return held
        if not partition:  # a partition may share its file with others: O_EXCL suffices
            bfd = _open_backing(loop)
            if bfd is not None:
                held.fds.append(bfd)
                _flock(bfd, readonly, f"its backing file {loop.backing_path}")
        _probe_loops(loop.backing, skip=loop.name)
        return held
    except BaseException:
        held.release()
        raise


def _flock(fd: int, readonly: bool, what: str) -> None:
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = flock_holder(os.fstat(fd))
        raise Busy(f"{what} is locked" + (f" by pid {pid} ({_comm(pid)})" if pid else "")
                   ) from None


def _probe_loops(backing: FileId, skip: str | None) -> None:
    """Busy if a loop device over backing (other than skip) is held exclusively."""
    for loop in loop_devices():
        if loop.name == skip or loop.backing != backing:
            continue
        try:
            os.close(os.open(loop.path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                try:
                    user = kernel_user(os.stat(loop.path).st_rdev)
                except OSError:
                    user = None
                raise Busy(f"through {loop.path}, a loop device over the same file"
                           + (f", {user}" if user else "")) from None
            log.debug("cannot probe %s: %s", loop.path, exc)


def loop_devices() -> Iterator[LoopDevice]:
    """The bound loop devices of this host."""
    try:
        names = sorted(n for n in os.listdir(SYS_BLOCK) if n.startswith("loop"))
    except OSError:
        return
    for name in names:
        loop = _loop_device(name)
        if loop is not None:
            yield loop


def _loop_device(name: str) -> LoopDevice | None:
    try:
        with open(os.path.join(SYS_BLOCK, name, "loop", "backing_file")) as f:
            backing_path = f.read().rstrip("\n")
    except OSError:  # not bound
        return None
    return LoopDevice(name, backing_path, _backing_id(f"/dev/{name}", backing_path))


def _backing_id(dev_path: str, backing_path: str) -> FileId | None:
    """The device and inode numbers of a loop device's backing file: the loop driver's
    own (valid even if the file was renamed or deleted), else those of the name sysfs
    reports (for callers who may not open the loop device)."""
    try:
        fd = os.open(dev_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
        finally:
            os.close(fd)
        lo_device, lo_inode = _LOOP_INFO64.unpack(raw)[:2]
        return FileId(_decode_kernel_dev(lo_device), lo_inode)
    except OSError:
        pass
    try:
        st = os.stat(backing_path)
    except OSError:
        return None
    return FileId(st.st_dev, st.st_ino)


def _decode_kernel_dev(dev: int) -> int:
    """The kernel's huge_encode_dev() form (as in loop_info64) as a user-space st_dev."""
    major = (dev & 0xFFF00) >> 8
    minor = (dev & 0xFF) | ((dev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _loop_of(rdev: int) -> tuple[LoopDevice | None, bool]:
    """The loop device a block device is, or is a partition of (then True)."""
    sys_dir = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    try:
        real = os.path.realpath(sys_dir)
    except OSError:
        return None, False
    partition = os.path.exists(os.path.join(real, "partition"))
    whole = os.path.basename(os.path.dirname(real) if partition else real)
    if not whole.startswith("loop"):
        return None, partition
    return _loop_device(whole), partition


def _open_backing(loop: LoopDevice) -> int | None:
    """A descriptor of the loop device's backing file, if its name still leads to it."""
    try:
        fd = os.open(loop.backing_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        log.info("%s: cannot open its backing file %s (%s); relying on O_EXCL and the "
                 "owner record", loop.path, loop.backing_path, exc.strerror)
        return None
    st = os.fstat(fd)
    if FileId(st.st_dev, st.st_ino) != loop.backing or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        log.info("%s: %s is no longer its backing file", loop.path, loop.backing_path)
        return None
    return fd


def kernel_user(rdev: int) -> str | None:
    """What in the kernel holds a block device: a mount of it, or a device stacked on it."""
    key = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == key and " - " in line:
                    fstype = line.split(" - ", 1)[1].split()[0]
                    return f"mounted on {fields[4]} ({fstype})"
    except OSError:
        pass
    try:
        holders = sorted(os.listdir(f"/sys/dev/block/{key}/holders"))
    except OSError:
        holders = []
    return f"held by {', '.join(holders)}" if holders else None


def flock_holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the file of st, from /proc/locks (None if not found)."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == key:
                    return int(parts[4]) or None
    except (OSError, ValueError):
        pass
    return None


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
