"""Per-operation latency of atomicfs against kernel ext4, each on its own loop device over a
sparse file in the same directory (the same kind of device): create, stat (cached, and
after the FUSE attribute timeout), unlink, a buffered 4 KiB write, and a durable one
(O_DSYNC).

    sudo .venv/bin/python bench/latency.py [--count 2000] [--workdir /var/tmp]

Prints median and 99th percentile per operation and the ratio atomicfs/ext4. Needs root
(loop devices, mounts). Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from typing import Callable

log = logging.getLogger("bench.latency")

ATOMICFS = [sys.executable, "-m", "atomicfs"]
BLOCK = 4096


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def loop_device(stack: ExitStack, path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    dev = sh("losetup", "--find", "--show", "--direct-io=on", path)
    stack.callback(subprocess.run, ["losetup", "-d", dev], check=False)
    return dev


def mount_ext4(stack: ExitStack, dev: str, mnt: str) -> None:
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", dev)
    sh("mount", dev, mnt)
    stack.callback(subprocess.run, ["umount", mnt], check=False)


def mount_atomicfs(stack: ExitStack, dev: str, mnt: str) -> None:
    sh(*ATOMICFS, "mkfs", dev, "--force")
    sh(*ATOMICFS, "mount", dev, mnt)
    stack.callback(subprocess.run, ATOMICFS + ["umount", mnt], check=False)


def timed(fn: Callable[[int], object], count: int) -> list[float]:
    """Microseconds of each of count calls fn(i)."""
    out = []
    for i in range(count):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def measure(root: str, count: int) -> dict[str, list[float]]:
    d = os.path.join(root, "bench")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(count)]
    res: dict[str, list[float]] = {}
    res["create"] = timed(lambda i: os.close(os.open(names[i], os.O_CREAT | os.O_WRONLY,
                                                     0o644)), count)
    res["stat"] = timed(lambda i: os.stat(names[i]), count)
    # FUSE caches attributes and names for a second: after that a stat asks the daemon
    time.sleep(1.5)
    n = min(count, 1000)  # as many as a second of stats can cover
    res["stat (uncached)"] = timed(lambda i: os.stat(names[i]), n)
    data = os.urandom(BLOCK)
    span = 16 << 20  # a 16 MiB file written at random 4 KiB-aligned offsets
    offsets = [int.from_bytes(os.urandom(4), "little") % (span // BLOCK) * BLOCK
               for _ in range(count)]
    fd = os.open(os.path.join(d, "data"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.ftruncate(fd, span)
        res["write 4K"] = timed(lambda i: os.pwrite(fd, data, offsets[i]), count)
    finally:
        os.close(fd)
    fd = os.open(os.path.join(d, "data"), os.O_RDWR | os.O_DSYNC)
    try:
        n = max(50, count // 10)
        res["write 4K O_DSYNC"] = timed(lambda i: os.pwrite(fd, data, offsets[i]), n)
    finally:
        os.close(fd)
    res["unlink"] = timed(lambda i: os.unlink(names[i]), count)
    return res


def report(results: dict[str, dict[str, list[float]]]) -> None:
    ops = list(next(iter(results.values())))
    print(f"{'operation':<18}{'ext4 median':>13}{'p99':>9}{'atomicfs median':>17}{'p99':>9}"
          f"{'ratio':>8}")
    for op in ops:
        e, a = results["ext4"][op], results["atomicfs"][op]
        em, am = statistics.median(e), statistics.median(a)
        ep, ap = _p99(e), _p99(a)
        print(f"{op:<18}{em:>11.1f}us{ep:>7.0f}us{am:>15.1f}us{ap:>7.0f}us{am / em:>7.1f}x")


def _p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--workdir", default=None, help="where the backing files go")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/latency.py: needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, ExitStack() as stack:
        for name, mount in (("ext4", mount_ext4), ("atomicfs", mount_atomicfs)):
            mnt = os.path.join(tmp, name)
            os.mkdir(mnt)
            dev = loop_device(stack, os.path.join(tmp, f"{name}.img"), 1 << 30)
            mount(stack, dev, mnt)
            results[name] = measure(mnt, args.count)
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
