"""One owner per disk: a filesystem is served by at most one daemon, whatever path reaches
it (the image, a loop device over it, two loop devices, a symlink, a bind mount, the disk
under a partition), and a second host is kept out by the on-disk owner record.

Each refusal is one line naming the holder; the first mount keeps serving and its fsynced
data survives (issue 12: two daemons over one file lost the first one's fsynced files)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from atomicfs import format as fmt
from atomicfs import owner
from tests.conftest import (Mount, MountFactory, attach_loop, cli, detach_loop, kernel_fs,
                            make_image, mounted_at, need, run)
from tests.mount.test_badinput import refused

MiB = 1 << 20
OTHER_BOOT = bytes(range(16))


@pytest.fixture
def image(tmp_path: Path) -> str:
    return make_image(tmp_path / "fs.img", "128M")


@pytest.fixture
def mp(tmp_path: Path) -> Iterator[str]:
    """A directory that refused mounts must leave unmounted."""
    path = tmp_path / "second"
    path.mkdir()
    yield str(path)
    if mounted_at(str(path)) is not None:
        stray = Mount("", str(path), [])
        with contextlib.suppress(OSError, KeyError, ValueError):
            stray.pid = int(stray.stat()["pid"])
        stray.cleanup()
        pytest.fail("a refused mount left something mounted")


@contextlib.contextmanager
def loop_over(backing: str, *extra: str) -> Iterator[str]:
    if extra:
        dev = run("losetup", "--find", "--show", *extra, backing).stdout.strip()
    else:
        dev = attach_loop(backing)
    try:
        yield dev
    finally:
        detach_loop(dev)


def write_synced(m: Mount, name: str, data: bytes) -> None:
    fd = os.open(m / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def second_mount_refused(first: Mount, other_path: str, mp: str) -> None:
    """The second path is refused for mount, fsck and mkfs --force, naming the first
    daemon; the first keeps serving its fsynced file, which is on disk afterwards."""
    write_synced(first, "kept", b"fsynced on the first mount")
    err = refused(cli("mount", other_path, mp, check=False), "in use by atomicfs pid",
                  str(first.pid), first.path)
    assert "Traceback" not in err
    refused(cli("fsck", other_path, check=False), "in use by atomicfs pid")
    refused(cli("mkfs", other_path, "--force", check=False), "in use by atomicfs pid")
    write_synced(first, "after", b"still served")
    assert read(first / "kept") == b"fsynced on the first mount"
    assert first.alive
    first.umount()
    assert "clean" in cli("fsck", first.target).stdout


# ------------------------------------------------------------------------ paths, this host

def test_image_then_loop_over_it(image: str, mounter: MountFactory, mp: str) -> None:
    first = mounter(image)
    with loop_over(image) as loop:
        second_mount_refused(first, loop, mp)
        m = mounter(loop)  # once the image is free, the loop device mounts
        assert read(m / "kept") == b"fsynced on the first mount"
        assert read(m / "after") == b"still served"
        m.umount()


def test_loop_then_image(image: str, mounter: MountFactory, mp: str) -> None:
    with loop_over(image) as loop:
        first = mounter(loop)
        second_mount_refused(first, image, mp)


def test_two_loop_devices_over_one_file(image: str, mounter: MountFactory, mp: str) -> None:
    with loop_over(image) as loop1, loop_over(image) as loop2:
        first = mounter(loop1)
        second_mount_refused(first, loop2, mp)


def test_symlink_to_the_image(image: str, mounter: MountFactory, mp: str,
                              tmp_path: Path) -> None:
    link = tmp_path / "link.img"
    link.symlink_to(image)
    first = mounter(image)
    second_mount_refused(first, str(link), mp)


def test_bind_mount_of_the_image(image: str, mounter: MountFactory, mp: str,
                                 tmp_path: Path) -> None:
    bound = tmp_path / "bound.img"
    bound.touch()
    run("mount", "--bind", image, str(bound))
    first: Mount | None = None
    try:
        first = mounter(str(bound))
        second_mount_refused(first, image, mp)
    finally:
        if first is not None:
            first.cleanup()  # the daemon holds the file through the bind mount
        if run("umount", str(bound), check=False).returncode != 0:
            run("umount", "-l", str(bound), check=False)


def test_the_disk_under_a_partition(mounter: MountFactory, mp: str, tmp_path: Path) -> None:
    """A filesystem in a partition of a disk image (made with losetup --offset: the test
    kernel has no partition table support) holds the disk: the image file and any whole
    loop device over it are refused."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(200 * MiB)
    with loop_over(str(disk), "--direct-io=on", "--offset", str(MiB)) as part:
        cli("mkfs", part)
        first = mounter(part)
        write_synced(first, "kept", b"in the partition")
        refused(cli("mkfs", str(disk), "--force", check=False), "in use", "locked by pid")
        with loop_over(str(disk)) as whole:
            refused(cli("mkfs", whole, "--force", check=False), "in use", "locked by pid")
            refused(cli("fsck", whole, check=False), "in use")
        assert read(first / "kept") == b"in the partition"
        first.umount()
        assert "clean" in cli("fsck", part).stdout


def test_an_image_the_kernel_mounted_through_a_loop_device(mount_env: None,
                                                           tmp_path: Path) -> None:
    """mkfs --force of an image whose loop device holds a mounted ext4 is refused, on the
    file and on the loop device, naming the mount; the ext4 keeps its file."""
    need(shutil.which("mkfs.ext4"), "mkfs.ext4 (package e2fsprogs)")
    with kernel_fs(tmp_path, 128 * MiB, ["mkfs.ext4", "-q", "-F"]) as mnt:
        with open(os.path.join(mnt, "keep"), "wb") as f:
            f.write(b"ext4 data")
        img = str(tmp_path / "fs.img")
        refused(cli("mkfs", img, "--force", check=False), "in use", "loop",
                f"mounted on {mnt} (ext4)")
        loop = run("losetup", "-j", img).stdout.split(":")[0]
        refused(cli("mkfs", loop, "--force", check=False), "in use",
                f"mounted on {mnt} (ext4)")
        assert read(os.path.join(mnt, "keep")) == b"ext4 data"


# --------------------------------------------------------------------- the owner record

def superblock(image: str) -> fmt.Superblock:
    with open(image, "rb") as f:
        return fmt.Superblock.unpack(f.read(fmt.MIN_BLOCK_SIZE))


def record(image: str) -> owner.OwnerRecord:
    sb = superblock(image)
    with open(image, "rb") as f:
        f.seek(fmt.OWNER_BLOCK * sb.block_size)
        return owner.OwnerRecord.unpack(f.read(fmt.MIN_BLOCK_SIZE))


def write_record(image: str, rec: owner.OwnerRecord) -> None:
    """As another host would: straight to the owner block, durably."""
    sb = superblock(image)
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, rec.pack(fmt.MIN_BLOCK_SIZE), fmt.OWNER_BLOCK * sb.block_size)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_stale_record_after_sigkill_is_taken_over(image: str, mounter: MountFactory
                                                   ) -> None:
    assert record(image) == owner.clean_record(superblock(image))
    first = mounter(image)
    write_synced(first, "f", b"durable")
    held = record(image)
    assert held.state == owner.STATE_ACTIVE and held.pid == first.pid
    assert held.where == first.path and held.local
    first.kill()
    assert record(image).pid == first.pid  # nobody cleared it
    again = mounter(image)
    assert read(again / "f") == b"durable"
    taken = record(image)
    assert taken.state == owner.STATE_ACTIVE and taken.pid == again.pid != first.pid
    again.umount()
    assert record(image) == owner.clean_record(superblock(image))


def foreign(image: str, heartbeat_ns: int) -> owner.OwnerRecord:
    return owner.OwnerRecord(superblock(image).uuid, owner.STATE_ACTIVE, seq=7,
                             boot_id=OTHER_BOOT, pid=4242, interval_s=1, pid_start=1,
                             mount_time_ns=heartbeat_ns, heartbeat_ns=heartbeat_ns,
                             hostname="otherhost", where="/srv/data")


@contextlib.contextmanager
def heartbeating(image: str) -> Iterator[None]:
    """Another host serving the filesystem: its record's sequence moves every 0.2 s."""
    stop = threading.Event()

    def beat() -> None:
        seq = 7
        while not stop.is_set():
            seq += 1
            rec = foreign(image, time.time_ns())
            write_record(image, owner.OwnerRecord(**{**rec.__dict__, "seq": seq}))
            stop.wait(0.2)

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


@pytest.mark.daemon_log(allow=[
    r"taking over the owner record of atomicfs pid 4242 on host otherhost \("])
def test_foreign_live_record_refuses(image: str, mounter: MountFactory, mp: str) -> None:
    first = mounter(image)
    write_synced(first, "f", b"before the other host")
    first.umount()
    with heartbeating(image):
        refused(cli("mount", image, mp, check=False), "in use by atomicfs pid 4242",
                "host otherhost", "/srv/data")
        refused(cli("fsck", image, check=False), "in use", "host otherhost")
        refused(cli("mkfs", image, "--force", check=False), "in use", "host otherhost")
    # The other host died without a clean umount: its record stops moving and is taken
    # over after waiting for its heartbeat.
    write_record(image, foreign(image, time.time_ns() - 3600 * 10**9))
    res = cli("fsck", image, check=False)
    assert res.returncode == 0 and "otherhost" in res.stdout and "gone" in res.stdout
    m = mounter(image)
    assert read(m / "f") == b"before the other host"
    assert record(image).pid == m.pid
    m.umount()


@pytest.mark.daemon_log(allow=[
    r"the owner record now names atomicfs pid 4242 on host otherhost \("])
def test_a_mount_whose_record_is_taken_stops_changing(image: str,
                                                      mounter: MountFactory) -> None:
    """Another host claims the filesystem under a live mount (as when both mounted at
    once): the heartbeat finds the record changed and the mount refuses further changes
    rather than write over the other host's."""
    m = mounter(image)
    write_synced(m, "f", b"mine")
    write_record(image, foreign(image, time.time_ns()))
    deadline = time.monotonic() + 6 * owner.HEARTBEAT_S
    while True:
        try:
            with open(m / f"probe{time.monotonic_ns()}", "wb"):
                pass
        except OSError as exc:
            assert exc.errno == errno.EIO
            break
        assert time.monotonic() < deadline, "changes are still accepted"
        time.sleep(0.2)
    assert record(image).hostname == "otherhost"  # not cleared by our umount
    m.umount(check=False)
    assert record(image).hostname == "otherhost"


def test_image_without_owner_record_still_mounts(image: str, mounter: MountFactory,
                                                 mp: str) -> None:
    """An image made before owner records (log at block 2, no flag) mounts, and the host
    locks still keep a second path out."""
    sb = superblock(image)
    old = fmt.Superblock(**{**sb.__dict__, "flags": 0, "log_start": fmt.SB_SLOTS,
                            "log_blocks": sb.log_blocks + 1})
    with open(image, "r+b") as f:
        for seq in (0, 1):
            old.seq = seq
            f.seek(seq * sb.block_size)
            f.write(old.pack())
        f.seek(fmt.OWNER_BLOCK * sb.block_size)  # the old log's first block
        f.write(bytes(sb.block_size))
    first = mounter(image)
    with loop_over(image) as loop:
        write_synced(first, "kept", b"old layout")
        refused(cli("mount", loop, mp, check=False), "in use")
        first.umount()
    res = cli("fsck", image)
    assert "clean" in res.stdout and "no owner record" in res.stdout
    assert superblock(image).flags & fmt.FLAG_OWNER_RECORD == 0
