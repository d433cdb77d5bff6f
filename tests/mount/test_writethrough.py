"""Write-through writes and stable pages on real mounts."""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time

import ctypes

import pytest

from tests.conftest import MountFactory, cli

U = 16384
SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_odsync_write_is_durable_when_it_returns(image: str, mounter: MountFactory) -> None:
    """O_DSYNC writes, then SIGKILL at once: every returned write is there (both an
    atomic file, through the log, and a plain file, in place)."""
    m = mounter(image)
    os.mkdir(m / "atomic")
    os.setxattr(m / "atomic", "user.atomicfs.atomic_unit", str(U).encode())
    payload = {}
    for name in ("atomic/f", "plain"):
        fd = os.open(m / name, os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
        for i in range(20):
            data = bytes([i + 1]) * U
            os.pwrite(fd, data, i * U)
            payload[(name, i)] = data
        os.close(fd)
    assert m.counters()["writethrough_writes"] >= 40
    m.kill()
    m2 = mounter(image)
    for (name, i), data in payload.items():
        with open(m2 / name, "rb") as f:
            f.seek(i * U)
            assert f.read(U) == data, (name, i)


def test_writethrough_xattr_and_mount_option(image: str, mounter: MountFactory) -> None:
    m = mounter(image, "writethrough")
    with open(m / "f", "wb") as f:
        f.write(b"a" * 50_000)
    st = m.stat()
    assert st["counters"]["writethrough_writes"] >= 1
    assert m.stat("f")["writethrough"] is True
    assert st["cache"]["dirty_bytes"] == 0
    m.umount()
    m2 = mounter(image)
    os.mkdir(m2 / "d")
    os.setxattr(m2 / "d", "user.atomicfs.writethrough", b"1")
    with open(m2 / "d/g", "wb") as f:
        f.write(b"b" * 8192)
    assert m2.stat("d/g")["writethrough"] is True
    assert m2.stat()["cache"]["dirty_bytes"] == 0


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_partial_folio_stays_dirty_for_blocks_not_written(image: str,
                                                          mounter: MountFactory) -> None:
    """A folio (64 KiB here) written through in part: only the blocks written go out; the
    folio's other dirty blocks stay dirty. (Write-through by the xattr: with O_DSYNC the
    kernel follows each write with an fsync of the whole file, as FUSE carries no range.)"""
    m = mounter(image, "dirty_expire=3600")
    path = m / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"d" * 4096, 0)  # buffered: block 0 of folio 0 dirty
    os.setxattr(path, "user.atomicfs.writethrough", b"1")
    before = m.stat()["cache"]["dirty_bytes"]
    os.pwrite(fd, b"w" * 4096, 5 * 4096)  # block 5 of the same folio, written through
    os.close(fd)
    st = m.stat("f")
    assert st["writethrough"] is True
    assert st["folios"]["dirty"] == 1
    assert m.stat()["cache"]["dirty_bytes"] == before == 4096
    assert m.counters()["writethrough_writes"] == 1
    m.kill()
    m2 = mounter(image)
    with open(m2 / "f", "rb") as f:
        data = f.read()
    assert data[5 * 4096: 6 * 4096] == b"w" * 4096  # durable
    assert data[:4096] in (b"d" * 4096, bytes(4096))  # never written back: maybe lost


@pytest.mark.parametrize("path, inject", [("in place", "data:1"), ("log", "log:1")])
@pytest.mark.daemon_log(allow=[
    r"^(writeback of inode|log write of batch) \d+ failed: .* write at \d+ failed: Input/output"])
def test_eio_fails_the_write_itself_and_is_not_reported_again(image: str, mounter: MountFactory,
                                                              path: str, inject: str) -> None:
    """An I/O error fails the write-through itself; a later fsync, which writes the data
    that stayed dirty (in place) or rewrites the failed log batch (log), does not report
    it again."""
    m = mounter(image, "inject=off")
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    try:
        os.pwrite(fd, b"1" * 8192, 0)  # a small new write: into the log (resident)
        if path == "in place":
            m.control("sync")  # checkpoint: the blocks are home, no longer resident
        else:
            m.control("commit")  # nothing pending: the next log write is this write's
        m.control(f"inject={inject}")
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"2" * 8192, 0)
        assert exc.value.errno == errno.EIO
        os.fsync(fd)  # the write's own error is not reported again
        assert os.pread(fd, 8192, 0) == b"2" * 8192
        os.pwrite(fd, b"3" * 8192, 0)
        assert os.pread(fd, 8192, 0) == b"3" * 8192
    finally:
        os.close(fd)
    assert m.counters()["writeback_errors"] >= 1
    m.umount()
    assert cli("fsck", image).returncode == 0


def test_writethroughs_to_different_files_overlap(image: str, mounter: MountFactory) -> None:
    """With every device write taking 300 ms, two write-throughs of data that has a home
    (written in place) to different files take about 300 ms, not 600; and the daemon
    serves other requests meanwhile."""
    m = mounter(image, "testing")  # the delay= control below
    for i in range(2):  # homes for the data: more than a small sync write, so in place
        with open(m / f"f{i}", "wb") as f:
            f.write(b"x" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    with open(m / "other", "wb") as f:
        f.write(b"o" * 4096)
    m.control("checkpoint")  # nothing resident in the log any more
    m.control("delay=300")
    fds = [os.open(m / f"f{i}", os.O_RDWR | os.O_DSYNC) for i in range(2)]
    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=os.pwrite, args=(fd, b"y" * 4096, 8192))
                   for fd in fds]
        [t.start() for t in threads]
        time.sleep(0.05)
        t1 = time.monotonic()
        os.stat(m / "other")
        with open(m / "other", "rb") as f:
            assert f.read() == b"o" * 4096
        served = time.monotonic() - t1
        [t.join() for t in threads]
        elapsed = time.monotonic() - t0
    finally:
        m.control("delay=0")
        for fd in fds:
            os.close(fd)
    assert served < 0.2, f"other requests waited for the write-throughs ({served:.2f}s)"
    assert elapsed < 0.55, f"write-throughs to two files did not overlap ({elapsed:.2f}s)"


def test_concurrent_durable_writers_share_log_batches(tmp_path, mounter: MountFactory) -> None:
    """Group commit: four O_DSYNC writers to atomic files need fewer log batches (and so
    fewer flushes) than writes."""
    from tests.conftest import make_image
    img = make_image(tmp_path / "fs.img", "256M", "--atomic-unit", "16k")
    m = mounter(img, "delay=5")
    stop = time.monotonic() + 2.0
    counts = [0] * 4

    def writer(i: int) -> None:
        fd = os.open(m / f"f{i}", os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
        try:
            n = 0
            while time.monotonic() < stop:
                os.pwrite(fd, bytes([i]) * U, (n % 64) * U)
                n += 1
            counts[i] = n
        finally:
            os.close(fd)

    before = m.counters()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    after = m.counters()
    writes = after["writethrough_writes"] - before["writethrough_writes"]
    batches = after["log_batches"] - before["log_batches"]
    assert writes == sum(counts)
    assert batches < 0.8 * writes, (batches, writes)


def test_stable_wait_for_a_writer_on_a_folio_under_writethrough(image: str,
                                                                mounter: MountFactory) -> None:
    """A shared-mmap writer whose page is under a write-through waits until that write
    completes, then its data wins (made deterministic by a 1 s device)."""
    m = mounter(image, "delay=1000", "dirty_expire=3600")
    path = m / "f"
    with open(path, "wb") as f:
        f.write(b"0" * 8192)
        f.flush()
        os.fsync(f.fileno())
    done: dict[str, float] = {}

    def writethrough() -> None:
        fd = os.open(path, os.O_RDWR | os.O_DSYNC)
        try:
            os.pwrite(fd, b"A" * 4096, 0)
        finally:
            done["A"] = time.monotonic()
            os.close(fd)

    t = threading.Thread(target=writethrough)
    t.start()
    time.sleep(0.3)  # A is in flight on the slow device
    assert m.stat("f")["folios"]["stable"] == 1
    assert m.stat("f")["folios"]["writethrough_inflight"] == 1
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
        mm[0:4096] = b"B" * 4096
        # Start writeback of the page without the inode lock that msync/fsync take (which
        # would make the kernel serialise B behind A before the daemon ever sees it).
        assert _libc.sync_file_range(fd, 0, 8192, SYNC_FILE_RANGE_WRITE) == 0
        mm.flush()  # and wait for it
        done["B"] = time.monotonic()
        mm.close()
    finally:
        os.close(fd)
    t.join()
    assert done["B"] >= done["A"] - 0.05, "B modified the folio while A's write was in flight"
    c = m.counters()
    assert c["stable_waits"] >= 1
    assert c["stable_wait_ns"] > 0.2e9  # B waited for the rest of A's slow write
    assert m.stat("f")["folios"]["stable"] == 0
    os.sync()
    with open(path, "rb") as f:
        assert f.read(4096) == b"B" * 4096  # B came last: its data wins


def test_debug_mode_checks_stable_buffers(image: str, mounter: MountFactory) -> None:
    """debug: buffers under stable I/O are checksummed before and after; a normal run of
    write-throughs passes the check."""
    m = mounter(image, "debug")
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    try:
        for i in range(30):
            os.pwrite(fd, bytes([i]) * 12288, i * 4096)
    finally:
        os.close(fd)
    assert m.counters()["writeback_errors"] == 0
    m.umount()
    assert cli("fsck", image).returncode == 0


def test_checkpoint_writes_home_every_block_of_partly_overwritten_log_records(
        image: str, mounter: MountFactory) -> None:
    """A record in the log partly overwritten by a newer one: the blocks only the older
    record holds must still reach their home before the log moves past it."""
    m = mounter(image)
    path = m / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    try:
        os.pwrite(fd, b"a" * 4096 + b"b" * 4096 + b"c" * 4096 + b"d" * 4096, 0)  # logged
        os.pwrite(fd, b"B" * 4096, 4096)  # a newer record over block 1 only
    finally:
        os.close(fd)
    assert m.stat()["log"]["resident_folios"] >= 1
    m.control("checkpoint")
    m.control("drop_caches")
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
    with open(path, "rb") as f:
        assert f.read() == b"a" * 4096 + b"B" * 4096 + b"c" * 4096 + b"d" * 4096
    m.umount()
    m2 = mounter(image)
    with open(m2 / "f", "rb") as f:
        assert f.read() == b"a" * 4096 + b"B" * 4096 + b"c" * 4096 + b"d" * 4096


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_fsync_during_a_home_copy_still_writes_the_folios_other_blocks(
        image: str, mounter: MountFactory) -> None:
    """A checkpoint copying a folio's logged blocks home holds the folio (as writeback of
    no dirty blocks). An fsync meanwhile must wait and write the folio's other dirty
    blocks; it used to skip the busy folio and return without them."""
    m = mounter(image, "testing")  # the delay= control below
    path = m / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    os.pwrite(fd, b"a" * 4096, 0)  # small new data with O_DSYNC: into the log
    os.close(fd)
    assert m.stat()["log"]["resident_folios"] >= 1
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"b" * 4096, 8192)  # buffered, in the same folio: dirty
        m.control("delay=400")  # every device write now takes 0.4 s

        def checkpoint() -> None:
            try:
                m.control("checkpoint")
            except OSError:
                pass  # the daemon is killed below
        t = threading.Thread(target=checkpoint)
        t.start()
        deadline = time.monotonic() + 30
        while m.stat("f")["folios"]["writeback"] == 0:  # the home copy holds the folio
            assert time.monotonic() < deadline, "the checkpoint never wrote the folio home"
            time.sleep(0.002)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.kill()
    t.join(60)
    m2 = mounter(image)
    with open(m2 / "f", "rb") as f:
        assert f.read() == b"a" * 4096 + bytes(4096) + b"b" * 4096
