"""What is measured: the workloads (rows of the tables) and, per target, the measurement
(Spec) that stands for each; and how one Spec is run: fio, or bench.driver where fio 3.33
cannot express the workload (RWF_ATOMIC; the metadata phases).

One Spec can serve several rows: atomicfs's O_DSYNC run is compared once with XFS's
RWF_ATOMIC|RWF_DSYNC O_DIRECT run, once with its buffered O_DSYNC run and once with its
O_DIRECT|O_DSYNC run, and is measured once per round.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bench.sysutil import BenchError, run
from bench.targets import META_ONLY_TARGETS, Target

log = logging.getLogger(__name__)

RAND_SIZE = 64 << 20   # each random-write file (one per job)
SEQ_SIZE = 512 << 20   # the sequential file, also read at random
META_COUNT = 10000
MAX_JOBS = 4
CHUNK = 1 << 20


@dataclass(frozen=True)
class Spec:
    """One measurement on one target."""
    key: str
    kind: str                       # "fio", "atomic" (bench.driver) or "meta"
    how: str                        # for the reader: flags and cache state
    where: str = "atomic"           # "atomic": the 16 KiB-unit directory; "plain"
    stem: str = "rand"              # file names: STEM.JOBNUM
    jobs: int = 1
    args: tuple[str, ...] = ()      # fio arguments
    time_based: bool = True
    prep: tuple[str, ...] = ()      # "fresh", "seqfile", "cold", "warm", in this order
    ddir: str = "write"             # the side of fio's report to read
    latency: str = "clat"           # "clat", or "sync" (fio's fsync latencies)
    preload: bool = False           # run under `atomicfs run` (the preload library)


@dataclass(frozen=True)
class Workload:
    """A row of the tables: the same job on every target, each by its Spec."""
    key: str
    title: str
    metric: str                     # "iops", "bw" (reported in MiB/s) or "ops"
    variants: Mapping[str, Spec | None]  # by target name, else family, else "*"; None: skip
    part: str | None = None         # the phase of a "meta" Spec
    notes: str = ""

    def spec_for(self, target: Target) -> Spec | None:
        if target.name in META_ONLY_TARGETS and self.part is None:
            return None
        for k in (target.name, target.family, "*"):
            if k in self.variants:
                return self.variants[k]
        return None


# --------------------------------------------------------------------------- the specs

_RAND = ("--rw=randwrite", "--bs=16k", f"--size={RAND_SIZE}")
_SEQ = ("--bs=1m", f"--size={SEQ_SIZE}")
_RREAD = ("--rw=randread", "--bs=4k", f"--size={SEQ_SIZE}")


def _not_xattr(spec: Spec) -> dict[str, Spec | None]:
    """Reads and metadata: nullfs-xattr differs from nullfs only in writes, so skip it."""
    return {"nullfs-xattr": None, "*": spec}

CACHED = Spec("rand16k", "fio", "buffered, no sync", args=_RAND)
DSYNC = {j: Spec(f"rand16k-dsync-j{j}", "fio", "O_DSYNC, buffered", jobs=j,
                 args=_RAND + ("--sync=dsync",)) for j in (1, 4)}
DSYNC_DIRECT = {j: Spec(f"rand16k-dsync-direct-j{j}", "fio", "O_DIRECT|O_DSYNC", jobs=j,
                        args=_RAND + ("--sync=dsync", "--direct=1")) for j in (1, 4)}
ATOMIC_DIRECT = {j: Spec(f"rand16k-atomic-direct-j{j}", "atomic",
                         "pwritev2(RWF_ATOMIC|RWF_DSYNC), O_DIRECT", jobs=j) for j in (1, 4)}
# The same driver under the preload library: on atomicfs, RWF_ATOMIC reaches the daemon
ATOMIC_PRELOAD = Spec("rand16k-atomic-preload-j1", "atomic",
                      "pwritev2(RWF_ATOMIC|RWF_DSYNC), O_DIRECT, under atomicfs run",
                      preload=True)
FSYNC = Spec("rand16k-fsync", "fio", "buffered, fsync after each write",
             args=_RAND + ("--fsync=1",), latency="sync")
APPEND = Spec("append4k-dsync", "fio", "O_DSYNC appends to a new file", where="plain",
              stem="app", args=("--rw=write", "--bs=4k", "--size=8G", "--file_append=1",
                                "--sync=dsync"), prep=("fresh",))
SEQ_WRITE = Spec("seq1m-write", "fio", "buffered, new file, fsync at the end", where="plain",
                 stem="seq", args=("--rw=write", "--end_fsync=1") + _SEQ, time_based=False,
                 prep=("fresh",))
SEQ_WRITE_DIRECT = Spec("seq1m-write-direct", "fio", "O_DIRECT, overwrite", where="plain",
                        stem="seq", args=("--rw=write", "--direct=1") + _SEQ,
                        prep=("seqfile",))
SEQ_READ = Spec("seq1m-read", "fio", "buffered, caches dropped, one pass", where="plain",
                stem="seq", args=("--rw=read",) + _SEQ, time_based=False,
                prep=("seqfile", "cold"), ddir="read")
SEQ_READ_DIRECT = Spec("seq1m-read-direct", "fio", "O_DIRECT, caches dropped", where="plain",
                       stem="seq", args=("--rw=read", "--direct=1") + _SEQ,
                       prep=("seqfile", "cold"), ddir="read")
RREAD_CACHED = Spec("rand4k-read-cached", "fio", "buffered, the 64 MiB file read once before",
                    stem="rand", args=("--rw=randread", "--bs=4k", f"--size={RAND_SIZE}"),
                    prep=("warm",), ddir="read")
RREAD_COLD = Spec("rand4k-read-cold", "fio", "buffered, caches dropped", where="plain",
                  stem="seq", args=_RREAD, prep=("seqfile", "cold"), ddir="read")
META = Spec("meta", "meta", f"{META_COUNT:,} empty files in one directory", where="plain")

_DURABLE = {"atomicfs": DSYNC[1], "nullfs": DSYNC[1]}

WORKLOADS: tuple[Workload, ...] = (
    Workload("rand16k_cached", "16K random write, cached", "iops", {"*": CACHED}),
    Workload("atomic16k_j1", "16K durable atomic random write, 1 job", "iops",
             {"atomicfs": DSYNC[1], "nullfs": DSYNC[1], "kernel": ATOMIC_DIRECT[1]},
             notes="atomicfs: O_DSYNC on a 16 KiB-unit file; kernel: RWF_ATOMIC|RWF_DSYNC "
                   "O_DIRECT (ext4 refuses it without hardware atomic support)"),
    Workload("atomic16k_j4", "16K durable atomic random write, 4 jobs", "iops",
             {"atomicfs": DSYNC[4], "nullfs": DSYNC[4], "kernel": ATOMIC_DIRECT[4]}),
    Workload("rwf_atomic16k_j1", "16K RWF_ATOMIC|RWF_DSYNC (preload library), 1 job", "iops",
             {"atomicfs": ATOMIC_PRELOAD, "nullfs": None, "kernel": ATOMIC_DIRECT[1]},
             notes="the same program on both: atomicfs under `atomicfs run`, kernel XFS "
                   "O_DIRECT RWF_ATOMIC as is"),
    Workload("dsync16k_j1", "16K O_DSYNC random write, 1 job", "iops", {"*": DSYNC[1]}),
    Workload("dsync16k_j4", "16K O_DSYNC random write, 4 jobs", "iops", {"*": DSYNC[4]}),
    Workload("dsync16k_direct_j1", "16K durable random write, 1 job, kernel O_DIRECT",
             "iops", {"atomicfs": DSYNC[1], "nullfs": DSYNC[1], "kernel": DSYNC_DIRECT[1]}),
    Workload("dsync16k_direct_j4", "16K durable random write, 4 jobs, kernel O_DIRECT",
             "iops", {"atomicfs": DSYNC[4], "nullfs": DSYNC[4], "kernel": DSYNC_DIRECT[4]}),
    Workload("rand16k_fsync", "16K random write + fsync", "iops", {"*": FSYNC}),
    Workload("append4k_dsync", "4K O_DSYNC append", "iops", {"*": APPEND}),
    Workload("seq1m_write", "1M sequential write, buffered + fsync", "bw", {"*": SEQ_WRITE}),
    Workload("seq1m_write_direct", "1M sequential write, O_DIRECT", "bw",
             {"*": SEQ_WRITE_DIRECT}),
    Workload("seq1m_read", "1M sequential read, cold", "bw", _not_xattr(SEQ_READ)),
    Workload("seq1m_read_direct", "1M sequential read, O_DIRECT", "bw",
             _not_xattr(SEQ_READ_DIRECT)),
    Workload("rand4k_read_cached", "4K random read, cached", "iops", _not_xattr(RREAD_CACHED)),
    Workload("rand4k_read_cold", "4K random read, cold", "iops", _not_xattr(RREAD_COLD)),
    Workload("meta_create", "create 10,000 files", "ops", _not_xattr(META), part="create"),
    Workload("meta_stat", "stat 10,000 files", "ops", _not_xattr(META), part="stat"),
    Workload("meta_unlink", "unlink 10,000 files", "ops", _not_xattr(META), part="unlink"),
)


def select(keys: list[str] | None) -> tuple[Workload, ...]:
    if not keys:
        return WORKLOADS
    known = {w.key: w for w in WORKLOADS}
    missing = [k for k in keys if k not in known]
    if missing:
        raise BenchError(f"unknown workloads: {', '.join(missing)} "
                         f"(known: {', '.join(known)})")
    return tuple(w for w in WORKLOADS if w.key in keys)


# ------------------------------------------------------------------------------ running

@dataclass
class Timing:
    runtime: float = 1.5  # seconds measured per time-based run
    ramp: float = 0.3     # seconds run before measuring


@dataclass
class Outcome:
    """The result of one Spec on one target in one round."""
    values: dict[str, Any] = field(default_factory=dict)  # metric -> number, lat_us, ...
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # meta phases
    unsupported: str | None = None
    error: str | None = None
    cmd: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def write_file(path: Path, size: int) -> None:
    """Write path out with random data in 1 MiB writes, then fsync it."""
    data = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, CHUNK):
            os.pwrite(fd, data[:min(CHUNK, size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(CHUNK):
            pass


def prewrite(target: Target) -> None:
    """The random-write files, written out and durable before any timed random write, so
    every filesystem overwrites allocated data."""
    for j in range(MAX_JOBS):
        write_file(target.atomic_dir / f"rand.{j}", RAND_SIZE)
    target.settle()


def prepare(target: Target, spec: Spec) -> None:
    """Settle the target, then the Spec's preparations: fresh files, the sequential file,
    cold or warm caches."""
    directory = target.atomic_dir if spec.where == "atomic" else target.plain_dir
    target.settle()
    for step in spec.prep:
        if step == "fresh":
            for j in range(MAX_JOBS):
                (directory / f"{spec.stem}.{j}").unlink(missing_ok=True)
            target.settle()
        elif step == "seqfile":
            seq = target.plain_dir / "seq.0"
            if not seq.exists() or seq.stat().st_size != SEQ_SIZE:
                write_file(seq, SEQ_SIZE)
                target.settle()
        elif step == "cold":
            target.drop_caches()
        elif step == "warm":
            read_file(directory / f"{spec.stem}.0")
        else:  # pragma: no cover - a typo in the table above
            raise BenchError(f"unknown preparation {step!r}")


def run_spec(target: Target, spec: Spec, timing: Timing) -> Outcome:
    """Prepare and run one Spec; failures come back in the Outcome, never raised (but for
    KeyboardInterrupt)."""
    try:
        prepare(target, spec)
        before = _probe(target)
        t0 = time.monotonic()
        if spec.kind == "fio":
            out = _run_fio(target, spec, timing)
        elif spec.kind == "atomic":
            out = _run_atomic(target, spec, timing)
        else:
            out = _run_meta(target, spec)
        wall = time.monotonic() - t0
        after = _probe(target)
        if out.values and spec.time_based:  # I/Os of the ramp too, for per-I/O costs
            out.values["ops_est"] = out.values["ios"] + out.values["iops"] * timing.ramp
        if before and after:
            out.extra["daemon"] = {"wall_s": wall, **_delta(before, after)}
        return out
    except (BenchError, OSError, ValueError, KeyError) as exc:
        log.error("%s on %s failed: %s", spec.key, target.name, exc)
        return Outcome(error=str(exc))


def cpu_seconds(pid: int, main_thread: bool = False) -> float | None:
    """User plus system CPU time of a process (all its threads), or of its main thread
    only (the trio loop of a FUSE daemon), in seconds."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _probe(target: Target) -> dict[str, float]:
    """The daemon's CPU time and, for atomicfs, its device and counter totals."""
    out: dict[str, float] = {}
    pid = target.daemon_pid()
    if pid:
        for key, main in (("cpu_s", False), ("cpu_main_s", True)):
            cpu = cpu_seconds(pid, main)
            if cpu is not None:
                out[key] = cpu
    st = target.stats()
    if st:
        for k in ("flushes", "write_ios", "write_bytes"):
            out[f"device_{k}"] = st["device"].get(k, 0)
        for k, v in st["counters"].items():
            out[k] = v
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k in before}


def fio_cmd(directory: Path, spec: Spec, timing: Timing) -> list[str]:
    """fio's command line for a Spec, run with directory as its working directory."""
    # fio uses the job name itself as the file when something of that name that is not a
    # regular file exists in its working directory: a name no directory holds, run there.
    cmd = ["fio", "--name=fiojob", "--ioengine=psync", "--group_reporting",
           "--output-format=json", "--invalidate=0", "--fallocate=none",
           f"--directory={directory}", f"--filename_format={spec.stem}.$jobnum",
           f"--numjobs={spec.jobs}"]
    if spec.time_based:
        cmd += ["--time_based", f"--runtime={round(timing.runtime * 1000)}ms",
                f"--ramp_time={round(timing.ramp * 1000)}ms"]
    return cmd + list(spec.args)


def _run_fio(target: Target, spec: Spec, timing: Timing) -> Outcome:
    directory = target.atomic_dir if spec.where == "atomic" else target.plain_dir
    cmd = fio_cmd(directory, spec, timing)
    res = run(cmd, check=False, timeout=timing.runtime + timing.ramp + 600, cwd=directory)
    text = res.stdout[res.stdout.find("{"):] if "{" in res.stdout else ""
    if res.returncode != 0 or not text:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise BenchError(f"fio exited {res.returncode}: {err[-1] if err else ''}")
    stray = sorted(p.name for p in directory.glob("fiojob*"))
    if stray:  # fio ran on a file of its own instead of the prepared ones
        raise BenchError(f"fio created {', '.join(stray)} in {directory}")
    job = json.loads(text)["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio job error {job['error']}")
    side = job[spec.ddir]
    lat_src = side["clat_ns"]
    if spec.latency == "sync" and job.get("sync", {}).get("lat_ns", {}).get("percentile"):
        lat_src = job["sync"]["lat_ns"]
    pct = lat_src.get("percentile", {})
    lat = {f"p{float(k):g}": v / 1000.0 for k, v in pct.items()
           if float(k) in (50.0, 90.0, 99.0, 99.9)}
    lat["mean"] = lat_src.get("mean", 0.0) / 1000.0
    runtime = job.get("job_runtime", 0) / 1000.0
    values = {"iops": side["iops"], "bw": side["bw_bytes"], "ios": side["total_ios"],
              "runtime": runtime, "lat_us": lat}
    return Outcome(values=values, cmd=" ".join(cmd),
                   extra={"usr_cpu": job.get("usr_cpu"), "sys_cpu": job.get("sys_cpu")})


def _driver(args: list[str], timeout: float, preload: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.driver"] + args
    if preload:
        cmd = [sys.executable, "-m", "atomicfs", "run", "--"] + cmd
    res = run(cmd, timeout=timeout, cwd=str(Path(__file__).resolve().parent.parent))
    return json.loads(res.stdout)


def _run_atomic(target: Target, spec: Spec, timing: Timing) -> Outcome:
    files = [str(target.atomic_dir / f"{spec.stem}.{j}") for j in range(spec.jobs)]
    args = ["atomic", *files, "--bs", "16384", "--runtime", f"{timing.runtime:g}",
            "--ramp", f"{timing.ramp:g}", "--dsync"]
    out = _driver(args, timing.runtime + timing.ramp + 300, spec.preload)
    cmd = ("atomicfs run -- " if spec.preload else "") + "python -m bench.driver " + \
        " ".join(args)
    if "unsupported" in out:
        return Outcome(unsupported=out["unsupported"], cmd=cmd)
    return Outcome(values=out, cmd=cmd)


def _run_meta(target: Target, spec: Spec) -> Outcome:
    directory = target.plain_dir
    args = ["meta", str(directory), "--count", str(META_COUNT)]
    t0 = time.monotonic()
    out = _driver(args, 900)
    log.debug("meta phases took %.1fs", time.monotonic() - t0)
    return Outcome(parts=out, cmd="python -m bench.driver " + " ".join(args))
