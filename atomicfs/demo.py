"""`make demo`: format an image, mount it, show atomic and write-through writes at work,
unmount and check it. Prints what happened; exits non-zero if anything is off."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import time

UNIT = 16384
IMG = os.environ.get("DEMO_IMG", "./atomicfs.img")


def run(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "atomicfs", *args], capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"demo: atomicfs {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def stat(path: str) -> dict:
    return json.loads(os.getxattr(path, "user.atomicfs.stat"))


def step(text: str) -> None:
    print(f"\n== {text}")


def main() -> int:
    step(f"mkfs: a 1 GiB sparse image at {IMG}")
    if os.path.exists(IMG):
        os.unlink(IMG)
    print(run("mkfs", IMG, "--size", "1G"))
    mnt = tempfile.mkdtemp(prefix="atomicfs-demo-")
    try:
        run("mount", IMG, mnt)
        print(f"mounted on {mnt}; device path: {stat(mnt)['device']['atomic_path']}")
        return workload(mnt)
    finally:
        if os.path.ismount(mnt):
            step("umount (writes back everything, waits for the daemon)")
            run("umount", mnt)
            print("unmounted")
        os.rmdir(mnt)
        step("fsck")
        print(run("fsck", IMG))


def workload(mnt: str) -> int:
    db = os.path.join(mnt, "db")
    os.mkdir(db)
    os.setxattr(db, "user.atomicfs.atomic_unit", str(UNIT).encode())
    path = os.path.join(db, "table")
    step(f"buffered atomic writes: {UNIT // 1024} KiB units set on {db} (inherited)")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    pages = b"".join(bytes([65 + i % 26]) * UNIT for i in range(16))
    os.pwrite(fd, pages, 0)  # one pwrite of sixteen units: sixteen untorn pages
    f = stat(path)
    print(f"one 256 KiB write -> {f['folios']['atomic']} atomic folios of "
          f"{f['folio_size']} bytes (dirty {f['folios']['dirty']})")
    os.pwrite(fd, b"x" * 100, 3 * UNIT + 10)  # covers unit 3 in part
    f = stat(path)
    print(f"a 100-byte write into unit 3 -> {f['folios']['atomic']} atomic folios, "
          f"atomic_cleared_partial={stat(mnt)['counters']['atomic_cleared_partial']}")
    os.fsync(fd)
    c = stat(mnt)["counters"]
    print(f"fsync -> atomic_writebacks_software={c['atomic_writebacks_software']} "
          f"hardware={c['atomic_writebacks_hardware']}: each unit went out whole")
    os.close(fd)

    step("atomic_strict: unaligned writes fail with EINVAL and change nothing")
    os.setxattr(path, "user.atomicfs.atomic_strict", b"1")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * 100, 5)
        print("unexpected: the write succeeded")
        return 1
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        print(f"pwrite(100 bytes at 5) -> EINVAL; atomic_strict_rejected="
              f"{stat(mnt)['counters']['atomic_strict_rejected']}")
    finally:
        os.close(fd)

    step("write-through: O_DSYNC writes are durable when they return")
    wal = os.path.join(mnt, "wal")
    fd = os.open(wal, os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    t0 = time.monotonic()
    for i in range(200):
        os.pwrite(fd, bytes([i % 256]) * 8192, i * 8192)
    dt = time.monotonic() - t0
    os.close(fd)
    root = stat(mnt)
    print(f"200 O_DSYNC writes of 8 KiB in {dt:.2f}s ({200 / dt:.0f}/s): "
          f"writethrough_writes={root['counters']['writethrough_writes']}, "
          f"log batches={root['counters']['log_batches']}, "
          f"dirty bytes now {root['cache']['dirty_bytes']}")

    step("the cache and the counters (atomicfs stat MOUNTPOINT)")
    print(run("stat", mnt))
    with open(path, "rb") as fh:
        data = fh.read()
    expect = bytearray(pages)
    expect[3 * UNIT + 10: 3 * UNIT + 110] = b"x" * 100
    if data != bytes(expect):
        print("demo: data read back differs!")
        return 1
    print("\nread back: all data as written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
