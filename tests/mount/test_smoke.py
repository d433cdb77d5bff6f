"""The basic promise on a real mount: what is written is read back, also after remount."""
from __future__ import annotations

import os

from tests.conftest import Mount, MountFactory, cli


def test_write_read_remount(mnt: Mount, mounter: MountFactory) -> None:
    data = os.urandom(300_000)
    with open(mnt / "f", "wb") as f:
        f.write(data)
    with open(mnt / "f", "rb") as f:
        assert f.read() == data
    mnt.umount()
    assert cli("fsck", mnt.target).returncode == 0
    again = mounter(mnt.target)
    with open(again / "f", "rb") as f:
        assert f.read() == data


def test_loop_device_mount(loop_device: str, mounter: MountFactory) -> None:
    cli("mkfs", loop_device)
    m = mounter(loop_device)
    with open(m / "x", "wb") as f:
        f.write(b"abc" * 5000)
    assert m.stat()["device"]["block_device"] is True
    m.umount()
    m2 = mounter(loop_device)
    with open(m2 / "x", "rb") as f:
        assert f.read() == b"abc" * 5000
