"""mount / umount life cycle: mount returns once serving, --foreground stays attached,
umount writes back and waits for the daemon, a busy mount is refused, SIGTERM unmounts."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import ATOMICFS, Mount, MountFactory, cli, mounted_at, run


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] == "Z"


def _wait(cond: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_mount_serves_when_it_returns_and_umount_waits_for_the_daemon(
        mnt: Mount, mounter: MountFactory) -> None:
    assert mounted_at(mnt.path) == "fuse.atomicfs"
    assert os.statvfs(mnt.path).f_namemax == 255  # answered by the daemon
    with open(mnt / "buffered", "wb") as f:
        f.write(b"not fsynced" * 1000)  # only umount's writeback makes this durable
    pid = mnt.pid
    res = mnt.umount()
    assert res.returncode == 0 and res.stderr == ""
    assert _gone(pid), "umount returned before the daemon exited"
    assert mounted_at(mnt.path) is None
    again = mounter(mnt.target)
    with open(again / "buffered", "rb") as f:
        assert f.read() == b"not fsynced" * 1000


def test_foreground_stays_attached(image: str, tmp_path: Path, mount_env: None) -> None:
    mp = tmp_path / "fg"
    mp.mkdir()
    proc = subprocess.Popen(ATOMICFS + ["mount", image, str(mp), "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: mounted_at(str(mp)) == "fuse.atomicfs" or
                     proc.poll() is not None), "foreground mount never appeared"
        assert proc.poll() is None, proc.communicate()
        with open(mp / "f", "wb") as f:
            f.write(b"foreground")
        assert proc.poll() is None  # still attached while mounted
        assert cli("umount", str(mp)).returncode == 0
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.communicate()[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted_at(str(mp)):
            run("fusermount3", "-u", "-z", str(mp), check=False)
    assert cli("fsck", image).returncode == 0


def test_umount_of_a_busy_mount_is_refused(mnt: Mount) -> None:
    fd = os.open(mnt / "open", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"open file")
        res = mnt.umount(check=False)
        assert res.returncode != 0 and "busy" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
        assert mnt.alive
        assert os.pread(fd, 100, 0) == b"open file"
    finally:
        os.close(fd)
    assert mnt.umount().returncode == 0


def test_sigterm_unmounts_and_writes_back(mnt: Mount, mounter: MountFactory) -> None:
    with open(mnt / "f", "wb") as f:
        f.write(b"written back on SIGTERM")
    pid = mnt.pid
    os.kill(pid, signal.SIGTERM)
    assert _wait(lambda: _gone(pid) and mounted_at(mnt.path) is None)
    assert cli("fsck", mnt.target).returncode == 0
    again = mounter(mnt.target)
    with open(again / "f", "rb") as f:
        assert f.read() == b"written back on SIGTERM"


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_umount_after_a_crash_detaches_and_recovers(mnt: Mount, mounter: MountFactory
                                                    ) -> None:
    with open(mnt / "f", "wb") as f:
        f.write(b"durable")
        f.flush()
        os.fsync(f.fileno())
    os.kill(mnt.pid, signal.SIGKILL)
    assert _wait(lambda: _gone(mnt.pid))
    res = cli("umount", mnt.path, check=False)  # the dead mount: detached, exit 1, one line
    assert res.returncode == 1 and "gone" in res.stderr
    assert "Traceback" not in res.stderr
    assert mounted_at(mnt.path) is None
    again = mounter(mnt.target)
    with open(again / "f", "rb") as f:
        assert f.read() == b"durable"
