"""Buffered atomic writes on real mounts: settings, the folio policy, and proof from the
device's own record of writes that atomic units go out untorn, on both paths."""
from __future__ import annotations

import errno
import os

import pytest

from atomicfs.crashtest.recording import read_writes
from tests.conftest import Mount, MountFactory, cli, make_image

U = 16384
UNIT_XATTR = "user.atomicfs.atomic_unit"


def unit_data(tag: int, version: int, size: int = U) -> bytes:
    head = f"unit {tag} version {version} ".encode()
    return (head * (size // len(head) + 1))[:size]


def set_unit(path: str, unit: int) -> None:
    os.setxattr(path, UNIT_XATTR, str(unit).encode())


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("value", [b"3000", b"2048", b"12288", b"2097152", b"abc", b"-4096",
                                   b"", b"16KB", b"16kb"])  # 16k is valid (size grammar)
def test_invalid_atomic_unit_is_einval_and_changes_nothing(mnt: Mount, value: bytes) -> None:
    path = mnt / "f"
    open(path, "wb").close()
    set_unit(path, 8192)
    with pytest.raises(OSError) as exc:
        os.setxattr(path, UNIT_XATTR, value)
    assert exc.value.errno == errno.EINVAL
    assert os.getxattr(path, UNIT_XATTR) == b"8192"


@pytest.mark.parametrize("name", ["user.atomicfs.writethrough", "user.atomicfs.atomic_strict"])
def test_invalid_flag_values(mnt: Mount, name: str) -> None:
    path = mnt / "f"
    open(path, "wb").close()
    # writethrough also takes 2 (the RFC's write-through, no cache flush)
    for bad in ((b"3", b"yes", b"", b"10") if name.endswith("writethrough")
                else (b"2", b"yes", b"", b"10")):
        with pytest.raises(OSError) as exc:
            os.setxattr(path, name, bad)
        assert exc.value.errno == errno.EINVAL
    os.setxattr(path, name, b"1")
    assert os.getxattr(path, name) == b"1"


def test_units_from_block_size_to_1m_and_inheritance(mnt: Mount) -> None:
    d = mnt / "db"
    os.mkdir(d)
    for unit in (4096, 8192, 65536, 1 << 20):
        set_unit(d, unit)
        assert int(os.getxattr(d, UNIT_XATTR)) == unit
    set_unit(d, 8192)
    os.mkdir(os.path.join(d, "sub"))
    open(os.path.join(d, "sub", "f"), "wb").close()
    assert os.getxattr(os.path.join(d, "sub"), UNIT_XATTR) == b"8192"
    assert os.getxattr(os.path.join(d, "sub", "f"), UNIT_XATTR) == b"8192"
    st = mnt.stat("db/sub/f")
    assert st["atomic_unit"] == 8192 and st["folio_size"] == 8192
    os.setxattr(d, "user.atomicfs.writethrough", b"1")
    open(os.path.join(d, "g"), "wb").close()
    assert mnt.stat("db/g")["writethrough"] is True


def test_mkfs_atomic_unit_and_mount_default(tmp_path, mounter: MountFactory) -> None:
    img = make_image(tmp_path / "a.img", "128M", "--atomic-unit", "8k")
    m = mounter(img)
    open(m / "f", "wb").close()
    assert m.stat("f")["atomic_unit"] == 8192
    m.umount()
    img2 = make_image(tmp_path / "b.img", "128M")
    m2 = mounter(img2, "atomic_unit=32k")
    open(m2 / "f", "wb").close()
    assert m2.stat("f")["atomic_unit"] == 32768
    os.mkdir(m2 / "d")
    set_unit(m2 / "d", 4096)
    open(m2 / "d/g", "wb").close()
    assert m2.stat("d/g")["atomic_unit"] == 4096  # the directory's unit wins
    res = cli("mount", img2, str(tmp_path), "-o", "atomic_unit=3000", check=False)
    assert res.returncode != 0 and "atomic unit" in res.stderr
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------------- policy

def test_folio_policy_tags_whole_units_and_clears_partial(mnt: Mount) -> None:
    path = mnt / "f"
    open(path, "wb").close()
    set_unit(path, U)
    fd = os.open(path, os.O_RDWR)
    try:
        # one write covering four units whole and a fifth in part
        os.pwrite(fd, unit_data(1, 1, 4 * U + 100), 0)
        st = mnt.stat("f")
        assert st["folios"]["atomic"] == 4
        before = mnt.counters()["atomic_cleared_partial"]
        os.pwrite(fd, b"x" * 10, U + 5)  # in part: unit 1 loses its tag
        assert mnt.stat("f")["folios"]["atomic"] == 3
        assert mnt.counters()["atomic_cleared_partial"] == before + 1
        os.fsync(fd)  # writeback clears every tag
        assert mnt.stat("f")["folios"]["atomic"] == 0
    finally:
        os.close(fd)


def test_strict_rejects_unaligned_writes_and_changes_nothing(mnt: Mount) -> None:
    path = mnt / "f"
    open(path, "wb").close()
    set_unit(path, U)
    os.setxattr(path, "user.atomicfs.atomic_strict", b"1")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, unit_data(1, 1, 2 * U), 0)
        for off, n in ((100, U), (0, U + 1), (U, 10)):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"z" * n, off)
            assert exc.value.errno == errno.EINVAL
        assert os.pread(fd, 2 * U, 0) == unit_data(1, 1, 2 * U)
        assert os.fstat(fd).st_size == 2 * U
        assert mnt.counters()["atomic_strict_rejected"] == 3
    finally:
        os.close(fd)


def test_changing_the_unit_writes_dirty_data_back_first(mnt: Mount) -> None:
    path = mnt / "f"
    data = unit_data(2, 1, 5 * U)
    with open(path, "wb") as f:
        f.write(data)
    assert mnt.stat("f")["folios"]["dirty"] >= 1
    set_unit(path, U)
    st = mnt.stat("f")
    assert st["folios"]["dirty"] == 0 and st["folio_size"] == U
    with open(path, "rb") as f:
        assert f.read() == data


# --------------------------------------------------------------- untorn, from the record

def test_software_path_units_go_out_whole_in_one_log_write(tmp_path,
                                                           mounter: MountFactory) -> None:
    """On a device without atomic writes, each atomic unit reaches the device inside one
    sequential log write, whole, never split across writes."""
    img = make_image(tmp_path / "fs.img", "256M")
    rec = str(tmp_path / "rec")
    m = mounter(img, f"record={rec}")
    assert m.stat()["device"]["atomic_path"] == "software"
    path = m / "f"
    open(path, "wb").close()
    set_unit(path, U)
    units = {i: unit_data(i, 7) for i in range(32)}
    fd = os.open(path, os.O_RDWR)
    try:
        for i, data in units.items():
            os.pwrite(fd, data, i * U)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert m.counters()["atomic_writebacks_software"] == 32
    writes = read_writes(rec)
    found = {}
    for e, payload in writes:
        for i, data in units.items():
            if i not in found and data in payload:
                found[i] = e
    assert set(found) == set(units), "every unit appears whole in one device write"
    assert all(e.kind == "log" for e in found.values())
    # no data write carries a piece of a unit outside the log before the checkpoint
    assert not [e for e, _ in writes if e.kind == "data"]


def test_hardware_path_units_are_single_rwf_atomic_writes(xfs_dir: str, tmp_path,
                                                          mounter: MountFactory) -> None:
    """On an image hosted by XFS (statx reports atomic limits), each atomic folio goes out
    as exactly one RWF_ATOMIC write of one unit, unit-aligned, never merged."""
    img = make_image(os.path.join(xfs_dir, f"hw-{os.getpid()}.img"), "256M")
    try:
        rec = str(tmp_path / "rec")
        m = mounter(img, f"record={rec}", "atomic_path=hardware")
        st = m.stat()["device"]
        assert st["atomic_path"] == "hardware"
        assert st["atomic_unit_min"] <= U <= st["atomic_unit_max"]
        path = m / "f"
        open(path, "wb").close()
        set_unit(path, U)
        fd = os.open(path, os.O_RDWR)
        try:
            for i in range(64):  # one write per unit (one write of many is a write group)
                os.pwrite(fd, unit_data(i, 1), i * U)
            os.fsync(fd)
            for i in range(0, 64, 3):
                os.pwrite(fd, unit_data(i, 2), i * U)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert m.counters()["atomic_writebacks_hardware"] == 64 + 22
        atomic = [e for e, _ in read_writes(rec) if e.atomic]
        assert len(atomic) == 64 + 22
        assert all(e.length == U and e.offset % U == 0 and e.kind == "data" for e in atomic)
        m.umount()
        m2 = mounter(img)
        with open(m2 / "f", "rb") as f:
            for i in range(64):
                assert f.read(U) == unit_data(i, 2 if i % 3 == 0 else 1)
    finally:
        os.unlink(img)


def test_hardware_path_refused_without_device_support(image: str, tmp_path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    res = cli("mount", image, str(mp), "-o", "atomic_path=hardware", check=False)
    assert res.returncode != 0
    assert "atomic writes" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_atomic_units_survive_sigkill_after_fsync(image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    path = m / "f"
    open(path, "wb").close()
    set_unit(path, U)
    fd = os.open(path, os.O_RDWR)
    for i in range(40):
        os.pwrite(fd, unit_data(i, 1), i * U)
    os.fsync(fd)
    for i in range(0, 40, 2):
        os.pwrite(fd, unit_data(i, 2), i * U)
    os.fsync(fd)
    os.close(fd)
    m.kill()
    m2 = mounter(image)
    with open(m2 / "f", "rb") as f:
        for i in range(40):
            assert f.read(U) == unit_data(i, 2 if i % 2 == 0 else 1)
    m2.umount()
    assert cli("fsck", image).returncode == 0
