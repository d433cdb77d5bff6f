"""The pgbench row of `make bench`: PostgreSQL's TPC-B-like load on atomicfs with
full_page_writes off and on, on kernel XFS with it on and off, and on a pyfuse3
passthrough over that XFS (bench/passthrough.py, fpw on), all on the bench's one loop
device in one run; then where a commit's time goes, link by link: PostgreSQL's own timing
of its WAL writes and syncs (pg_stat_wal, every configuration), the kernel's round trip of
each FUSE request (the fuse tracepoints, bench/fusetrace.py: atomicfs and the
passthrough), the daemon's latency histograms (`atomicfs stat`'s `latency` key) and its
device requests.

Two groups, each set up once (initdb, `pgbench -i -s SCALE`): atomicfs on the loop device
(software path, a data directory with 8 KiB atomic units, so fpw=off is safe), then XFS on
the loop device, whose data directory the passthrough serves as is (the same database).
Every run restarts the server with its full_page_writes setting (so every run starts with
cold shared buffers and right after a checkpoint, when full-page images are the most
frequent), then `pgbench -c 4 -j 2 -M prepared -T SECONDS`. The configurations of a group
rotate from round to round. Servers run as user postgres on private sockets (tests/apps).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomicfs.stats import delta
from bench.fusetrace import FuseTrace
from bench.sysutil import REPO, BenchError, Environment, start_fuse_daemon, stop_fuse_daemon
from bench.targets import AtomicTarget, KernelTarget, Target

log = logging.getLogger(__name__)

KEY = "pgbench"  # its name for --workloads
TARGETS = ("atomicfs-sw", "xfs", "passthrough")
# (target, full_page_writes), in the order of the report
CONFIGS = (("atomicfs-sw", "off"), ("atomicfs-sw", "on"), ("xfs", "on"), ("xfs", "off"),
           ("passthrough", "on"))
# (subject, reference, what the issue asks of it)
RATIOS = ((("atomicfs-sw", "off"), ("xfs", "on"), ">= 0.8"),
          (("atomicfs-sw", "off"), ("passthrough", "on"), ">= 1.2"),
          (("atomicfs-sw", "on"), ("xfs", "on"), ""),
          (("passthrough", "on"), ("xfs", "on"), ""),
          (("xfs", "off"), ("xfs", "on"), ""))
# Where a commit's time goes: (what, latency section, histogram names)
BREAKDOWN = (
    ("FUSE write round trip in the kernel (queued to replied: the daemon's time, the wait "
     "for the daemon to read it and the transport)", "kernel", ("write",)),
    ("FUSE fsync round trip in the kernel (the same)", "kernel", ("fsync",)),
    ("write (WAL, and data files the checkpointer and bgwriter write)", "fuse", ("write",)),
    ("getxattr (security.capability: per inode, not per write, with KILLPRIV_V2)", "fuse",
     ("getxattr",)),
    ("fsync / fdatasync", "fuse", ("fsync",)),
    ("log batch write (+ its flush)", "device", ("log_write", "log_write_flush")),
    ("device flush", "device", ("flush",)),
    ("data write (writeback, atomic or not)", "device",
     ("data_write", "data_write_flush", "data_atomic_write", "data_atomic_write_flush",
      "data_write_dsync", "data_atomic_write_dsync")),
    ("home copy (checkpoint)", "device", ("home_write",)),
    ("completion wake-up (reap to waiting task)", "device", ("completion_wakeup",)),
)
DATA_UNIT = 8192
# PostgreSQL times its own WAL writes and syncs (pg_stat_wal); a clock read around each,
# for every configuration alike
PG_SETTINGS = {"track_wal_io_timing": "on"}
WAL_STATS = "SELECT wal_write, wal_write_time, wal_sync, wal_sync_time FROM pg_stat_wal"
XATTR_UNIT = "user.atomicfs.atomic_unit"


@dataclass
class Settings:
    scale: int = 10
    clients: int = 4
    threads: int = 2
    seconds: int = 5


def check() -> None:
    """Fail before the rounds, not after them, when PostgreSQL is missing."""
    from tests.apps.harness import pg_bindir
    if pg_bindir() is None:
        raise BenchError("PostgreSQL is not installed (make bench installs it; or leave "
                         f"{KEY} out of --workloads)")


def configs_for(targets: list[str]) -> list[tuple[str, str]]:
    """The configurations whose target is selected (all with no --targets)."""
    return [c for c in CONFIGS if not targets or c[0] in targets]


# ------------------------------------------------------------------------ passthrough

class Passthrough:
    """bench/passthrough.py serving source at mountpoint while in use."""

    def __init__(self, env: Environment, source: Path, mountpoint: Path) -> None:
        self.env, self.source, self.mountpoint = env, source, mountpoint
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self) -> None:
        self.proc = start_fuse_daemon(
            [sys.executable, str(REPO / "bench" / "passthrough.py"), str(self.source),
             str(self.mountpoint)], self.mountpoint, "fuse.passthrough",
            self.env.workdir / "passthrough.log", "the passthrough")

    def unmount(self) -> None:
        if self.proc is None:
            return
        try:
            stop_fuse_daemon(self.proc, self.mountpoint)
        finally:
            self.proc = None


# ---------------------------------------------------------------------------- running

def measure(env: Environment, targets: list[str], rounds: int, settings: Settings
            ) -> dict[str, Any]:
    """Every selected configuration once per round; the runs, figures and breakdown."""
    # The PostgreSQL drivers of the application tests: private sockets, user postgres.
    from tests.apps.harness import CheckFailed
    configs = configs_for(targets)
    data: dict[str, Any] = {"settings": settings.__dict__.copy(), "rounds": rounds,
                            "configs": [list(c) for c in configs], "runs": [],
                            "setup_s": {}}
    groups = [[c for c in configs if c[0] == "atomicfs-sw"],
              [c for c in configs if c[0] != "atomicfs-sw"]]
    for group in groups:
        if not group:
            continue
        try:
            _run_group(env, group, rounds, settings, data)
        except (BenchError, CheckFailed, OSError, subprocess.SubprocessError) as exc:
            log.error("pgbench on %s: %s", ", ".join(sorted({c[0] for c in group})), exc)
            data["runs"].append({"target": group[0][0], "error": str(exc)})
    aggregate(data)
    return data


def _run_group(env: Environment, group: list[tuple[str, str]], rounds: int,
               settings: Settings, data: dict[str, Any]) -> None:
    from tests.apps.harness import Lab
    from tests.apps.postgres import PgServer
    atomic = group[0][0] == "atomicfs-sw"
    target: Target = (AtomicTarget(env, hardware=False, allow_other=True) if atomic
                      else KernelTarget(env, "xfs"))
    lab = Lab("bench-pg")
    passthrough = Passthrough(env, env.mnt, env.host)
    t0 = time.monotonic()
    try:
        target.setup()
        datadir = target.root / "pgdata"
        datadir.mkdir(mode=0o700)
        shutil.chown(datadir, "postgres", "postgres")
        if atomic:  # inherited by everything initdb creates
            os.setxattr(datadir, XATTR_UNIT, str(DATA_UNIT).encode())
        pg = PgServer(lab, datadir, {"full_page_writes": "on", **PG_SETTINGS}, name="bench")
        pg.initdb()
        pg.start()
        pg.pgbench_init(settings.scale)
        pg.stop()
        setup_s = time.monotonic() - t0
        data["setup_s"][target.name] = round(setup_s, 1)
        log.info("pgbench: %s set up, scale %d, in %.1fs", target.name, settings.scale,
                 setup_s)
        for rnd in range(rounds):
            order = group[rnd % len(group):] + group[:rnd % len(group)]
            for name, fpw in order:
                via = env.host / "pgdata" if name == "passthrough" else datadir
                if name == "passthrough":
                    passthrough.mount()
                try:
                    pg.datadir = via
                    fuse_mnt = (env.host if name == "passthrough" else
                                env.mnt if atomic else None)
                    run = _one_run(pg, target if atomic else None, fpw, settings, fuse_mnt)
                finally:
                    passthrough.unmount()
                run.update({"round": rnd, "target": name, "full_page_writes": fpw})
                data["runs"].append(run)
                log.info("  pgbench %-12s fpw=%-3s %8.0f TPS  (%.1fs)", name, fpw,
                         run["tps"], run["wall_s"])
    finally:
        errors = lab.close()  # stops the server
        passthrough.unmount()
        target.teardown()
        if errors:
            raise BenchError(f"cleanup: {errors}")


def _one_run(pg: Any, atomicfs: Target | None, fpw: str, settings: Settings,
             fuse_mnt: Path | None) -> dict[str, Any]:
    """Start the server with this full_page_writes, checkpoint, one timed pgbench run;
    PostgreSQL's own WAL timings and, on a FUSE mount (fuse_mnt), the kernel's round
    trips of its requests."""
    from tests.apps.harness import run
    t0 = time.monotonic()
    pg.settings["full_page_writes"] = fpw
    pg.start()
    try:
        if pg.psql("SHOW full_page_writes") != fpw:
            raise BenchError(f"full_page_writes is not {fpw}")
        pg.psql("CHECKPOINT")
        pg.psql("SELECT pg_stat_reset_shared('wal')")
        lsn0 = pg.wal_lsn()
        before = atomicfs.stats() if atomicfs else None
        args = pg.pgbench_args(settings.clients, settings.seconds, keep_history=False)
        args[args.index("-j") + 1] = str(settings.threads)
        with FuseTrace(fuse_mnt) if fuse_mnt else contextlib.nullcontext() as trace:
            res = run(args, timeout=settings.seconds + 600)
        after = atomicfs.stats() if atomicfs else None
        wal = pg.wal_lsn() - lsn0
        wal_io = wal_stats(pg.psql(WAL_STATS))
    finally:
        pg.stop()
    out: dict[str, Any] = {"tps": _field(r"^tps = ([0-9.]+)", res.stdout),
                           "transactions": int(_field(
                               r"^number of transactions actually processed: (\d+)",
                               res.stdout)),
                           "latency_ms": _field(r"^latency average = ([0-9.]+) ms",
                                                res.stdout),
                           "wal_bytes": wal, "wal_io": wal_io,
                           "wall_s": round(time.monotonic() - t0, 1),
                           "cmd": " ".join(args)}
    if trace is not None and (rtt := trace.result()) is not None:
        out["fuse_rtt"] = rtt
    if before and after:
        out["latency"] = {sec: {name: delta(h, before["latency"].get(sec, {}).get(name))
                                for name, h in after["latency"].get(sec, {}).items()}
                          for sec in ("fuse", "device", "jobs")}
    return out


def _field(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.M)
    if m is None:
        raise BenchError(f"pgbench printed no {pattern!r}:\n{text[-2000:]}")
    return float(m.group(1))


def wal_stats(row: str) -> dict[str, float]:
    """pg_stat_wal's WAL writes and syncs and the milliseconds they took (WAL_STATS's row,
    as psql -A -t prints it)."""
    try:
        writes, write_ms, syncs, sync_ms = (float(x) for x in row.split("|"))
    except ValueError:
        raise BenchError(f"pg_stat_wal gave {row!r}") from None
    return {"writes": writes, "write_ms": write_ms, "syncs": syncs, "sync_ms": sync_ms}


# ---------------------------------------------------------------------------- figures

def aggregate(data: dict[str, Any]) -> None:
    """Figures per configuration (median, min, max TPS), ratios and the breakdown."""
    runs = [r for r in data["runs"] if "tps" in r and r["transactions"]]
    figures: dict[str, Any] = {}
    for name, fpw in CONFIGS:
        same = [r for r in runs if r["target"] == name and r["full_page_writes"] == fpw]
        if not same:
            continue
        tps = {r["round"]: r["tps"] for r in same}
        figures[f"{name}/{fpw}"] = {
            "median": statistics.median(tps.values()), "min": min(tps.values()),
            "max": max(tps.values()), "runs": {str(k): v for k, v in tps.items()},
            "wal_bytes_per_txn": statistics.median(r["wal_bytes"] / r["transactions"]
                                                   for r in same),
            "wal_io": _wal_io(same), "fuse_rtt": _fuse_rtt(same)}
    data["figures"] = figures
    ratios = []
    for (a, ra), (b, rb), goal in RATIOS:
        fa, fb = figures.get(f"{a}/{ra}"), figures.get(f"{b}/{rb}")
        if not fa or not fb or not fb["median"]:
            continue
        per_round = [fa["runs"][k] / fb["runs"][k] for k in fa["runs"] if k in fb["runs"]]
        ratios.append({"subject": f"{a}/{ra}", "reference": f"{b}/{rb}", "goal": goal,
                       "ratio": fa["median"] / fb["median"],
                       "round_min": min(per_round, default=None),
                       "round_max": max(per_round, default=None)})
    data["ratios"] = ratios
    data["breakdown"] = {fpw: _breakdown([r for r in runs if r["target"] == "atomicfs-sw"
                                          and r["full_page_writes"] == fpw
                                          and "latency" in r])
                         for fpw in ("off", "on")}


def _wal_io(runs: list[dict[str, Any]]) -> dict[str, float]:
    """PostgreSQL's WAL writes and syncs per transaction and their mean µs, medians over
    the runs (empty when no run has pg_stat_wal's figures)."""
    per_run = [(w["writes"] / r["transactions"], 1000 * w["write_ms"] / w["writes"],
                w["syncs"] / r["transactions"], 1000 * w["sync_ms"] / w["syncs"])
               for r in runs if (w := r.get("wal_io")) and w["writes"] and w["syncs"]]
    if not per_run:
        return {}
    keys = ("writes_per_txn", "write_us", "syncs_per_txn", "sync_us")
    return {k: statistics.median(v[i] for v in per_run) for i, k in enumerate(keys)}


def _fuse_rtt(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The kernel's round trip of FUSE writes and fsyncs: mean and p50 µs, medians over
    the runs that recorded it."""
    out = {}
    for op in ("write", "fsync"):
        hs = [h for r in runs if (h := r.get("fuse_rtt", {}).get(op)) and h["count"]]
        if hs:
            out[op] = {k: statistics.median(h[k] for h in hs) for k in ("mean_us", "p50_us")}
    return out


def _breakdown(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per transaction, medians over the rounds: how many of each request, their mean,
    p50 and p99 (of the row's busiest histogram), and the daemon time they took."""
    if not runs:
        return []
    rows = []
    wal = _wal_io(runs)
    if wal:  # what PostgreSQL saw first, then the kernel, the daemon, the device
        rows += [{"what": "WAL write, as PostgreSQL timed it (pg_stat_wal)",
                  "per_txn": wal["writes_per_txn"], "mean_us": wal["write_us"],
                  "us_per_txn": wal["writes_per_txn"] * wal["write_us"]},
                 {"what": "WAL sync (fdatasync), as PostgreSQL timed it",
                  "per_txn": wal["syncs_per_txn"], "mean_us": wal["sync_us"],
                  "us_per_txn": wal["syncs_per_txn"] * wal["sync_us"]}]
    rows += [row for what, section, names in BREAKDOWN
             if (row := _row(runs, what, section, names)) is not None]
    fuse = [(sum(h["count"] for h in r["latency"]["fuse"].values()),
             sum(h["sum_us"] for h in r["latency"]["fuse"].values()), r["transactions"])
            for r in runs]
    rows.append({"what": "all FUSE requests (daemon time)",
                 "per_txn": statistics.median(n / t for n, _, t in fuse),
                 "us_per_txn": statistics.median(us / t for _, us, t in fuse)})
    rows.append({"what": "transaction, as pgbench saw it (latency average)", "per_txn": 1.0,
                 "us_per_txn": statistics.median(r["latency_ms"] * 1000 for r in runs)})
    return rows


def _row(runs: list[dict[str, Any]], what: str, section: str, names: tuple[str, ...]
         ) -> dict[str, Any] | None:
    per_run = []
    for r in runs:
        hists = r.get("fuse_rtt", {}) if section == "kernel" else r["latency"][section]
        hs = [h for n, h in hists.items() if n in names and h["count"]]
        if not hs:
            continue
        count = sum(h["count"] for h in hs)
        us = sum(h["sum_us"] for h in hs)
        top = max(hs, key=lambda h: h["count"])
        per_run.append((count / r["transactions"], us / count, top["p50_us"],
                        top["p99_us"], us / r["transactions"]))
    if not per_run:
        return None
    keys = ("per_txn", "mean_us", "p50_us", "p99_us", "us_per_txn")
    return {"what": what, **{k: statistics.median(v[i] for v in per_run)
                             for i, k in enumerate(keys)}}


def markdown(data: dict[str, Any]) -> str:
    """The report's pgbench section."""
    s = data["settings"]
    fig = data.get("figures", {})
    lines = [f"pgbench scale {s['scale']}, `-c {s['clients']} -j {s['threads']} -M prepared "
             f"-T {s['seconds']}`, each run after a server restart and a CHECKPOINT; "
             f"{data['rounds']} rounds; setup (initdb, pgbench -i) "
             + ", ".join(f"{k} {v:.0f} s" for k, v in data.get("setup_s", {}).items()) + ".",
             "", "| filesystem | full_page_writes | TPS (min–max) | WAL bytes/txn |",
             "|---|---|---:|---:|"]
    for name, fpw in CONFIGS:
        f = fig.get(f"{name}/{fpw}")
        if f:
            lines.append(f"| {name} | {fpw} | {f['median']:,.0f} ({f['min']:,.0f}–"
                         f"{f['max']:,.0f}) | {f['wal_bytes_per_txn']:,.0f} |")
    if data.get("ratios"):
        lines += ["", "| ratio | median | rounds | goal (issue 14) |", "|---|---:|---:|---|"]
        for r in data["ratios"]:
            rng = (f"{r['round_min']:.2f}–{r['round_max']:.2f}"
                   if r["round_min"] is not None else "")
            lines.append(f"| {r['subject']} ÷ {r['reference']} | {r['ratio']:.2f} | {rng} | "
                         f"{r['goal']} |")
    wal_rows = [(name, fpw, f) for name, fpw in CONFIGS
                if (f := fig.get(f"{name}/{fpw}")) and f.get("wal_io")]
    if wal_rows:
        lines += ["", "WAL I/O as PostgreSQL timed it (pg_stat_wal with track_wal_io_timing; "
                  "mean µs) and, on the FUSE mounts, the kernel's round trip of the FUSE "
                  "requests (queued to replied, from the fuse tracepoints; mean / p50 µs); "
                  "medians over the rounds:", "",
                  "| filesystem | full_page_writes | WAL writes/txn | WAL write µs | "
                  "WAL syncs/txn | WAL sync µs | FUSE write round trip | FUSE fsync round "
                  "trip |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, fpw, f in wal_rows:
            w = f["wal_io"]
            rtt = [f"{h['mean_us']:,.0f} / {h['p50_us']:,.0f}" if (h := f["fuse_rtt"].get(op))
                   else "" for op in ("write", "fsync")]
            lines.append(f"| {name} | {fpw} | {w['writes_per_txn']:.2f} | {w['write_us']:,.0f} "
                         f"| {w['syncs_per_txn']:.2f} | {w['sync_us']:,.0f} | "
                         + " | ".join(rtt) + " |")
    for fpw, rows in data.get("breakdown", {}).items():
        if not rows:
            continue
        lines += ["", f"Where a transaction's time goes on atomicfs-sw, full_page_writes={fpw} "
                  "(PostgreSQL's WAL timings, the kernel's FUSE round trips, the "
                  "daemon's latency histograms over the run; per transaction, medians over "
                  "the rounds; requests overlap, so times do not add up to the total):", "",
                  "| request | per txn | mean µs | p50 µs | p99 µs | µs per txn |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            cells = [f"{r['per_txn']:.2f}"] + [f"{r[k]:,.0f}" if k in r else ""
                                              for k in ("mean_us", "p50_us", "p99_us")]
            lines.append(f"| {r['what']} | " + " | ".join(cells)
                         + f" | {r['us_per_txn']:,.0f} |")
    errors = [r["error"] for r in data.get("runs", []) if "error" in r]
    lines += [f"\nFAILED: {e}" for e in errors]
    return "\n".join(lines)
