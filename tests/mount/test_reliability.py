"""One bad sector must not lose the filesystem (issue 12, item 3), on real mounts:
`-o ro` writes nothing, the previous checkpoint is the fallback for a damaged snapshot,
fsck reports bad superblock slots and `fsck --repair` fixes what it can; a few fuzzed
images go through real mounts (the hundreds: tests/fs/test_fuzz.py)."""
from __future__ import annotations

import errno
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from atomicfs import format as fmt
from tests.conftest import MountFactory, cli, mounted_at
from tests.fs import damage
from tests.mount.posix_helpers import sha256_of
from tests.mount.test_badinput import records, refused, rewrite_snapshot

U = 16 << 10


def write_file(path: str, data: bytes, unit: int = 0) -> None:
    with open(path, "wb") as f:
        if unit:
            os.setxattr(path, "user.atomicfs.atomic_unit", str(unit).encode())
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fsck(img: str, *args: str) -> subprocess.CompletedProcess[str]:
    res = cli("fsck", img, *args, check=False)
    assert "Traceback" not in res.stdout + res.stderr
    return res


# -------------------------------------------------------------------------- -o ro

@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_ro_mount_writes_nothing_and_reads_the_log(image: str, mounter: MountFactory
                                                   ) -> None:
    """A crash leaves atomic units only in the log (software path): a read-only mount
    shows them (read from the log, not written home), refuses every change with EROFS,
    reports ST_RDONLY, and leaves every byte of the image as it was."""
    m = mounter(image)
    assert m.stat()["device"]["atomic_path"] == "software"
    units = os.urandom(4 * U)
    write_file(m / "units", units, unit=U)
    os.mkdir(m / "d")
    write_file(m / "d/plain", b"plain data")
    m.kill()  # a crash: the units' newest copy is in the log only
    before = sha256_of(image)
    ro = mounter(image, "ro")
    assert read(ro / "units") == units and read(ro / "d/plain") == b"plain data"
    assert os.statvfs(ro.path).f_flag & os.ST_RDONLY
    for attempt in (lambda: open(ro / "new", "wb"), lambda: open(ro / "units", "r+b"),
                    lambda: os.mkdir(ro / "x"), lambda: os.unlink(ro / "d/plain"),
                    lambda: os.setxattr(ro / "units", "user.x", b"1"),
                    lambda: os.chmod(ro / "units", 0o600)):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    ro.umount()
    assert sha256_of(image) == before, "the read-only mount wrote to the image"
    res = fsck(image)
    assert res.returncode == 0, res.stdout  # the log is still there to replay
    assert "replays" in res.stdout
    rw = mounter(image)
    assert read(rw / "units") == units
    rw.umount()
    assert fsck(image).returncode == 0


# ---------------------------------------------------------------------- fallback

@pytest.mark.daemon_log(allow=[
    r"the newest metadata snapshot is damaged \(metadata snapshot checksum mismatch\)"])
def test_damaged_newest_snapshot_falls_back_to_the_previous_checkpoint(
        image: str, mounter: MountFactory, tmp_path: Path) -> None:
    """What was durable before the previous checkpoint survives a bad sector in the
    newest snapshot; fsck and the mount name what is lost; a rw mount then goes on
    from the previous checkpoint and fsck is clean after it."""
    m = mounter(image)
    old = {f"old{i}": os.urandom(20_000 + i) for i in range(4)}
    for name, data in old.items():
        write_file(m / name, data)
    write_file(m / "changed", b"version 1")
    m.umount()  # checkpoint: the previous one below
    m = mounter(image)
    write_file(m / "new", b"after the previous checkpoint")
    os.unlink(m / "old3")
    write_file(m / "changed", b"version 2")
    m.umount()  # checkpoint: the newest
    sb = damage.newest(image)
    assert sb.prev_snap_block
    with open(image, "r+b") as f:  # a bad sector inside the newest record stream
        f.seek((sb.snap_block + 1) * sb.block_size + 64)
        f.write(b"\xde\xad\xbe\xef")
    res = fsck(image)
    assert res.returncode == 1, res.stdout
    assert "checksum mismatch; the previous checkpoint's snapshot is used instead" \
        in res.stdout
    assert "lost: changes made after the previous checkpoint" in res.stdout
    ro = mounter(image, "ro")
    for name, data in old.items():  # old3 too: deleted after the previous checkpoint
        assert read(ro / name) == data, name
    assert read(ro / "changed") == b"version 1"
    assert not os.path.exists(ro / "new")
    ro.umount()
    rw = mounter(image)
    write_file(rw / "after", b"written after the fallback")
    rw.umount()
    res = fsck(image)
    assert res.returncode == 0, res.stdout
    rw = mounter(image)
    assert read(rw / "after") == b"written after the fallback"
    assert read(rw / "old0") == old["old0"]
    rw.umount()


# ----------------------------------------------------------- superblock slots, repair

@pytest.mark.daemon_log(allow=[
    r"superblock slot B: superblock checksum mismatch; run `atomicfs fsck --repair`$"])
def test_fsck_reports_a_bad_superblock_slot_and_repair_rewrites_it(
        image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    write_file(m / "f", b"data")
    m.umount()
    sb = damage.newest(image)
    other = (sb.seq + 1) % fmt.SB_SLOTS
    with open(image, "r+b") as f:
        f.seek(other * sb.block_size + 40)
        f.write(b"\xff" * 8)
    res = fsck(image)
    assert res.returncode == 1, res.stdout
    slot = "AB"[other]
    assert f"damage: superblock slot {slot}: superblock checksum mismatch" in res.stdout
    m = mounter(image)  # the good slot still mounts
    assert read(m / "f") == b"data"
    m.umount()  # (its checkpoint rewrites the other slot: damage it again)
    sb = damage.newest(image)
    other = (sb.seq + 1) % fmt.SB_SLOTS
    with open(image, "r+b") as f:
        f.seek(other * sb.block_size + 40)
        f.write(b"\xff" * 8)
    res = fsck(image, "--repair")
    assert res.returncode == 0, res.stdout
    assert f"fixed: rewrote superblock slot {'AB'[other]}" in res.stdout
    assert "repaired (1 fixes), clean" in res.stdout
    assert all(s is not None for s in damage.slots(image))
    assert fsck(image).returncode == 0


def _inode_fields(stream: bytes) -> dict[int, list[int]]:
    return {struct.unpack_from("<Q", raw, 5)[0]: list(fmt.INODE_FMT.unpack(raw[5:]))
            for t, raw in records(stream) if t == fmt.REC_INODE}


def test_repair_fixes_counts_entries_and_orphans(image: str, mounter: MountFactory
                                                 ) -> None:
    """Checksummed but inconsistent metadata: mount refuses it with one line, fsck names
    each problem, --repair fixes and reports each, and the result mounts clean with the
    unreachable file in lost+found."""
    m = mounter(image)
    os.mkdir(m / "d")
    write_file(m / "d/keep", b"kept")
    write_file(m / "d/orphan", b"orphaned data")
    write_file(m / "counted", b"c")
    orphan = os.stat(m / "d/orphan").st_ino
    counted = os.stat(m / "counted").st_ino
    m.umount()

    def mutate(stream: bytes) -> bytes:
        out = []
        for t, raw in records(stream):
            if t == fmt.REC_DIRENT_ADD and raw.endswith(b"orphan"):
                continue  # the file loses its only name: unreachable
            if t == fmt.REC_INODE and struct.unpack_from("<Q", raw, 5)[0] == counted:
                fields = list(fmt.INODE_FMT.unpack(raw[5:]))
                fields[4] = 5  # link count
                raw = fmt.rec_inode(tuple(fields))
            out.append(raw)
        return b"".join(out) + fmt.rec_dirent_add(fmt.ROOT_INO, b"ghost", 4242)

    rewrite_snapshot(image, mutate)
    res = fsck(image)  # the snapshot does not load: the entry names no inode
    assert res.returncode == 1
    assert "names missing inode 4242" in res.stdout
    mp = str(Path(image).parent / "refused")
    os.mkdir(mp)
    refused(cli("mount", image, mp, check=False), "damaged", "fsck")
    assert mounted_at(mp) is None
    # without the dangling entry the snapshot loads; the rest is for fsck to find
    rewrite_snapshot(image, lambda s: b"".join(
        raw for t, raw in records(s) if not raw.endswith(b"ghost")))
    res = fsck(image)
    assert res.returncode == 1
    assert f"inode {counted} has link count 5 but 1 names" in res.stdout
    assert f"inode {orphan} cannot be reached from the root" in res.stdout
    refused(cli("mount", image, mp, check=False), "damaged")
    res = fsck(image, "--repair")
    assert res.returncode == 0, res.stdout
    assert f"fixed: linked unreachable inode {orphan} as /lost+found/#{orphan}" \
        in res.stdout
    assert f"fixed: inode {counted}: link count 5 set to 1" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith(f"{image}: repaired (")
    assert fsck(image).returncode == 0
    m = mounter(image)
    assert read(m / f"lost+found/#{orphan}") == b"orphaned data"
    assert read(m / "d/keep") == b"kept" and os.stat(m / "counted").st_nlink == 1
    m.umount()
    assert fsck(image).returncode == 0


# ------------------------------------------------------- fuzzed images, real mounts

@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_image_through_a_real_mount(image: str, mounter: MountFactory,
                                           tmp_path: Path, seed: int) -> None:
    """Checksummed bit flips in the newest snapshot: either the mount is refused with one
    line (and fsck finds damage), or it mounts, reads, unmounts and fsck is clean."""
    m = mounter(image)
    os.mkdir(m / "d")
    for i in range(5):
        write_file(m / f"d/f{i}", os.urandom(5000 * (i + 1)))
    os.symlink("d/f1", m / "link")
    m.umount()
    damage.damage_snapshot(image, random.Random(seed), nbits=2)
    mp = tmp_path / "fz"
    mp.mkdir()
    res = cli("mount", image, str(mp), check=False)
    if res.returncode != 0:
        refused(res, "damaged")
        assert mounted_at(str(mp)) is None
        assert fsck(image).returncode == 1
        return
    try:
        for root, dirs, files in os.walk(mp):
            for name in files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    read(p)
    finally:
        cli("umount", str(mp), timeout=120)
    res = fsck(image)
    assert res.returncode == 0, res.stdout
