"""A recording block device for any filesystem: one file served over FUSE, a loop device
over it.

`atomicfs -o record=` records atomicfs's own device requests; a kernel filesystem has no
such hook. This module serves a single file, `disk`, whose contents live in an image file,
and logs every write that reaches it (submission and completion, with the data) and every
fsync (flush start and end) in the Recorder format that atomicfs.crashtest.recording reads.
A loop device over that file (buffered: the loop driver turns each block request into a
write of the file, and a cache flush, PREFLUSH or FUA into an fsync) is then a block device
whose every write and flush is recorded, for ext4, XFS, atomicfs or anything else, and the
crash explorer's state generator and oracles apply unchanged.

The server runs in its own process (`python -m atomicfs.crashtest.blockdev IMAGE
MOUNTPOINT RECORDING READY_FD`), so that a filesystem stuck on the loop device can never
hold up the process that serves it; `recording_device()` starts it, attaches the loop
device and undoes both, whatever happens.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import pyfuse3
import trio

from atomicfs.crashtest.env import detach_loop, mounted_fstype, run, wait_gone
from atomicfs.device import Recorder
from atomicfs.errors import UserError

log = logging.getLogger(__name__)

DISK_NAME = b"disk"
DISK_INODE = pyfuse3.ROOT_INODE + 1
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class RecordingDisk(pyfuse3.Operations):
    """The one-file filesystem. Requests are handled one at a time (no awaits inside), so
    the recording's order is the order in which the device saw them."""

    enable_writeback_cache = False  # every write must reach us when the loop driver issues it

    def __init__(self, image_fd: int, record_fd: int) -> None:
        super().__init__()
        self.image_fd = image_fd
        self.record_fd = record_fd
        self.size = os.fstat(image_fd).st_size
        self.seq = 0

    def _event(self, kind: bytes, offset: int = 0, data: bytes = b"", ref: int = 0,
               length: int | None = None) -> int:
        self.seq += 1
        head = Recorder.pack(kind, self.seq, offset, len(data) if length is None else length,
                             0, time.monotonic_ns(), ref)
        os.writev(self.record_fd, [head, data] if data else [head])
        return self.seq

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode = stat.S_IFDIR | 0o755
            e.st_nlink = 2
        elif inode == DISK_INODE:
            e.st_mode = stat.S_IFREG | 0o600
            e.st_nlink = 1
            e.st_size = self.size
            e.st_blksize = 4096
            e.st_blocks = (self.size + 511) // 512
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        e.attr_timeout = e.entry_timeout = 3600.0
        return e

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE or name != DISK_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(DISK_INODE)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size and attr.st_size != self.size:
            raise pyfuse3.FUSEError(errno.EPERM)  # a disk does not change its size
        return self._attr(inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return 0

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, DISK_NAME, self._attr(DISK_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        if inode != DISK_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.image_fd, max(0, min(size, self.size - off)), off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if off + len(buf) > self.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        submit = self._event(Recorder.WRITE_SUBMIT, off, length=len(buf))
        os.pwrite(self.image_fd, buf, off)
        self._event(Recorder.WRITE, off, bytes(buf), ref=submit)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        # The recording, not the image, is what the explorer replays: nothing to sync.
        self._event(Recorder.FLUSH_END, ref=self._event(Recorder.FLUSH_START))

    async def flush(self, fh: int) -> None:
        return None  # close(2), not a cache flush

    async def release(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = self.size // 4096
        s.f_files = 2
        s.f_namemax = 255
        return s


def serve(image: str, mountpoint: str, recording: str, ready_fd: int) -> int:
    """The server process: mount, say "ready" on ready_fd, serve until unmounted."""
    logging.basicConfig(level=logging.WARNING, format="recording device: %(message)s")
    image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    record_fd = Recorder.open(recording)
    ops = RecordingDisk(image_fd, record_fd)
    opts = set(pyfuse3.default_options) | {"fsname=atomicfs-recorder", "allow_other"}
    try:
        pyfuse3.init(ops, mountpoint, opts)
    except RuntimeError as exc:
        os.write(ready_fd, f"cannot mount on {mountpoint}: {exc}".encode())
        return 1
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
        os.close(image_fd)
        os.close(record_fd)
    return 0


@contextlib.contextmanager
def recording_device(image: str, recording: str, workdir: str) -> Iterator[str]:
    """A loop device over image whose every write and flush goes into recording."""
    mnt = tempfile.mkdtemp(prefix="recdev-", dir=workdir)
    proc = _start_server(image, mnt, recording)
    dev = ""
    try:
        # Buffered (no --direct-io): the loop driver then fsyncs the file on every flush.
        dev = run(["losetup", "--find", "--show", os.path.join(mnt, "disk")]).stdout.strip()
        yield dev
    finally:
        if dev:
            detach_loop(dev)
        _stop_server(proc, mnt)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)


def _start_server(image: str, mnt: str, recording: str) -> subprocess.Popen[bytes]:
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atomicfs.crashtest.blockdev", image, mnt, recording,
             str(wfd)], pass_fds=(wfd,), stdin=subprocess.DEVNULL)
    finally:
        os.close(wfd)
    try:
        ready, _, _ = select.select([rfd], [], [], START_TIMEOUT)
        message = os.read(rfd, 4096).decode(errors="replace") if ready else "no answer"
    finally:
        os.close(rfd)
    if message != "ready":
        _stop_server(proc, mnt)
        raise UserError(f"the recording device did not start: {message or 'it died'}")
    return proc


def _stop_server(proc: subprocess.Popen[bytes], mnt: str) -> None:
    if mounted_fstype(mnt) is not None:
        run(["fusermount3", "-u", mnt], check=False)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log.warning("the recording device did not stop; killing it")
        proc.send_signal(signal.SIGKILL)
        wait_gone(proc.pid)
        proc.wait()
        run(["fusermount3", "-u", "-z", mnt], check=False)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m atomicfs.crashtest.blockdev IMAGE MOUNTPOINT RECORDING "
              "READY_FD",
              file=sys.stderr)
        return 2
    return serve(argv[0], argv[1], argv[2], int(argv[3]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
