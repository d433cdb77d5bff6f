"""Small drivers for what fio 3.33 cannot express, run as separate processes.

    python -m bench.driver atomic FILE... --bs 16384 --runtime 2 --ramp 0.5 [--dsync]
        one process per file: random aligned pwritev2(RWF_ATOMIC[|RWF_DSYNC]) on O_DIRECT
        descriptors from page-aligned (mmap) buffers; prints a JSON result like fio's
    python -m bench.driver meta DIR --count 10000
        create, stat and unlink COUNT empty files; ops/s and latencies of each phase

Latencies are per system call (time.perf_counter_ns around it), as fio's clat is.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import mmap
import multiprocessing
import os
import random
import sys
import time
from typing import Any, Sequence

log = logging.getLogger(__name__)

RWF_ATOMIC = 0x40  # linux/fs.h, Linux 6.11+
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """Nearest-rank percentiles in microseconds, keyed as in the bench's JSON ("p99.9")."""
    if not samples_ns:
        return {}
    s = sorted(samples_ns)
    out = {}
    for p in PERCENTILES:
        k = min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))
        out[f"p{p:g}"] = s[k] / 1000.0
    out["mean"] = sum(s) / len(s) / 1000.0
    return out


def _atomic_job(path: str, bs: int, flags: int, start_at: float, ramp: float,
                runtime: float, seed: int) -> dict[str, Any]:
    """One writer: random bs-aligned atomic writes over the existing file at path."""
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, bs)
    buf.write(os.urandom(bs))
    rng = random.Random(seed)
    blocks = os.fstat(fd).st_size // bs
    lat: list[int] = []
    try:
        try:  # one probe write tells whether the filesystem takes RWF_ATOMIC at all
            os.pwritev(fd, [buf], 0, flags)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return {"unsupported": f"pwritev2 flags {flags:#x}: "
                                       f"{errno.errorcode[exc.errno]}"}
            raise
        while time.monotonic() < start_at:
            time.sleep(0.001)
        measure_from = start_at + ramp
        end = measure_from + runtime
        clock = time.perf_counter_ns
        while True:
            now = time.monotonic()
            if now >= end:
                break
            off = rng.randrange(blocks) * bs
            t0 = clock()
            os.pwritev(fd, [buf], off, flags)
            t1 = clock()
            if now >= measure_from:
                lat.append(t1 - t0)
    finally:
        os.close(fd)
        buf.close()
    return {"ios": len(lat), "runtime": runtime, "lat_ns": lat}


def _job_entry(args: tuple[Any, ...]) -> dict[str, Any]:
    return _atomic_job(*args)


def atomic(files: Sequence[str], bs: int, runtime: float, ramp: float,
           dsync: bool) -> dict[str, Any]:
    """Run one writer process per file at once; merge as fio's group_reporting does."""
    flags = RWF_ATOMIC | (os.RWF_DSYNC if dsync else 0)
    start_at = time.monotonic() + 0.3 + 0.05 * len(files)
    jobs = [(f, bs, flags, start_at, ramp, runtime, 1000 + i) for i, f in enumerate(files)]
    with multiprocessing.get_context("fork").Pool(len(files)) as pool:
        parts = pool.map(_job_entry, jobs)
    for p in parts:
        if "unsupported" in p:
            return {"unsupported": p["unsupported"]}
    lat = [x for p in parts for x in p["lat_ns"]]
    ios = sum(p["ios"] for p in parts)
    return {"iops": sum(p["ios"] / p["runtime"] for p in parts),
            "bw": sum(p["ios"] * bs / p["runtime"] for p in parts),
            "ios": ios, "runtime": runtime, "lat_us": percentiles(lat)}


def meta(directory: str, count: int) -> dict[str, Any]:
    """Create, stat, then unlink count empty files in directory, each phase timed."""
    names = [os.path.join(directory, f"m{i:06d}") for i in range(count)]
    clock = time.perf_counter_ns
    out: dict[str, Any] = {}

    def phase(name: str, op: Any) -> None:
        lat = []
        t_start = clock()
        for p in names:
            t0 = clock()
            op(p)
            lat.append(clock() - t0)
        elapsed = (clock() - t_start) / 1e9
        out[name] = {"ops": count / elapsed, "ios": count, "runtime": elapsed,
                     "lat_us": percentiles(lat)}

    def create(p: str) -> None:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    phase("create", create)
    phase("stat", os.stat)
    phase("unlink", os.unlink)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.driver")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("atomic")
    a.add_argument("files", nargs="+")
    a.add_argument("--bs", type=int, default=16384)
    a.add_argument("--runtime", type=float, default=2.0)
    a.add_argument("--ramp", type=float, default=0.5)
    a.add_argument("--dsync", action="store_true")
    m = sub.add_parser("meta")
    m.add_argument("directory")
    m.add_argument("--count", type=int, default=10000)
    args = p.parse_args(argv)
    if args.cmd == "atomic":
        res = atomic(args.files, args.bs, args.runtime, args.ramp, args.dsync)
    else:
        res = meta(args.directory, args.count)
    json.dump(res, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
