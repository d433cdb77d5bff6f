"""`make demo`: why atomicfs exists, then how it works.

1. Power cuts: the same 16 KiB page-write workload on kernel ext4 and on atomicfs, each on
   a loop device over the recording device (atomicfs.crashtest.blockdev), the crash
   explorer's power-loss states drawn from each recording and judged by the same oracle
   (atomicfs.crashtest.compare); a side-by-side table and a PNG of the pages (demo_png).
2. A short look: format an image, mount it, atomic folios and write-through at work,
   unmount and check it.

Exits non-zero if atomicfs tears a page, loses an fsynced write, or anything else is off.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NoReturn

from atomicfs.crashtest.compare import compare, table
from atomicfs.crashtest.workloads.base import WorkloadError
from atomicfs.demo_png import write_page_grid
from atomicfs.errors import UserError

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
    print(f"\n== {text}", flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"demo: {message} (see python -m atomicfs.demo --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m atomicfs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--states", type=int, default=200,
                   help="random cuts checked on each filesystem (200)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--tear", type=int, default=4096,
                   help="a cut write keeps some of its TEAR-byte pieces (4096: a device "
                   "whose 4 KiB sectors are themselves never torn)")
    p.add_argument("--flush-cuts", type=int, default=30,
                   help="cuts just before flushes, spread over the run (30)")
    p.add_argument("--png", default=os.environ.get("DEMO_PNG", "./atomicfs-demo.png"),
                   help="where the picture goes (./atomicfs-demo.png)")
    p.add_argument("--crash-only", action="store_true", help="skip the short look")
    args = p.parse_args(argv)
    if args.states < 1 or args.flush_cuts < 0 or args.tear < 512 or args.tear % 512:
        p.error("--states must be at least 1, --flush-cuts not negative, --tear a "
                "multiple of 512")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    code = power_cuts(args)
    if not args.crash_only:
        code = short_look() or code
    return code


def power_cuts(args: argparse.Namespace) -> int:
    missing = [t for t in ("mkfs.ext4", "e2fsck", "losetup", "fusermount3")
               if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        print("demo: the power cuts need " + (f"{', '.join(missing)} (packages e2fsprogs, "
              "util-linux, fuse3)" if missing else "root (loop devices, kernel mounts)")
              + "; skipped", file=sys.stderr)
        return 1
    step(f"power cuts: 16 KiB page writes on ext4 and on atomicfs, {args.states} random "
         f"cuts each and {args.flush_cuts} just before flushes")
    print("Four writers rewrite runs of 1-3 whole 16 KiB pages in three files, fsync now and "
          "then;\neach filesystem runs on a loop device over a recording FUSE file, then "
          "the power is cut:\nat random points of the recording (writes not yet flushed are "
          "lost, kept or torn),\nand just before flushes (every write not yet flushed "
          f"reached the device, torn).\nTorn: only some {args.tear}-byte pieces of a write "
          "made it.")
    try:
        results = compare(args.states, seed=args.seed, tear=args.tear,
                          flush_cuts=args.flush_cuts,
                          progress=lambda m: print(f"  {m}", flush=True))
    except (UserError, WorkloadError, OSError) as exc:
        print(f"demo: the power-cut comparison failed: {exc}", file=sys.stderr)
        return 1
    print()
    print(table(results))
    png = write_page_grid(results, args.png)
    print(f"\npicture (pages by random cut, torn ones red): {os.path.abspath(png)}")
    by = {r.name: r for r in results}
    ext4, afs = by["ext4"], by["atomicfs"]
    torn = ext4.torn_pages + ext4.flush_cuts.torn_pages
    if torn == 0:
        print("ext4 tore no page in these states (no cut fell between its data writes and "
              "the next flush); try more --states")
    for problem in afs.problems + afs.flush_cuts.problems:
        print(f"atomicfs FAILED: {problem}")
    if not afs.failed:
        print(f"atomicfs: every page reads as one version after every cut; ext4 mixed two "
              f"versions of a page {torn} times.")
    return 1 if afs.failed else 0


def short_look() -> int:
    step(f"a short look: mkfs, a 1 GiB sparse image at {IMG}")
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
