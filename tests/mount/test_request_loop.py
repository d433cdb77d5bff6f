"""The daemon's request loop (atomicfs/fuseloop.py) on real mounts: requests are still read
while handlers block on the device, its poll catches requests that come back to back, and
the end of the session reaches every worker, blocked, idle or waiting on /dev/fuse."""
from __future__ import annotations

import os
import threading
import time

from tests.conftest import Mount, MountFactory, cli, run


def _daemon_gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def _block_many_workers(m: Mount, n: int) -> None:
    """n fsyncs at once against a slow device: each holds a worker until it completes, so
    the daemon ends up with at least n workers, most of them idle afterwards."""
    def one(i: int) -> None:
        fd = os.open(m / f"w{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]


def test_loop_reports_itself(image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    loop = m.stat()["request_loop"]
    assert loop["loop"] == "atomicfs"
    assert loop["poll_max_us"] == (100 if len(os.sched_getaffinity(0)) > 1 else 0)
    assert m.stat()["options"]["request_poll_us"] == 100
    m.umount()
    m = mounter(image, "request_poll_us=0")  # never polls
    for i in range(200):
        os.close(os.open(m / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
    loop = m.stat()["request_loop"]
    assert (loop["poll_max_us"], loop["polls_caught"], loop["waits_slept"]) == (0, 0, 0)


def test_poll_catches_back_to_back_requests(mnt: Mount) -> None:
    """A create is four requests in a row (lookup, the directory's getattr, create,
    release): the poll after each reply catches most of the next ones without sleeping."""
    if not mnt.stat()["request_loop"]["poll_max_us"]:
        return  # one CPU: no polling, asserted by test_loop_reports_itself
    before = mnt.stat()["request_loop"]
    d = mnt / "d"
    os.mkdir(d)
    for i in range(500):
        os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    after = mnt.stat()["request_loop"]
    caught = after["polls_caught"] - before["polls_caught"]
    assert caught > 200, (before, after)


def test_requests_are_read_while_a_handler_blocks(image: str, mounter: MountFactory) -> None:
    """With a device that takes 1 s per request, an fsync blocks its worker for seconds;
    meanwhile another worker reads and answers a hundred metadata requests (the worker
    that read the fsync woke it when the fsync blocked)."""
    m = mounter(image, "delay=1000")
    with open(m / "f", "wb") as f:
        f.write(b"x" * 4096)
    for i in range(100):  # pyfuse3 starts a worker per request read, up to 64: after these
        os.path.exists(m / f"absent{i}")  # a blocked handler's hand-off is all there is
    done = threading.Event()

    def fsync() -> None:
        fd = os.open(m / "f", os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            done.set()
    t = threading.Thread(target=fsync)
    t.start()
    try:
        time.sleep(0.2)  # the fsync is in the daemon, waiting for the device
        assert not done.is_set()
        for i in range(100):
            os.mkdir(m / f"d{i}")  # each a lookup and a mkdir; nothing waits for the device
        assert not done.is_set(), "the metadata requests waited for the fsync"
    finally:
        t.join()


def test_umount_ends_idle_workers(image: str, mounter: MountFactory) -> None:
    """After a burst of blocking requests most workers are idle, waiting for work in the
    loop and not on /dev/fuse: `atomicfs umount` still ends the daemon."""
    m = mounter(image, "delay=50")
    _block_many_workers(m, 12)
    pid = m.pid
    res = cli("umount", m.path, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert _daemon_gone(pid, 10)


def test_kernel_umount_ends_the_daemon(image: str, mounter: MountFactory) -> None:
    """umount(8) by root (the kernel ends the connection; the daemon learns it from a
    read): idle workers and the one waiting on /dev/fuse all return, the daemon exits."""
    m = mounter(image, "delay=50")
    _block_many_workers(m, 12)
    pid = m.pid
    run("umount", m.path)
    assert _daemon_gone(pid, 30), "the daemon did not exit after umount(8)"
    assert not m.alive

