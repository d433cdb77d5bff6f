"""RWF_ATOMIC for unmodified programs (issue 15): the preload library of `atomicfs run`, the
daemon's whole-write atomicity, RWF_WRITETHROUGH, writethrough=2 and O_DIRECT.

The C program rwf_probe.c makes the calls fio and fsx make (statx STATX_WRITE_ATOMIC, then
pwritev2 RWF_ATOMIC with one iovec); it is built here with gcc and run unmodified, with and
without the library, on atomicfs, on a private tmpfs and on kernel XFS.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from atomicfs.crashtest.recording import read_writes
from tests.conftest import ATOMICFS, Mount, MountFactory, cli, need, run

pytestmark = pytest.mark.mount

KIB = 1024
MIB = 1 << 20
UNIT = 16 * KIB
# (offset, length, words): every case the kernel's generic_atomic_write_valid refuses
INVALID = [
    (0, 12 * KIB, ()),            # not a power of two
    (8 * KIB, 16 * KIB, ()),      # offset not aligned to the length
    (0, 2 * KIB, ()),             # below unit_min
    (0, 2 * MIB, ()),             # above unit_max
    (0, 8 * KIB, ("iov2",)),      # two segments, segments_max is 1
]
VALID = [
    (0, 4 * KIB, ()),
    (16 * KIB, 16 * KIB, ()),
    (MIB, MIB, ()),               # 64 units of 16 KiB in one write
    (64 * KIB, 32 * KIB, ("dsync",)),
]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> str:
    need(subprocess.run(["which", "gcc"], capture_output=True).returncode == 0, "gcc")
    out = tmp_path_factory.mktemp("probe") / "rwf_probe"
    run("gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
        str(Path(__file__).with_name("rwf_probe.c")))
    return str(out)


@pytest.fixture
def tmpfs(mount_env: None, tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "tmpfs"
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path))
    try:
        yield str(path)
    finally:
        run("umount", str(path), check=False)


def _probe(probe: str, *args: str, preload: bool) -> str:
    argv = (ATOMICFS + ["run", "--"] if preload else []) + [probe, *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _write(probe: str, path: str, off: int, length: int, words: tuple[str, ...] = (),
           byte: int = 0x41, preload: bool = True, atomic: bool = True) -> str:
    return _probe(probe, "write", path, str(off), str(length), str(byte),
                  *(("atomic",) if atomic else ()), *words, preload=preload)


def test_statx_reports_the_limits_on_atomicfs(mnt: Mount, probe: str) -> None:
    plain, unit = mnt / "plain", mnt / "unit"
    for p in (plain, unit):
        open(p, "wb").close()
    os.setxattr(unit, "user.atomicfs.atomic_unit", str(UNIT).encode())
    assert _probe(probe, "statx", plain, preload=True) == \
        f"atomic=1 attr=1 min=4096 max={MIB} segments=1 opt=0"
    assert _probe(probe, "statx", unit, preload=True) == \
        f"atomic=1 attr=1 min=4096 max={MIB} segments=1 opt={UNIT}"
    # fsx asks through syscall(SYS_statx): the same answer
    assert _probe(probe, "statx-raw", unit, preload=True) == \
        f"atomic=1 attr=1 min=4096 max={MIB} segments=1 opt={UNIT}"
    os.setxattr(unit, "user.atomicfs.atomic_strict", b"1")  # refuses partial units
    assert _probe(probe, "statx", unit, preload=True) == \
        f"atomic=1 attr=1 min={UNIT} max={MIB} segments=1 opt={UNIT}"
    # without the library the kernel knows no limits for a FUSE file
    assert _probe(probe, "statx", unit, preload=False).startswith("atomic=0")
    # directories have none, as on XFS
    assert _probe(probe, "statx", mnt.path, preload=True).startswith("atomic=0")


def test_rwf_atomic_writes_and_the_kernels_errno(mnt: Mount, probe: str) -> None:
    path = mnt / "f"
    before = mnt.counters()
    for off, length, words in VALID:
        assert _write(probe, path, off, length, words, byte=length // KIB % 251) == \
            f"ok {length}", (off, length)
    for off, length, words in INVALID:
        assert _write(probe, path, off, length, words) == "errno EINVAL", (off, length)
    # a refused write changed nothing, the valid ones are there whole
    with open(path, "rb") as f:
        for off, length, _ in VALID:
            f.seek(off)
            assert f.read(length) == bytes([length // KIB % 251]) * length
    after = mnt.counters()
    assert after["atomic_writes_announced"] - before["atomic_writes_announced"] == len(VALID)
    # 4 KiB in a 64 KiB folio, 1 MiB of 16 folios, 32 KiB in a folio: write groups
    assert after["atomic_group_writes"] - before["atomic_group_writes"] == len(VALID)
    # without the library the kernel refuses RWF_ATOMIC on FUSE outright
    assert _write(probe, path, 0, 4 * KIB, preload=False) == "errno EOPNOTSUPP"


def test_errno_matches_kernel_xfs(xfs_dir: str, mnt: Mount, probe: str) -> None:
    """The same invalid requests get the same errno from XFS (O_DIRECT, no library) as from
    atomicfs under the library (buffered)."""
    xfile = os.path.join(xfs_dir, f"rwf-{os.getpid()}")
    try:
        for off, length, words in INVALID[:3] + INVALID[4:]:
            kernel = _write(probe, xfile, off, length, words + ("direct",), preload=False)
            ours = _write(probe, mnt / "f", off, length, words)
            assert ours == kernel, (off, length, words)
    finally:
        os.unlink(xfile)


@pytest.mark.parametrize("fs", ["tmpfs", "xfs"])
def test_other_filesystems_behave_as_without_the_library(request: pytest.FixtureRequest,
                                                         probe: str, fs: str) -> None:
    base = request.getfixturevalue("tmpfs") if fs == "tmpfs" else \
        request.getfixturevalue("xfs_dir")
    path = os.path.join(base, f"other-{os.getpid()}")
    cases = [(0, 4 * KIB, ()), (0, 4 * KIB, ("direct",)), (0, 12 * KIB, ("direct",)),
             (0, 8 * KIB, ("wt",)), (0, 8 * KIB, ("dsync",))]
    try:
        for off, length, words in cases:
            for atomic in (True, False):
                outs = {_write(probe, path, off, length, words, atomic=atomic, preload=p)
                        for p in (True, False)}
                assert len(outs) == 1, (fs, off, length, words, atomic, outs)
        for how in ("statx", "statx-raw"):
            assert len({_probe(probe, how, path, preload=p) for p in (True, False)}) == 1
    finally:
        os.unlink(path)


PY_CHILD = textwrap.dedent("""
    import errno, os, sys
    RWF_ATOMIC, RWF_WRITETHROUGH = 0x40, 0x200
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    out = []
    for off, n, flags in ((0, 1 << 20, RWF_ATOMIC), (4096, 8192, RWF_ATOMIC),
                          (1 << 20, 8192, RWF_WRITETHROUGH),
                          (2 << 20, 65536, RWF_ATOMIC | os.RWF_DSYNC)):
        try:
            out.append(str(os.pwritev(fd, [b"p" * n], off, flags)))
        except OSError as exc:
            out.append(errno.errorcode[exc.errno])
    print(" ".join(out))
""")


def test_python_pwritev_with_flags_under_the_library(mnt: Mount) -> None:
    before = mnt.counters()
    argv = ATOMICFS + ["run", "--", sys.executable, "-c", PY_CHILD, mnt / "py"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(MIB), "EINVAL", "8192", "65536"]
    after = mnt.counters()
    assert after["atomic_writes_announced"] - before["atomic_writes_announced"] == 2
    # RWF_WRITETHROUGH and RWF_ATOMIC|RWF_DSYNC were written through
    assert after["writethrough_writes"] - before["writethrough_writes"] == 2
    with open(mnt / "py", "rb") as f:
        assert f.read(MIB) == b"p" * MIB


def test_a_write_of_many_units_goes_into_one_log_batch(mnt: Mount) -> None:
    """64 units in one write are one write group: a later partial write to one of them
    sends the whole group into the log first, in one batch, before it changes anything."""
    path = mnt / "g"
    open(path, "wb").close()
    os.setxattr(path, "user.atomicfs.atomic_unit", str(UNIT).encode())
    fd = os.open(path, os.O_RDWR)
    try:
        before = mnt.counters()
        os.pwrite(fd, b"a" * MIB, 0)
        mid = mnt.counters()
        assert mid["atomic_group_writes"] - before["atomic_group_writes"] == 1
        assert mid["atomic_groups_logged"] == before["atomic_groups_logged"]
        os.pwrite(fd, b"b" * 512, 5 * UNIT + 100)  # partial write into the group
        after = mnt.counters()
        assert after["atomic_groups_logged"] - before["atomic_groups_logged"] == 1
        assert after["atomic_writebacks_software"] - before["atomic_writebacks_software"] \
            == 64
        assert after["log_batches"] - before["log_batches"] <= 1  # not yet committed, or one
        assert mnt.stat("g")["folios"]["dirty"] == 1  # only the partly rewritten unit
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        data = f.read()
    assert data[:5 * UNIT + 100] == b"a" * (5 * UNIT + 100)
    assert data[5 * UNIT + 100: 5 * UNIT + 612] == b"b" * 512


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_o_direct_writes_reach_the_device_before_returning(image: str,
                                                          mounter: MountFactory) -> None:
    m = mounter(image)
    path = m / "d"
    with open(path, "wb") as f:  # blocks at home, durable
        f.write(b"0" * 256 * KIB)
        f.flush()
        os.fsync(f.fileno())
    before = m.counters()
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = bytearray(b"D" * 64 * KIB)
        assert os.pwritev(fd, [memoryview(buf)], 64 * KIB) == 64 * KIB
        assert m.stat("d")["folios"]["dirty"] == 0  # not left in the daemon's cache
        assert m.counters()["writethrough_writes"] - before["writethrough_writes"] == 1
        back = bytearray(64 * KIB)
        got = os.preadv(fd, [memoryview(back)], 64 * KIB)  # O_DIRECT read: coherent
        assert got == 64 * KIB and back == buf
    finally:
        os.close(fd)
    m.kill()  # no fsync, no unmount: the device holds what O_DIRECT wrote
    m2 = mounter(image)
    with open(m2 / "d", "rb") as f:
        data = f.read()
    assert data == b"0" * 64 * KIB + b"D" * 64 * KIB + b"0" * 128 * KIB
    m2.umount()
    assert cli("fsck", image).returncode == 0


def test_writethrough_2_is_the_rfc_write_through(mnt: Mount) -> None:
    path = mnt / "w"
    open(path, "wb").close()
    os.setxattr(path, "user.atomicfs.writethrough", b"2")
    assert os.getxattr(path, "user.atomicfs.writethrough") == b"2"
    before = mnt.counters()
    with open(path, "r+b", buffering=0) as f:
        f.write(b"x" * 40000)
    st = mnt.stat("w")
    assert st["writethrough_mode"] == "rfc"
    assert st["folios"]["dirty"] == 0
    assert mnt.counters()["writethrough_writes"] - before["writethrough_writes"] == 1


def test_announcements_refused_when_they_cannot_be_honoured(mnt: Mount) -> None:
    path = mnt / "a"
    open(path, "wb").close()
    for bad in ("write_begin=t:0:12288:a", "write_begin=t:4096:8192:a",
                "write_begin=t:0:2097152:a", "write_begin=t:0:4096:x", "write_begin=:0:4096:a",
                "write_end=nobody"):
        with pytest.raises(OSError) as exc:
            os.setxattr(path, "user.atomicfs.control", bad.encode())
        assert exc.value.errno in (errno.EINVAL, errno.ENOENT), bad
    os.setxattr(path, "user.atomicfs.control", b"write_begin=t:0:4096:a")
    os.setxattr(path, "user.atomicfs.control", b"write_end=t")


def test_hardware_path_writes_a_group_as_one_rwf_atomic_write(xfs_dir: str, tmp_path: Path,
                                                              mounter: MountFactory) -> None:
    """On an image on XFS (statx atomic limits), a write of k units, k * U a power of two
    within the device's limit, goes out as one RWF_ATOMIC write of k * U, aligned to it;
    a write of 3 units cannot (not a power of two) and takes the log, still whole."""
    img = os.path.join(xfs_dir, f"hwgroup-{os.getpid()}.img")
    try:
        cli("mkfs", img, "--size", "256M")
        rec = str(tmp_path / "rec")
        m = mounter(img, f"record={rec}")
        dev = m.stat()["device"]
        need(dev["atomic_unit_max"] >= 4 * UNIT, "XFS atomic writes of 64 KiB")
        path = m / "f"
        open(path, "wb").close()
        os.setxattr(path, "user.atomicfs.atomic_unit", str(UNIT).encode())
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"h" * 4 * UNIT, 4 * UNIT)
            os.pwrite(fd, b"s" * 3 * UNIT, 8 * UNIT)
            os.fsync(fd)
        finally:
            os.close(fd)
        c = m.counters()
        assert c["atomic_groups_hardware"] == 1 and c["atomic_groups_logged"] == 1
        atomic = [w for w, _ in read_writes(rec) if w.atomic]
        assert [(e.length, e.offset % (4 * UNIT)) for e in atomic] == [(4 * UNIT, 0)]
        m.umount()
        m2 = mounter(img)
        with open(m2 / "f", "rb") as f:
            f.seek(4 * UNIT)
            assert f.read(7 * UNIT) == b"h" * 4 * UNIT + b"s" * 3 * UNIT
    finally:
        os.unlink(img)


def test_o_append_atomic_writes(mnt: Mount, probe: str) -> None:
    """With O_APPEND the write lands at the end of file, which the kernel validates."""
    path = mnt / "log"
    assert _write(probe, path, 0, 8 * KIB, ("append",), byte=1) == f"ok {8 * KIB}"
    assert _write(probe, path, 0, 8 * KIB, ("append",), byte=2) == f"ok {8 * KIB}"
    assert _write(probe, path, 0, 32 * KIB, ("append",)) == "errno EINVAL"  # 32K at 16K
    with open(path, "rb") as f:
        assert f.read() == b"\x01" * 8 * KIB + b"\x02" * 8 * KIB
