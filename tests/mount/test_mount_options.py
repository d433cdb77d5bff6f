"""Mount options that used to be accepted and ignored are honoured (atime policy) and the
size grammar of options holds for the atomic-unit xattr too."""
from __future__ import annotations

import errno
import os
import time

import pytest

from tests.conftest import Mount, MountFactory

XATTR = "user.atomicfs.atomic_unit"


@pytest.mark.parametrize("value,stored", [(b"16k", b"16384"), (b"16K", b"16384"),
                                          (b"16KiB", b"16384"), (b"8192", b"8192"),
                                          (b"64k\n", b"65536"), (b"0", b"0")])
def test_atomic_unit_xattr_reads_sizes(mnt: Mount, value: bytes, stored: bytes) -> None:
    path = mnt / "f"
    with open(path, "wb") as f:
        f.write(b"x")
    os.setxattr(path, XATTR, value)
    assert os.getxattr(path, XATTR) == stored


@pytest.mark.parametrize("value", [b"16KB", b"16kb", b"3000", b"lots", b"\xff", b"-16k"])
def test_atomic_unit_xattr_refuses_the_rest(mnt: Mount, value: bytes) -> None:
    path = mnt / "f"
    with open(path, "wb") as f:
        f.write(b"x")
    with pytest.raises(OSError) as exc:
        os.setxattr(path, XATTR, value)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        os.getxattr(path, XATTR)


def _read_atime(path: str) -> int:
    with open(path, "rb") as f:
        f.read()
    return os.stat(path).st_atime_ns


def _fresh_file(m: Mount) -> tuple[str, int]:
    path = m / "f"
    with open(path, "wb") as f:
        f.write(b"data")
    time.sleep(0.01)  # atime is taken from the clock: let it move
    return path, os.stat(path).st_atime_ns


def test_relatime_is_the_default(image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    path, before = _fresh_file(m)
    first = _read_atime(path)
    assert first > before  # atime was not newer than mtime: updated
    time.sleep(0.01)
    assert _read_atime(path) == first  # now newer than mtime, younger than a day: kept


def test_noatime(image: str, mounter: MountFactory) -> None:
    m = mounter(image, "noatime")
    path, before = _fresh_file(m)
    assert _read_atime(path) == before
    os.listdir(m.path)
    assert _read_atime(path) == before


def test_nodiratime(image: str, mounter: MountFactory) -> None:
    m = mounter(image, "nodiratime")
    os.mkdir(m / "d")
    path, before = _fresh_file(m)
    d_before = os.stat(m / "d").st_atime_ns
    os.listdir(m / "d")
    assert os.stat(m / "d").st_atime_ns == d_before
    assert _read_atime(path) > before  # files keep relatime
