"""`make bench`: every target, every workload, several rounds, in one run on one device.

Each round sets up each target in turn on the same loop device (fresh mkfs), pre-writes the
random-write files and runs every workload once; the order of the targets rotates from round
to round so that slow drifts of the (shared) machine spread over all of them. Every figure is
the median of the rounds, with min and max, and every comparison is a ratio of figures taken
in this one run. Then the pgbench row (bench/pgbench.py): PostgreSQL on atomicfs, kernel XFS
and a pyfuse3 passthrough over XFS, the same rounds, on the same device.

    python -m bench [--rounds 3] [--runtime 2] [--targets a,b] [--workloads x,y]
    python -m bench --workloads pgbench [--pgbench-scale 10] [--pgbench-time 5]

Output: bench/results/<date>/ (results.json, results.md, iops.png, latency.png); a complete
run also refreshes the committed copy in bench/latest/ and the table in README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench import pgbench, report
from bench.sysutil import (REPO, BenchError, Environment, cpuidle_info, machine_info,
                           need_tools)
from bench.targets import ALL_TARGETS, Target, make_target, stub
from bench.workloads import (META_COUNT, RAND_SIZE, SEQ_SIZE, WORKLOADS, Outcome, Spec,
                             Timing, Workload, prewrite, run_spec, select)

log = logging.getLogger(__name__)

BACKING_SIZE = 4 << 30
REFERENCES = ("nullfs", "nullfs-xattr", "nullfs-perm", "xfs", "ext4")
SUBJECTS = ("atomicfs-sw", "atomicfs-hw")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    p.add_argument("--runtime", type=float,
                   default=float(os.environ.get("BENCH_RUNTIME", "1.5")),
                   help="seconds measured per time-based run (after the ramp)")
    p.add_argument("--ramp", type=float, default=float(os.environ.get("BENCH_RAMP", "0.3")))
    p.add_argument("--targets", default=os.environ.get("BENCH_TARGETS", ""),
                   help=f"comma-separated subset of {','.join(ALL_TARGETS)} (and "
                   "passthrough, which only the pgbench row uses)")
    p.add_argument("--workloads", default=os.environ.get("BENCH_WORKLOADS", ""),
                   help="comma-separated subset of " + ",".join(w.key for w in WORKLOADS)
                   + f",{pgbench.KEY}")
    p.add_argument("--pgbench-scale", type=int, default=10,
                   help="pgbench's scale factor (pgbench -i -s)")
    p.add_argument("--pgbench-time", type=int, default=5,
                   help="seconds of each pgbench run (pgbench -T)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--command", default=os.environ.get("BENCH_COMMAND", "python -m bench"),
                   help="how this run was started, for the report")
    p.add_argument("--no-latest", action="store_true",
                   help="do not refresh bench/latest/ and README.md")
    p.add_argument("--guest-halt-poll-ns", type=int, default=None, metavar="NS",
                   help="in a VM guest with the haltpoll cpuidle driver, let idle vCPUs poll "
                   "this long before halting, for the run (restored after; the machine "
                   "line reports it): wake-ups between threads get cheaper for every target")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    chosen = [t for t in args.targets.split(",") if t]
    targets = [t for t in chosen if t != "passthrough"] or (
        [] if chosen else list(ALL_TARGETS))
    keys = [w for w in args.workloads.split(",") if w]
    with_pgbench = not keys or pgbench.KEY in keys
    fio_keys = [k for k in keys if k != pgbench.KEY]
    workloads = select(fio_keys) if fio_keys or not keys else ()
    if args.rounds < 1 or args.pgbench_scale < 1 or args.pgbench_time < 1:
        raise SystemExit("--rounds, --pgbench-scale and --pgbench-time must be at least 1")
    if with_pgbench and not pgbench.configs_for(chosen):
        with_pgbench = False
    try:
        need_tools("fio", "mkfs.xfs", "mkfs.ext4", "losetup", "fusermount3")
        if with_pgbench:
            pgbench.check()
        data = measure(args, targets if workloads else [], workloads,
                       chosen if with_pgbench else None)
    except BenchError as exc:
        log.error("bench failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; everything is unmounted and detached")
        return 130
    out = write_results(args, data)
    complete = (targets == list(ALL_TARGETS) and len(workloads) == len(WORKLOADS)
                and with_pgbench and not chosen and args.rounds >= 3)
    if complete and not args.no_latest:
        latest = REPO / "bench" / "latest"  # its profile*/ folders are make profile's
        latest.mkdir(exist_ok=True)
        for f in out.iterdir():
            shutil.copy2(f, latest / f.name)
        report.update_readme(REPO / "README.md", data, "bench/latest")
        log.info("refreshed bench/latest/ and the README's performance table")
    failures = [r for r in data["runs"] + data.get("pgbench", {}).get("runs", [])
                if r.get("error")]
    log.info("results in %s (%d runs, %d failed)", out, len(data["runs"]), len(failures))
    return 1 if failures else 0


def measure(args: argparse.Namespace, targets: list[str], workloads: tuple[Workload, ...],
            pg_targets: list[str] | None = None) -> dict[str, Any]:
    """The rounds of every workload on every target, then (pg_targets not None: the
    targets given, empty for all) the pgbench row."""
    timing = Timing(runtime=args.runtime, ramp=args.ramp)
    started = time.time()
    data: dict[str, Any] = {
        "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command,
        "config": {"rounds": args.rounds, "runtime_s": args.runtime, "ramp_s": args.ramp,
                   "rand_file_bytes": RAND_SIZE, "seq_file_bytes": SEQ_SIZE,
                   "meta_files": META_COUNT, "backing_bytes": BACKING_SIZE,
                   "targets": targets, "workloads": [w.key for w in workloads]},
        "machine": machine_info(),
        "targets": {},
        "workloads": {},
        "runs": [],
    }
    with Environment(args.workdir, BACKING_SIZE) as env:
        data["machine"]["device"] = env.describe()
        if args.guest_halt_poll_ns is not None:
            env.set_guest_halt_poll(args.guest_halt_poll_ns)
            data["machine"]["cpuidle"] = cpuidle_info()
        for r in range(args.rounds if targets else 0):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for name in order:
                target = make_target(env, name)
                data["targets"][name] = {"family": target.family,
                                         "description": target.description}
                log.info("round %d/%d: %s", r + 1, args.rounds, name)
                data["runs"] += run_target(target, workloads, timing, r)
            data["machine"].setdefault("loadavg_rounds", []).append(os.getloadavg())
        if pg_targets is not None:
            t0 = time.monotonic()
            data["pgbench"] = pgbench.measure(
                env, pg_targets, args.rounds,
                pgbench.Settings(scale=args.pgbench_scale, seconds=args.pgbench_time))
            data["pgbench"]["elapsed_s"] = round(time.monotonic() - t0, 1)
            log.info("pgbench row: %.1f minutes", (time.monotonic() - t0) / 60)
    data["machine"]["loadavg_end"] = os.getloadavg()
    data["elapsed_s"] = round(time.time() - started, 1)
    for w in workloads:
        data["workloads"][w.key] = {
            "title": w.title, "metric": w.metric, "notes": w.notes,
            "how": {t: (s.how if (s := w.spec_for(stub(t))) else None)
                    for t in targets}}
    report.aggregate(data, workloads)
    return data


def run_target(target: Target, workloads: tuple[Workload, ...], timing: Timing,
               rnd: int) -> list[dict[str, Any]]:
    """Set up one target, run every workload's Spec on it once, tear it down."""
    runs: list[dict[str, Any]] = []
    done: dict[str, Outcome] = {}
    try:
        target.setup()
        prewrite(target)
        for w in workloads:
            spec = w.spec_for(target)
            if spec is None or spec.key in done:
                continue
            t0 = time.monotonic()
            out = run_spec(target, spec, timing)
            done[spec.key] = out
            runs.append(_record(target, spec, out, rnd))
            log.info("  %-22s %s  (%.1fs)", spec.key, _brief(out), time.monotonic() - t0)
    except BenchError as exc:
        log.error("%s: %s", target.name, exc)
        runs.append({"round": rnd, "target": target.name, "spec": None, "error": str(exc)})
    finally:
        try:
            target.teardown()
        except BenchError as exc:
            log.error("%s: teardown: %s", target.name, exc)
            runs.append({"round": rnd, "target": target.name, "spec": None,
                         "error": f"teardown: {exc}"})
    return runs


def _record(target: Target, spec: Spec, out: Outcome, rnd: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"round": rnd, "target": target.name, "spec": spec.key,
                           "how": spec.how, "jobs": spec.jobs, "cmd": out.cmd}
    if out.values:
        rec["values"] = out.values
    if out.parts:
        rec["parts"] = out.parts
    if out.unsupported:
        rec["unsupported"] = out.unsupported
    if out.error:
        rec["error"] = out.error
    if out.extra:
        rec["extra"] = out.extra
    return rec


def _brief(out: Outcome) -> str:
    if out.error:
        return f"FAILED: {out.error}"
    if out.unsupported:
        return f"unsupported: {out.unsupported}"
    if out.parts:
        return ", ".join(f"{k} {v['ops']:,.0f}/s" for k, v in out.parts.items())
    v = out.values
    p99 = v.get("lat_us", {}).get("p99", 0)
    return f"{v['iops']:>10,.0f} IOPS {v['bw'] / 2**20:>8,.1f} MiB/s  p99 {p99:,.0f} us"


def write_results(args: argparse.Namespace, data: dict[str, Any]) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out = args.out / stamp
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
    (out / "results.md").write_text(report.markdown(data))
    try:
        report.plots(data, out)
    except ImportError as exc:  # matplotlib missing: the figures still stand
        log.warning("no plots (%s); make bench installs matplotlib", exc)
    return out


if __name__ == "__main__":
    sys.exit(main())
