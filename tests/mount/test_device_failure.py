"""A device whose writes keep failing: clear errors, never a hang."""
from __future__ import annotations

import errno
import os
import time

import pytest

from tests.conftest import MountFactory, cli


@pytest.mark.daemon_log(allow=[r"log write at \d+ failed: Input/output error$"])
def test_log_that_cannot_be_written_fails_fast_and_umount_reports_it(
        image: str, mounter: MountFactory) -> None:
    m = mounter(image, "inject=off", "cache_size=8M")
    with open(m / "before", "wb") as f:
        f.write(b"safe" * 1000)
        f.flush()
        os.fsync(f.fileno())
    m.control("inject=log")  # every log write fails from now on
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    try:
        failures = 0
        for _ in range(6):  # the log gives up after three failed attempts in a row
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            except OSError as exc:
                assert exc.errno == errno.EIO
                failures += 1
        assert failures >= 3
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:  # buffered writes refused at once, not throttled
            for _ in range(64):
                os.pwrite(fd, b"y" * (1 << 20), 0)
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError):
            os.fsync(fd)
        assert time.monotonic() - t0 < 10
    finally:
        os.close(fd)
    assert m.stat()["log"]["failed"]
    res = m.umount(check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert not m.alive
    # the mount is gone; the data fsync'ed before the failure survives
    m2 = mounter(image)
    with open(m2 / "before", "rb") as f:
        assert f.read() == b"safe" * 1000
    m2.umount()
    assert cli("fsck", image).returncode == 0
