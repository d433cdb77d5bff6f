"""Bad input: each case is a clear one-line error, a non-zero exit, no traceback, and
nothing written to the target (its hash is the same before and after). fsck's exit codes:
0 clean, 1 damage found, 2 not an atomicfs (or unreadable)."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from atomicfs import format as fmt
from atomicfs.native import crc32c
from tests.conftest import (MountFactory, attach_loop, cli, detach_loop, make_image,
                            mounted_at, need, run)
from tests.mount.posix_helpers import sha256_of

MiB = 1 << 20


def refused(res: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with exactly one line on stderr that says why."""
    err = res.stderr.strip()
    assert res.returncode != 0, f"exit 0: {res.stdout}"
    assert "Traceback" not in res.stderr + res.stdout
    assert len(err.splitlines()) == 1, f"not one line: {err!r}"
    assert err.startswith("atomicfs: "), err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"
    return err


@pytest.fixture
def mp(tmp_path: Path) -> Iterator[str]:
    """An empty directory that must not end up mounted."""
    path = tmp_path / "mp"
    path.mkdir()
    yield str(path)
    assert mounted_at(str(path)) is None, "a refused mount left something mounted"


@pytest.fixture
def image(tmp_path: Path) -> str:
    """A formatted 64 MiB image (small: every case hashes the whole target twice)."""
    return make_image(tmp_path / "fs.img", "64M")


def sparse_file(path: Path, size: int, head: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(head)
    return str(path)


def unchanged(target: str, action: Callable[[], subprocess.CompletedProcess[str]]
              ) -> subprocess.CompletedProcess[str]:
    before = sha256_of(target)
    res = action()
    assert sha256_of(target) == before, "the target was written to"
    return res


# ------------------------------------------------------------------------------ mkfs

def test_mkfs_below_minimum_size(tmp_path: Path) -> None:
    new = tmp_path / "new.img"
    refused(cli("mkfs", str(new), "--size", "63M", check=False), "below the minimum", "64M")
    assert not new.exists()
    small = sparse_file(tmp_path / "small.img", 32 * MiB, os.urandom(MiB))
    refused(unchanged(small, lambda: cli("mkfs", small, check=False)), "below the minimum")
    refused(unchanged(small, lambda: cli("mkfs", small, "--force", check=False)),
            "below the minimum")


def test_mkfs_below_minimum_on_a_loop_device(mount_env: None, tmp_path: Path) -> None:
    backing = sparse_file(tmp_path / "small-backing.img", 48 * MiB, os.urandom(MiB))
    dev = attach_loop(backing)
    try:
        refused(unchanged(dev, lambda: cli("mkfs", dev, "--force", check=False)),
                "below the minimum")
    finally:
        detach_loop(dev)


def test_mkfs_invalid_arguments(tmp_path: Path) -> None:
    img = sparse_file(tmp_path / "t.img", 64 * MiB, os.urandom(4096))
    before = sha256_of(img)
    for args, words in [(["--block-size", "1000"], ["block size"]),
                        (["--block-size", "2048"], ["block size"]),
                        (["--atomic-unit", "3000"], ["atomic unit"]),
                        (["--atomic-unit", "64M"], ["atomic unit"]),
                        (["--size", "lots"], ["invalid size"])]:
        refused(cli("mkfs", img, *args, check=False), *words)
    assert sha256_of(img) == before


def test_mkfs_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    ours = make_image(tmp_path / "ours.img", "64M")
    refused(unchanged(ours, lambda: cli("mkfs", ours, check=False)), "--force")
    ext4 = ext4_image(tmp_path)
    refused(unchanged(ext4, lambda: cli("mkfs", ext4, check=False)), "ext4 filesystem",
            "--force")
    # growing the image first would already change it
    refused(unchanged(ext4, lambda: cli("mkfs", ext4, "--size", "128M", check=False)),
            "--force")
    assert os.path.getsize(ext4) == 64 * MiB


def test_mkfs_of_an_impossible_size_leaves_nothing(tmp_path: Path) -> None:
    new = tmp_path / "huge.img"
    refused(cli("mkfs", str(new), "--size", "100T", check=False), "cannot create", "100T")
    assert not new.exists()
    empty = sparse_file(tmp_path / "empty.img", 0)
    refused(cli("mkfs", empty, "--size", "100T", check=False), "cannot resize")
    assert os.path.getsize(empty) == 0


def test_mkfs_of_a_mounted_target_is_refused(image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    with open(m / "f", "wb") as f:
        f.write(b"keep me")
    m.control("sync")
    refused(unchanged(image, lambda: cli("mkfs", image, "--force", check=False)), "in use")
    refused(unchanged(image, lambda: cli("mkfs", image, "--size", "128M", "--force",
                                         check=False)), "in use")
    assert os.path.getsize(image) == 64 * MiB
    with open(m / "f", "rb") as f:
        assert f.read() == b"keep me"


def test_mkfs_of_a_mounted_loop_device_is_refused(loop_device: str, mounter: MountFactory
                                                  ) -> None:
    cli("mkfs", loop_device)
    m = mounter(loop_device)
    m.control("sync")
    refused(unchanged(loop_device, lambda: cli("mkfs", loop_device, "--force",
                                               check=False)), "in use")
    assert m.alive


# ----------------------------------------------------------------------------- mount

def ext4_image(tmp_path: Path) -> str:
    need(shutil.which("mkfs.ext4"), "mkfs.ext4 (package e2fsprogs)")
    img = sparse_file(tmp_path / "ext4.img", 64 * MiB)
    run("mkfs.ext4", "-q", "-F", img)
    return img


def test_mount_zero_filled_image(tmp_path: Path, mp: str, mount_env: None) -> None:
    img = sparse_file(tmp_path / "zero.img", 64 * MiB)
    refused(unchanged(img, lambda: cli("mount", img, mp, check=False)), "all zeros")


def test_mount_ext4_image(tmp_path: Path, mp: str, mount_env: None) -> None:
    img = ext4_image(tmp_path)
    refused(unchanged(img, lambda: cli("mount", img, mp, check=False)), "ext2/ext3/ext4",
            "not atomicfs")


def test_mount_random_garbage(tmp_path: Path, mp: str, mount_env: None) -> None:
    img = sparse_file(tmp_path / "junk.img", 64 * MiB, os.urandom(4 * MiB))
    refused(unchanged(img, lambda: cli("mount", img, mp, check=False)), "not an atomicfs")


def test_mount_and_fsck_of_empty_or_tiny_files(tmp_path: Path, mp: str,
                                               mount_env: None) -> None:
    empty = sparse_file(tmp_path / "empty.img", 0)
    tiny = sparse_file(tmp_path / "tiny.img", 1000, b"ATOMICFS")
    refused(unchanged(empty, lambda: cli("mount", empty, mp, check=False)), "empty",
            "too small")
    refused(unchanged(tiny, lambda: cli("mount", tiny, mp, check=False)), "1000 bytes",
            "too small")
    assert cli("fsck", empty, check=False).returncode == 2


def test_mount_truncated_image(tmp_path: Path, mp: str, mount_env: None) -> None:
    img = make_image(tmp_path / "cut.img", "128M")
    os.truncate(img, 80 * MiB)
    refused(unchanged(img, lambda: cli("mount", img, mp, check=False)), "smaller")


def test_mount_target_already_mounted(image: str, mounter: MountFactory, mp: str) -> None:
    first = mounter(image)
    with open(first / "f", "wb") as f:
        f.write(b"still served")
    first.control("sync")
    refused(unchanged(image, lambda: cli("mount", image, mp, check=False)), "in use")
    refused(cli("mount", image, first.path, check=False), "already")
    with open(first / "f", "rb") as f:
        assert f.read() == b"still served"
    assert first.alive


def test_mount_loop_device_already_mounted(loop_device: str, mounter: MountFactory,
                                           mp: str) -> None:
    cli("mkfs", loop_device)
    first = mounter(loop_device)
    first.control("sync")
    refused(unchanged(loop_device, lambda: cli("mount", loop_device, mp, check=False)),
            "in use")
    assert first.alive


def test_mount_missing_or_bad_mountpoint(image: str, tmp_path: Path, mount_env: None) -> None:
    missing = str(tmp_path / "does" / "not" / "exist")
    refused(unchanged(image, lambda: cli("mount", image, missing, check=False)),
            "does not exist")
    a_file = sparse_file(tmp_path / "file", 10)
    refused(unchanged(image, lambda: cli("mount", image, a_file, check=False)),
            "not a directory")
    refused(cli("mount", str(tmp_path / "no.img"), str(tmp_path), check=False),
            "no such file")


INVALID_OPTIONS = [
    ("bogus", ["unknown mount option", "bogus"]),
    ("atomic_unit=3000", ["atomic unit 3000"]),
    ("atomic_unit=", ["needs a value"]),
    ("cache_size=1k", ["cache_size"]),
    ("dirty_expire=soon", ["dirty_expire"]),
    ("dirty_expire=-1", ["dirty_expire"]),
    ("writethrough=1", ["takes no value"]),
    ("atomic_path=magic", ["atomic_path"]),
    ("allow_other,nonsense=1", ["nonsense"]),
    ("cache_size=100T", ["cache_size", "memory"]),
    ("delay=inf", ["delay", "'inf'"]),
    ("delay=nan", ["delay", "'nan'"]),
    ("delay=1e300", ["delay", "'1e300'"]),
    ("delay=-5", ["delay", "'-5'"]),
    ("delay=", ["delay", "needs a value"]),
    ("record=/nonexistent/dir/rec", ["record", "/nonexistent/dir", "not an existing"]),
    ("inject=data:99999999999999999999", ["inject count"]),
    ("request_poll_us=1001", ["request_poll_us", "'1001'"]),
    ("request_poll_us=-1", ["request_poll_us", "'-1'"]),
    ("request_poll_us=fast", ["request_poll_us", "'fast'"]),
]


def test_mount_invalid_options(image: str, mp: str) -> None:
    before = sha256_of(image)
    for option, words in INVALID_OPTIONS:
        refused(cli("mount", image, mp, "-o", option, check=False), *words)
        assert mounted_at(mp) is None
    assert sha256_of(image) == before


def test_umount_and_stat_of_something_else(tmp_path: Path) -> None:
    refused(cli("umount", str(tmp_path), check=False), "not an atomicfs mountpoint")
    refused(cli("stat", str(tmp_path), check=False), "not on an atomicfs mount")


# ------------------------------------------------------------------------------ fsck

def newest_superblock(img: str) -> fmt.Superblock:
    with open(img, "rb") as f:
        head = f.read(2 * 4096)
    slots = []
    for off in (0, 4096):
        try:
            slots.append(fmt.Superblock.unpack(head[off: off + 4096]))
        except Exception:  # noqa: BLE001 - an invalid slot is skipped, as mount does
            pass
    return max(slots, key=lambda s: s.seq)


def rewrite_snapshot(img: str, mutate: Callable[[bytes], bytes]) -> None:
    """Replace the snapshot's record stream by mutate(stream), with valid checksums: damage
    that only a consistency check can find."""
    sb = newest_superblock(img)
    bs = sb.block_size
    with open(img, "r+b") as f:
        f.seek(sb.snap_block * bs)
        header = fmt.SnapshotHeader.unpack(f.read(bs))
        payload = bytearray()
        for dblock, count in header.extents:
            f.seek(dblock * bs)
            payload += f.read(count * bs)
        stream = mutate(bytes(payload[bs: bs + header.length]))
        capacity = sum(c for _, c in header.extents) * bs - bs
        assert len(stream) <= capacity
        header.length = len(stream)
        header.payload_crc = crc32c(stream)
        payload[:bs] = header.pack(bs)
        payload[bs: bs + len(stream)] = stream
        off = 0
        for dblock, count in header.extents:
            f.seek(dblock * bs)
            f.write(payload[off: off + count * bs])
            off += count * bs


def records(stream: bytes) -> list[tuple[int, bytes]]:
    """(type, raw record) for each record of a stream."""
    out = []
    pos = 0
    while pos < len(stream):
        rtype, length = struct.unpack_from("<BI", stream, pos)
        out.append((rtype, stream[pos: pos + 5 + length]))
        pos += 5 + length
    return out


def with_nlink(ino: int, nlink: int) -> Callable[[bytes], bytes]:
    def mutate(stream: bytes) -> bytes:
        out = []
        for rtype, raw in records(stream):
            if rtype == fmt.REC_INODE:
                fields = list(fmt.INODE_FMT.unpack(raw[5:]))
                if fields[0] == ino:
                    fields[4] = nlink
                    raw = fmt.rec_inode(tuple(fields))
            out.append(raw)
        return b"".join(out)
    return mutate


def fsck(img: str) -> subprocess.CompletedProcess[str]:
    return unchanged(img, lambda: cli("fsck", img, check=False))


@pytest.fixture
def used_image(image: str, mounter: MountFactory) -> tuple[str, int]:
    """An image with a few files, cleanly unmounted; returns it and one file's inode."""
    m = mounter(image)
    os.mkdir(m / "d")
    for i in range(5):
        with open(m / f"d/f{i}", "wb") as f:
            f.write(os.urandom(10_000 * i))
    ino = os.stat(m / "d/f3").st_ino
    m.umount()
    return image, ino


def test_fsck_clean_is_0(used_image: tuple[str, int]) -> None:
    img, _ = used_image
    res = fsck(img)
    assert res.returncode == 0, res.stdout
    assert "clean" in res.stdout and "damage" not in res.stdout


@pytest.mark.parametrize("kind", ["zeros", "ext4", "garbage", "missing", "tiny"])
def test_fsck_not_atomicfs_is_2(tmp_path: Path, kind: str) -> None:
    if kind == "missing":
        res = cli("fsck", str(tmp_path / "nothing.img"), check=False)
    else:
        img = {"zeros": lambda: sparse_file(tmp_path / "z.img", 64 * MiB),
               "ext4": lambda: ext4_image(tmp_path),
               "garbage": lambda: sparse_file(tmp_path / "g.img", 64 * MiB, os.urandom(MiB)),
               "tiny": lambda: sparse_file(tmp_path / "t.img", 100, b"ATOMICFS")}[kind]()
        res = fsck(img)
    assert res.returncode == 2, res.stdout + res.stderr
    refused(res)


def test_fsck_corrupted_snapshot_is_1(used_image: tuple[str, int], mp: str) -> None:
    """Both kept snapshots unreadable: nothing to fall back to (one: test_reliability)."""
    img, _ = used_image
    sb = newest_superblock(img)
    assert sb.prev_snap_block
    with open(img, "r+b") as f:  # flip bytes inside both record streams
        for block in (sb.snap_block, sb.prev_snap_block):
            f.seek((block + 1) * sb.block_size + 40)
            f.write(b"\xff\xfe\xfd\xfc")
    res = fsck(img)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "damage: metadata snapshot" in res.stdout and "checksum" in res.stdout
    refused(unchanged(img, lambda: cli("mount", img, mp, check=False)), "damaged", "fsck")


def test_fsck_wrong_link_count_is_1(used_image: tuple[str, int], mp: str) -> None:
    img, ino = used_image
    rewrite_snapshot(img, with_nlink(ino, 3))
    res = fsck(img)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"inode {ino} has link count 3 but 1 names" in res.stdout


def test_fsck_entry_naming_a_missing_inode_is_1(used_image: tuple[str, int],
                                                mp: str) -> None:
    img, _ = used_image
    rewrite_snapshot(img, lambda s: s + fmt.rec_dirent_add(fmt.ROOT_INO, b"ghost", 987654))
    res = fsck(img)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "ghost" in res.stdout and "missing inode" in res.stdout
    refused(unchanged(img, lambda: cli("mount", img, mp, check=False)), "damaged")


def test_fsck_of_a_damaged_superblock_slot(used_image: tuple[str, int]) -> None:
    """One bad slot: the other still describes a filesystem (clean or damaged, never a
    crash); both bad: not an atomicfs any more (2)."""
    img, _ = used_image
    sb = newest_superblock(img)
    with open(img, "r+b") as f:
        f.seek((sb.seq % 2) * sb.block_size + 100)
        f.write(b"\xff" * 8)
    res = fsck(img)
    assert res.returncode in (0, 1) and "Traceback" not in res.stdout + res.stderr
    with open(img, "r+b") as f:
        f.seek(((sb.seq + 1) % 2) * sb.block_size + 100)
        f.write(b"\xff" * 8)
    res = fsck(img)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "superblock damaged" in res.stderr
