"""The daemon's page cache on real mounts: bounded memory, writeback, throttling, errseq,
no stale reads, and the figures `atomicfs stat` reports."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
import time

import pytest

from tests.conftest import Mount, MountFactory, cli, make_image

MiB = 1 << 20


def _pattern(seed: int, n: int) -> bytes:
    """Deterministic, incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.blake2b(f"{seed}:{counter}".encode(), digest_size=64).digest()
        counter += 1
    return bytes(out[:n])


def test_many_times_the_cache_through_random_offsets(tmp_path, mounter: MountFactory) -> None:
    """200 MiB written at random offsets through a 16 MiB cache survive remount intact."""
    img = make_image(tmp_path / "fs.img", "512M")
    m = mounter(img, "cache_size=16M")
    size = 64 * MiB
    model = bytearray(size)
    rng = random.Random(7)
    written = 0
    with open(m / "big", "wb+") as f:
        f.truncate(size)
        while written < 200 * MiB:
            length = rng.choice([4096, 16384, 65536, 200_000, MiB])
            off = rng.randrange(0, size - length)
            data = _pattern(written, length)
            f.seek(off)
            f.write(data)
            model[off: off + length] = data
            written += length
    st = m.stat()
    assert st["cache"]["bytes"] <= st["cache"]["limit"] + 2 * MiB
    assert st["counters"]["cache_evictions"] > 0
    m.umount()
    assert cli("fsck", img).returncode == 0
    m2 = mounter(img, "cache_size=16M")
    with open(m2 / "big", "rb") as f:
        got = f.read()
    assert len(got) == size
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(model).hexdigest()


def test_dirty_limit_throttles_writers_instead_of_failing(tmp_path,
                                                          mounter: MountFactory) -> None:
    """A slow device and a small cache: writers wait at the dirty limit, none fails, and
    dirty data stays near the limit."""
    img = make_image(tmp_path / "fs.img", "256M")
    m = mounter(img, "cache_size=8M", "delay=30")
    limit = m.stat()["cache"]["limit"] // 2
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            c = m.stat()["cache"]
            peak[0] = max(peak[0], c["dirty_bytes"] + c["writeback_bytes"])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        data = _pattern(1, 32 * MiB)
        with open(m / "f", "wb") as f:
            for i in range(0, len(data), 256 * 1024):
                f.write(data[i: i + 256 * 1024])
    finally:
        stop.set()
        sampler.join()
    assert m.counters()["throttle_waits"] > 0
    # the limit holds up to one write in progress
    assert peak[0] <= limit + 1 * MiB, (peak[0], limit)
    with open(m / "f", "rb") as f:
        assert f.read() == data


@pytest.mark.daemon_log(allow=[
    r"^writeback of inode \d+ failed: .*data write at \d+ failed: Input/output error$"])
def test_background_writeback_error_reported_once_per_descriptor(image: str,
                                                                 mounter: MountFactory) -> None:
    """errseq: an EIO during background writeback comes back from the next fsync of every
    descriptor open at the time, once each; the data stays dirty and is written later."""
    m = mounter(image, "inject=off", "dirty_expire=3600")
    path = m / "f"
    data = _pattern(3, 200_000)
    fd1 = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    fd2 = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd1, data, 0)
        m.control("inject=data")
        m.control("flush")  # background writeback of everything: it fails
        m.control("inject=off")
        assert m.counters()["writeback_errors"] >= 1
        for fd in (fd1, fd2):
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
            os.fsync(fd)  # reported once: the second fsync succeeds
        fd3 = os.open(path, os.O_RDWR)  # opened after the error was seen: no error
        os.fsync(fd3)
        os.close(fd3)
    finally:
        os.close(fd1)
        os.close(fd2)
    m.umount()
    m2 = mounter(image)
    with open(m2 / "f", "rb") as f:
        assert f.read() == data  # the retry wrote it


@pytest.mark.daemon_log(allow=[
    r"^writeback of inode \d+ failed: .*data write at \d+ failed: Input/output error$"])
def test_fsync_reports_its_own_failed_writeback(image: str, mounter: MountFactory) -> None:
    m = mounter(image, "inject=off")
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        # more than a small sync write (which goes into the log): this goes in place
        os.pwrite(fd, b"x" * 400_000, 0)
        m.control("inject=data:1")
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        assert exc.value.errno == errno.EIO
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(m / "f", "rb") as f:
        assert f.read() == b"x" * 400_000


def test_no_stale_reads_across_descriptors(mnt: Mount) -> None:
    """Mixed writes, truncates and reads through two descriptors (one of them O_DIRECT)
    always see the latest data."""
    path = mnt / "f"
    rng = random.Random(11)
    model = bytearray()
    a = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    b = os.open(path, os.O_RDWR)
    d = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        aligned = mmap.mmap(-1, 65536)
        for step in range(600):
            fd = rng.choice([a, b])
            op = rng.random()
            if op < 0.45:
                off = rng.randrange(0, 600_000)
                data = _pattern(step, rng.randrange(1, 70_000))
                os.pwrite(fd, data, off)
                if len(model) < off:
                    model += bytes(off - len(model))
                model[off: off + len(data)] = data
            elif op < 0.55:
                size = rng.randrange(0, 700_000)
                os.ftruncate(fd, size)
                del model[size:]
                model += bytes(size - len(model))
            elif op < 0.65:
                off = rng.randrange(0, 600_000) // 4096 * 4096
                chunk = _pattern(step + 10_000, 65536)
                aligned.seek(0)
                aligned.write(chunk)
                os.pwritev(d, [aligned], off)
                if len(model) < off:
                    model += bytes(off - len(model))
                model[off: off + 65536] = chunk
            else:
                off = rng.randrange(0, max(1, len(model)))
                n = rng.randrange(1, 100_000)
                got = os.pread(rng.choice([a, b]), n, off)
                assert got == bytes(model[off: off + n]), f"step {step}"
        assert os.fstat(a).st_size == len(model)
        os.lseek(b, 0, os.SEEK_SET)
        whole = b""
        while chunk := os.read(b, 1 << 20):
            whole += chunk
        assert whole == bytes(model)
    finally:
        for fd in (a, b, d):
            os.close(fd)


def test_reads_of_holes_and_after_eviction(tmp_path, mounter: MountFactory) -> None:
    img = make_image(tmp_path / "fs.img", "256M")
    m = mounter(img, "cache_size=4M")
    with open(m / "sparse", "wb") as f:
        f.seek(10 * MiB)
        f.write(b"end")
        f.seek(3 * MiB + 5)
        f.write(b"middle")
    m.control("sync")
    m.control("drop_caches")
    with open(m / "sparse", "rb") as f:
        data = f.read()
    assert len(data) == 10 * MiB + 3
    assert data[3 * MiB + 5: 3 * MiB + 11] == b"middle"
    assert data[-3:] == b"end"
    assert data.count(0) == len(data) - 9


def test_stat_reports_the_design_keys(mnt: Mount) -> None:
    with open(mnt / "f", "wb") as f:
        f.write(b"a" * 100_000)
    root = mnt.stat()
    for key in ("bytes", "limit", "dirty_bytes", "writeback_bytes"):
        assert isinstance(root["cache"][key], int)
    for key in ("path", "atomic_unit_min", "atomic_unit_max", "atomic_path"):
        assert key in root["device"]
    for key in ("atomic_writebacks_hardware", "atomic_writebacks_software",
                "atomic_cleared_partial", "atomic_strict_rejected", "writethrough_writes",
                "stable_waits", "writeback_errors"):
        assert isinstance(root["counters"][key], int)
    assert root["cache"]["dirty_bytes"] >= 100_000 // 4096 * 4096
    f = mnt.stat("f")
    for key in ("atomic_unit", "writethrough", "atomic_strict", "atomic_path"):
        assert key in f
    for key in ("cached", "dirty", "writeback", "atomic", "writethrough_inflight", "stable"):
        assert isinstance(f["folios"][key], int)
    assert f["folios"]["dirty"] >= 1
    res = cli("stat", mnt / "f", "--json")
    assert '"atomic_unit"' in res.stdout
    res = cli("stat", mnt.path)
    assert "cache" in res.stdout
