"""The application scenarios, parametrised by size and duration: the pytest tests run them
short (CI), `make apps` (run.py) long. Each builds what it needs in a Lab, raises
CheckFailed on the first failed check and records passed checks and figures in a Report.

The crash used throughout: SIGSTOP the application's processes (so that they issue no more
I/O and cannot react), SIGKILL the atomicfs daemon, detach the dead mount with
`fusermount3 -u -z`, SIGKILL the application; then mount again (the log is replayed) and
restart the application, which runs its own crash recovery.
"""
from __future__ import annotations

import mmap
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.apps import fio as fiomod
from tests.apps import sqlitedb
from tests.apps.harness import (AtomicMount, CheckFailed, Lab, Server, atomic_writebacks,
                                atomicfs, counter_delta, kernel_mount, kill_pids, loop_device,
                                set_unit, tail)
from tests.apps.mariadb import MariaServer
from tests.apps.postgres import PgServer

GiB = 1 << 30


@dataclass
class Check:
    area: str
    name: str
    detail: str
    seconds: float


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    failures: list[Check] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def ok(self, area: str, name: str, detail: str = "", since: float | None = None
           ) -> None:
        secs = time.monotonic() - since if since is not None else 0.0
        self.checks.append(Check(area, name, detail, secs))
        self.log(f"  ok  {area}: {name}" + (f" ({detail})" if detail else ""))

    def fail(self, area: str, name: str, detail: str, since: float | None = None) -> None:
        secs = time.monotonic() - since if since is not None else 0.0
        self.failures.append(Check(area, name, detail, secs))
        self.log(f"  FAIL {area}: {name}: {detail}")


def crash(mount: AtomicMount, freeze: Callable[[], list[int]],
          kill: Callable[[list[int]], None]) -> None:
    """Power cut for one application on one mount (see the module docstring)."""
    frozen = freeze()
    mount.kill()
    kill(frozen)


def crash_under_load(mnt: AtomicMount, server: Server, load: subprocess.Popen[bytes],
                     log: Path, what: str, delay: float) -> None:
    """Let the client load run for delay seconds, cut the power under the server and the
    filesystem, and mount again."""
    try:
        time.sleep(delay)
        if load.poll() is not None:
            raise CheckFailed(f"{what} ended before the crash:\n" + tail(log.read_text()))
        crash(mnt, server.freeze, server.kill)
    finally:
        if load.poll() is None:
            load.kill()
        load.wait(60)
    mnt.mount()


def restart_after_crash(server: Server, marker: str) -> None:
    """Start the server again; its log must show that it ran crash recovery."""
    log_from = len(server.log_text())
    server.start()
    recovery = server.log_text()[log_from:]
    if marker not in recovery:
        raise CheckFailed(f"no crash recovery in the server log:\n{tail(recovery)}")


# --------------------------------------------------------------------------------- fio

def fio_scenario(lab: Lab, report: Report, size: str = "16m") -> None:
    """Every job file on a mount with 16 KiB units; then again after a remount with
    --verify_only; then a control: one corrupted block must be found."""
    area = "fio"
    per_job = fiomod.size_bytes(size)
    files = fiomod.job_files()
    dev = loop_device(lab, max(2 * GiB, 24 * per_job * len(files)), fallocate=False)
    mnt = AtomicMount(lab, dev, lab.path("mnt"), ["atomic_unit=16k"]).mkfs().mount()
    before = mnt.counters()
    for job in files:
        t = time.monotonic()
        r = fiomod.run_fio(job, mnt.path / job.stem, size, lab.root)
        report.ok(area, f"{job.stem}: {r.jobs} jobs verified",
                  f"{r.written >> 20} MiB written and read back, {r.write_kib_s / 1024:.1f} "
                  "MiB/s", t)
    delta = counter_delta(before, mnt.counters())
    if atomic_writebacks(delta) == 0:
        raise CheckFailed(f"no atomic writebacks counted on a 16 KiB-unit mount: {delta}")
    report.ok(area, "16 KiB writes went out as atomic units",
              f"{atomic_writebacks(delta)} atomic writebacks")
    t = time.monotonic()
    mnt.umount_and_fsck(after="fio")
    mnt.mount()
    for job in files:
        fiomod.run_fio(job, mnt.path / job.stem, size, lab.root, verify_only=True)
    report.ok(area, "all data verifies again after umount, fsck and mount", "", t)
    # Control: the verification must be able to fail.
    victim = next((mnt.path / "rand-buffered").glob("*"))
    with open(victim, "r+b") as f:
        f.seek(16384 * 3 + 100)
        f.write(b"\xa5" * 64)
    try:
        fiomod.run_fio(fiomod.JOB_DIR / "rand-buffered.fio", mnt.path / "rand-buffered", size,
                       lab.root, verify_only=True)
    except CheckFailed:
        report.ok(area, "control: fio finds a block changed behind its back")
    else:
        raise CheckFailed("fio --verify_only did not notice a corrupted block")
    mnt.umount()


# ------------------------------------------------------------------------------- mmap

def mmap_scenario(lab: Lab, report: Report) -> None:
    """What shared writable mmap does to atomic folios: the kernel writes dirty mmap pages
    back as one FUSE write per run of contiguous dirty pages, so a 16 KiB unit becomes
    atomic only when one such run covers it whole."""
    area = "mmap"
    mnt = AtomicMount(lab, str(lab.path("mmap.img")), lab.path("mmap-mnt"),
                      ["atomic_unit=16k"])
    atomicfs("mkfs", mnt.target, "--size", "256M")
    mnt.mount()
    path = mnt.path / "shared"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 4 << 20)
        os.fsync(fd)
        m = mmap.mmap(fd, 4 << 20)
        cases = [  # dirty pages (4 KiB) -> atomic units expected after msync
            ("pages 2-9: unit 1 covered whole", list(range(2, 10)), 1),
            ("pages 16-23 but 20: unit 4 whole, unit 5 not", [16, 17, 18, 19, 21, 22, 23], 1),
            ("one page", [40], 0),
            ("2 MiB of contiguous pages", list(range(512, 1024)), 128),
        ]
        for name, pages, want in cases:
            before = mnt.counters()
            for p in pages:
                m[p * 4096:(p + 1) * 4096] = os.urandom(4096)
            m.flush()
            got = atomic_writebacks(counter_delta(before, mnt.counters()))
            if got != want:
                raise CheckFailed(f"mmap {name}: {got} atomic writebacks, expected {want}")
            report.ok(area, f"msync of {name}", f"{got} atomic units")
        m.close()
    finally:
        os.close(fd)
    mnt.umount()


# ----------------------------------------------------------------------------- SQLite

def sqlite_scenario(lab: Lab, report: Report, mode: str, workers: int = 3,
                    transactions: int = 150, kills: int = 1, kill_after: tuple[float, float]
                    = (3.0, 6.0), accounts: int = 500, seed: int = 1) -> None:
    """mode 'delete' (rollback journal) or 'wal'. A complete run, then kills mid-run."""
    area = f"sqlite-{mode}"
    rnd = random.Random(seed)
    dev = loop_device(lab, 2 * GiB, name=f"{mode}.img", fallocate=False)
    mnt = AtomicMount(lab, dev, lab.path(f"{mode}-mnt"), ["atomic_unit=16k"]).mkfs().mount()
    db = mnt.path / "bank.db"
    out = lab.dir(f"{mode}-out")
    # The database page matches the unit, as PostgreSQL's and InnoDB's do.
    sqlitedb.create(db, mode, accounts, page_size=16384)
    t = time.monotonic()
    w = sqlitedb.Workload(db, out, "full", workers, accounts, seed, transactions)
    w.wait(900)
    got = sqlitedb.check(db, mode, accounts, w.committed())
    if got["transactions"] != (workers + 1) * transactions:
        raise CheckFailed(f"{got['transactions']} transactions in the history, expected "
                          f"{(workers + 1) * transactions}")
    report.ok(area, f"{workers} Python writers and the sqlite3 shell",
              f"{got['transactions']} transactions, integrity_check ok", t)
    for i in range(kills):
        t = time.monotonic()
        run_out = lab.dir(f"{mode}-out-{i}")
        w = sqlitedb.Workload(db, run_out, f"crash{i}", workers, accounts, seed * 1000 + i, 0)
        try:
            delay = rnd.uniform(*kill_after)
            time.sleep(delay)
            if any(p.poll() is not None for p in w.procs):
                raise CheckFailed("a SQLite writer died before the crash:\n" + "\n".join(
                    o.read_text(errors="replace")[-300:] for o in w.outs))
            crash(mnt, lambda: freeze_pids(w.pids()), lambda pids: kill_pids(pids))
        finally:
            w.reap()
        claimed = w.committed()
        if not claimed:
            raise CheckFailed("no transaction committed before the crash: nothing tested")
        mnt.mount()
        got = sqlitedb.check(db, mode, accounts, claimed)
        report.ok(area, f"crash {i + 1} after {delay:.1f}s: recovered",
                  f"integrity_check ok, all {len(claimed)} acknowledged commits present", t)
    mnt.umount_and_fsck()


def freeze_pids(pids: list[int]) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    return pids


# ------------------------------------------------------------------------- PostgreSQL

PG_SETTINGS = {"full_page_writes": "off"}


def pg_datadir(mnt_path: Path, unit: int | None) -> Path:
    """The data directory, owned by postgres; with unit, the xattr is set before initdb
    so that every file and directory initdb creates inherits it."""
    d = mnt_path / "pgdata"
    d.mkdir(mode=0o700)
    shutil.chown(d, "postgres", "postgres")
    if unit:
        set_unit(d, unit)
    return d


# Issue 17's reproduction: a 2 GiB device (a 128 MiB log), checkpoints every 30 s, a WAL
# that may grow to 256 MB: the log fills and is checkpointed again and again.
PG_LOGFULL_SETTINGS = {**PG_SETTINGS, "shared_buffers": "64MB", "max_wal_size": "256MB",
                       "checkpoint_timeout": "30s"}


def postgres_scenario(lab: Lab, report: Report, scale: int = 2, clients: int = 4,
                      seconds: int = 15, kills: int = 1,
                      kill_after: tuple[float, float] = (4.0, 10.0), seed: int = 1,
                      device_size: int = 8 * GiB, settings: dict[str, str] | None = None,
                      stop_after_recovery: bool = False) -> None:
    """pgbench, then `kills` times: SIGKILL under load, remount, recovery, pg_amcheck;
    with stop_after_recovery also a clean stop and start after each recovery (the
    shutdown checkpoint's fsyncs are where issue 17 hung)."""
    area = "postgres"
    rnd = random.Random(seed)
    dev = loop_device(lab, device_size, name="pg.img", fallocate=False)
    mnt = AtomicMount(lab, dev, lab.path("pg-mnt"), ["allow_other"]).mkfs().mount()
    datadir = pg_datadir(mnt.path, 8192)
    pg = PgServer(lab, datadir, settings or PG_SETTINGS)
    t = time.monotonic()
    pg.initdb()
    for rel in ("global/pg_control", "pg_wal"):
        unit = mnt.stat(f"pgdata/{rel}")["atomic_unit"]
        if unit != 8192:
            raise CheckFailed(f"pgdata/{rel} has atomic unit {unit}, not 8192 (inherited)")
    report.ok(area, "initdb --data-checksums on atomicfs", "every file has 8 KiB units", t)
    pg.start()
    fpw = pg.psql("SHOW full_page_writes")
    if fpw != "off":
        raise CheckFailed(f"full_page_writes is {fpw}")
    t = time.monotonic()
    before = mnt.counters()
    pg.pgbench_init(scale)
    tps = pg.pgbench(clients, seconds)
    delta = counter_delta(before, mnt.counters())
    if atomic_writebacks(delta) == 0:
        raise CheckFailed(f"PostgreSQL's 8 KiB pages produced no atomic writebacks: {delta}")
    report.ok(area, f"pgbench -i -s {scale}; pgbench -c {clients} -T {seconds}",
              f"{tps:.0f} TPS, full_page_writes=off, {atomic_writebacks(delta)} atomic "
              "8 KiB writebacks", t)
    got = pg.check_consistency()
    report.ok(area, "pg_amcheck clean after the run",
              f"{got['relations_checked']} relations, {got['history_rows']} transactions")
    for i in range(kills):
        t = time.monotonic()
        rows_before = got["history_rows"]
        log = lab.path(f"pgbench-{i}.log")
        delay = rnd.uniform(*kill_after)
        crash_under_load(mnt, pg, pg.pgbench_start(clients, 3600, log), log, "pgbench", delay)
        restart_after_crash(pg, "automatic recovery in progress")
        got = pg.check_consistency()
        if got["history_rows"] < rows_before:
            raise CheckFailed(f"{rows_before - got['history_rows']} transactions committed "
                              "before this run are gone")
        report.ok(area, f"crash {i + 1} after {delay:.1f}s of pgbench: recovered, "
                  "pg_amcheck clean",
                  f"{got['relations_checked']} relations, balances agree, "
                  f"{got['history_rows']} transactions", t)
        if stop_after_recovery:
            t = time.monotonic()
            pg.stop()
            pg.start()
            report.ok(area, f"clean stop and start after crash {i + 1}",
                      f"log checkpoints so far: {mnt.counters().get('checkpoints')}", t)
    pg.stop()
    mnt.umount_and_fsck()


# ----------------------------------------------------------------------------- MariaDB

def mariadb_scenario(lab: Lab, report: Report, transactions: int = 2000, clients: int = 4,
                     kills: int = 1, kill_after: tuple[float, float] = (3.0, 8.0),
                     seed: int = 1) -> None:
    area = "mariadb"
    rnd = random.Random(seed)
    dev = loop_device(lab, 4 * GiB, name="mariadb.img", fallocate=False)
    mnt = AtomicMount(lab, dev, lab.path("my-mnt"), ["allow_other"]).mkfs().mount()
    datadir = mnt.path / "mysql"
    datadir.mkdir(mode=0o750)
    shutil.chown(datadir, "mysql", "mysql")
    set_unit(datadir, 16384)
    db = MariaServer(lab, datadir)
    t = time.monotonic()
    db.install()
    db.start()
    v = db.variables("innodb_doublewrite", "innodb_flush_method", "innodb_page_size")
    if v != {"innodb_doublewrite": "0", "innodb_flush_method": "O_DIRECT",
             "innodb_page_size": "16384"}:
        raise CheckFailed(f"server variables: {v}")
    db.create_bank()
    direct, total = db.o_direct_files()
    if total == 0 or direct != total:
        raise CheckFailed(f"{direct} of {total} open .ibd files use O_DIRECT")
    unit = mnt.stat("mysql/bank/acct.ibd")["atomic_unit"]
    if unit != 16384:
        raise CheckFailed(f"bank/acct.ibd has atomic unit {unit}")
    # mariadb-install-db writes the Aria system tables without fsync. A crash before the
    # flusher writes them (dirty_expire, 30 s) leaves them at their logged size but
    # reading as zeros (README: limits), which CHECK TABLE reports as corrupt: write
    # everything back, as on any server that has been up for a minute. (sync -f would
    # not do: syncfs does not reach a FUSE daemon.)
    mnt.sync()
    report.ok(area, "install, start with innodb_doublewrite=0, innodb_flush_method=O_DIRECT",
              f"{total} .ibd files open with O_DIRECT, 16 KiB units", t)
    t = time.monotonic()
    before = mnt.counters()
    secs = db.slap(clients, transactions)
    delta = counter_delta(before, mnt.counters())
    got = db.check_consistency()
    if got["transactions"] != transactions:
        raise CheckFailed(f"{got['transactions']} transfers in the history, expected "
                          f"{transactions}")
    if atomic_writebacks(delta) == 0:
        raise CheckFailed(f"InnoDB's 16 KiB pages produced no atomic writebacks: {delta}")
    report.ok(area, f"mariadb-slap: {transactions} transfers from {clients} clients",
              f"{transactions / secs:.0f} TPS, CHECK TABLE clean on {got['tables_checked']} "
              f"tables, {atomic_writebacks(delta)} atomic 16 KiB writebacks", t)
    for i in range(kills):
        t = time.monotonic()
        log = lab.path(f"slap-{i}.log")
        delay = rnd.uniform(*kill_after)
        crash_under_load(mnt, db, db.slap_start(clients, log), log, "mariadb-slap", delay)
        restart_after_crash(db, "crash recovery")
        got = db.check_consistency()
        report.ok(area, f"crash {i + 1} after {delay:.1f}s of mariadb-slap: recovered",
                  f"CHECK TABLE clean on {got['tables_checked']} tables, balances agree, "
                  f"{got['transactions']} transfers", t)
    db.stop()
    mnt.umount_and_fsck()


# --------------------------------------------------------------- pgbench: side by side

def pgbench_compare(lab: Lab, report: Report, scale: int = 10, clients: int = 4,
                    seconds: int = 60, device_size: int = 8 * GiB) -> list[dict[str, Any]]:
    """PostgreSQL on atomicfs (8 KiB units) and on kernel XFS, one after the other on the
    same loop device over a fallocated file, with the same settings and pgbench runs."""
    dev = loop_device(lab, device_size, name="bench.img", fallocate=True)
    configs = [("atomicfs", "off"), ("atomicfs", "on"), ("xfs", "on"), ("xfs", "off")]
    rows: list[dict[str, Any]] = []
    for i, (fs, fpw) in enumerate(configs):
        t = time.monotonic()
        sub = Lab(f"bench-{i}")
        try:
            mp = sub.path("mnt")
            if fs == "atomicfs":
                mnt = AtomicMount(sub, dev, mp, ["allow_other"]).mkfs()
                mnt.mount()
            else:
                kernel_mount(sub, dev, mp, "xfs", mkfs=["mkfs.xfs", "-q", "-f"])
            datadir = pg_datadir(mp, 8192 if fs == "atomicfs" else None)
            pg = PgServer(sub, datadir, {"full_page_writes": fpw}, name="bench")
            pg.initdb()
            pg.start()
            pg.pgbench_init(scale)
            pg.psql("CHECKPOINT")
            lsn0 = pg.wal_lsn()
            tps = pg.pgbench(clients, seconds, keep_history=False)
            wal = pg.wal_lsn() - lsn0
            pg.stop()
            txns = tps * seconds
            row = {"filesystem": "atomicfs (8 KiB units)" if fs == "atomicfs" else "XFS",
                   "full_page_writes": fpw, "tps": round(tps, 1),
                   "wal_mib": round(wal / (1 << 20), 1),
                   "wal_per_txn": round(wal / txns) if txns else 0}
            rows.append(row)
            report.ok("pgbench", f"{row['filesystem']}, full_page_writes={fpw}",
                      f"{tps:.0f} TPS, {row['wal_mib']} MiB WAL", t)
        finally:
            errors = sub.close()
        if errors:
            raise CheckFailed(f"cleanup after {fs}: {errors}")
    report.tables["pgbench"] = rows
    return rows
