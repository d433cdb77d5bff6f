"""`make apps`: every application scenario in its long form, then a summary table.

    python -m tests.apps.run [--only AREA,...] [--quick] [--results FILE]

AREA is fio, mmap, sqlite, postgres, mariadb or pgbench (the side-by-side pgbench TPS of
PostgreSQL on atomicfs and on kernel XFS). --quick runs the CI sizes. Exit status 1 if any
check failed. Every scenario runs in its own lab, torn down whatever happens.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import sys
import time
import traceback
from functools import partial
from typing import Any, Callable

from tests.apps import scenarios as sc
from tests.apps.harness import CheckFailed, Lab, environment_problems, missing_tools

AREAS = ["fio", "mmap", "sqlite", "postgres", "pg-logfull", "mariadb", "pgbench"]
TOOLS = {"fio": ["fio"], "mmap": [], "sqlite": ["sqlite3"], "postgres": ["postgres"],
         "pg-logfull": ["postgres"],
         "mariadb": ["mariadbd", "mariadb-slap"], "pgbench": ["postgres"]}


def plan(quick: bool) -> dict[str, list[tuple[str, Callable[[Lab, sc.Report], Any]]]]:
    """(label, scenario) per area, long or quick."""
    if quick:
        return {
            "fio": [("fio", lambda lab, r: sc.fio_scenario(lab, r, size="16m"))],
            "mmap": [("mmap", sc.mmap_scenario)],
            "sqlite": [(f"sqlite-{m}", partial(sc.sqlite_scenario, mode=m))
                       for m in ("delete", "wal")],
            "postgres": [("postgres", lambda lab, r: sc.postgres_scenario(lab, r))],
            "pg-logfull": [("pg-logfull", lambda lab, r: sc.postgres_scenario(
                lab, r, scale=2, seconds=10, kills=1, device_size=2 * sc.GiB,
                settings=sc.PG_LOGFULL_SETTINGS, stop_after_recovery=True))],
            "mariadb": [("mariadb", lambda lab, r: sc.mariadb_scenario(lab, r))],
            "pgbench": [("pgbench", lambda lab, r: sc.pgbench_compare(
                lab, r, scale=2, seconds=15, device_size=4 * sc.GiB))],
        }
    return {
        "fio": [("fio", lambda lab, r: sc.fio_scenario(lab, r, size="256m"))],
        "mmap": [("mmap", sc.mmap_scenario)],
        "sqlite": [(f"sqlite-{m}", partial(sc.sqlite_scenario, mode=m, workers=3,
                                           transactions=500, kills=3,
                                           kill_after=(3.0, 15.0), accounts=2000))
                   for m in ("delete", "wal")],
        "postgres": [("postgres", lambda lab, r: sc.postgres_scenario(
            lab, r, scale=10, clients=4, seconds=60, kills=5, kill_after=(5.0, 45.0)))],
        # issue 17's scenario, five crash -> recover -> clean stop cycles in a row
        "pg-logfull": [("pg-logfull", lambda lab, r: sc.postgres_scenario(
            lab, r, scale=5, clients=4, seconds=60, kills=5, kill_after=(15.0, 25.0),
            device_size=2 * sc.GiB, settings=sc.PG_LOGFULL_SETTINGS,
            stop_after_recovery=True))],
        "mariadb": [("mariadb", lambda lab, r: sc.mariadb_scenario(
            lab, r, transactions=20000, clients=4, kills=3, kill_after=(5.0, 30.0)))],
        "pgbench": [("pgbench", lambda lab, r: sc.pgbench_compare(
            lab, r, scale=10, clients=4, seconds=60, device_size=8 * sc.GiB))],
    }


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (what the README holds)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests.apps.run", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(AREAS),
                    help="comma-separated areas: " + ", ".join(AREAS))
    ap.add_argument("--quick", action="store_true", help="the CI sizes")
    ap.add_argument("--results", help="also write the summary (Markdown) to this file")
    args = ap.parse_args(argv)
    areas = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in areas if a not in AREAS]
    if unknown:
        ap.error(f"unknown areas {unknown}")
    problems = environment_problems()
    missing = missing_tools(t for a in areas for t in TOOLS[a])
    if problems or missing:
        print("cannot run: needs " + ", ".join(problems + [f"packages {' '.join(missing)} "
                                                            "(make apps-deps)"] * bool(missing)),
              file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so that every lab is torn down on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_all(args, areas)
    finally:
        Lab.close_all()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_all(args: argparse.Namespace, areas: list[str]) -> int:
    report = sc.Report()
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: list[tuple[str, str, float]] = []  # label, outcome, seconds
    for area, items in plan(args.quick).items():
        if area not in areas:
            continue
        for label, scenario in items:
            print(f"== {label}", flush=True)
            t = time.monotonic()
            lab = Lab(label)
            outcome = "passed"
            try:
                scenario(lab, report)
            except (CheckFailed, Exception) as exc:  # one failure must not stop the others
                outcome = "FAILED"
                detail = str(exc) if isinstance(exc, CheckFailed) else traceback.format_exc()
                report.fail(label, "scenario", detail.strip().splitlines()[0][:300], t)
                print(detail, file=sys.stderr)
            finally:
                errors = lab.close()
            if errors:
                outcome = "FAILED"
                report.fail(label, "cleanup", "; ".join(errors), t)
            runs.append((label, outcome, time.monotonic() - t))
    out: list[str] = [
        f"# atomicfs application runs, {started:%Y-%m-%d %H:%M} UTC "
        f"({'quick' if args.quick else 'long'} form)",
        "", f"Linux {platform.release()}, {os.cpu_count()} CPUs", "",
        table(["scenario", "result", "seconds"],
              [[label, outcome, f"{secs:.0f}"] for label, outcome, secs in runs]), "",
        table(["area", "check", "result", "detail"],
              [[c.area, c.name, "ok", c.detail] for c in report.checks]
              + [[c.area, c.name, "FAILED", c.detail] for c in report.failures]),
    ]
    if "pgbench" in report.tables:
        out += ["", "pgbench TPS (same loop device, same settings, one run):", "",
                table(["filesystem", "full_page_writes", "TPS", "WAL MiB", "WAL bytes/txn"],
                      [[r["filesystem"], r["full_page_writes"], f"{r['tps']:.0f}",
                        f"{r['wal_mib']}", f"{r['wal_per_txn']}"]
                       for r in report.tables["pgbench"]])]
    text = "\n".join(out)
    print("\n" + text)
    if args.results:
        with open(args.results, "w") as f:
            f.write(text + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
