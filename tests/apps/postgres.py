"""PostgreSQL (Debian's server packages) on a directory of our choosing: initdb, a server
started as user postgres on a private Unix socket (no TCP), pgbench, the crash, and the
checks after recovery: pg_amcheck over every table and index, the TPC-B balance invariant
and the data-checksum failure counter."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Sequence

from tests.apps.harness import (CheckFailed, Lab, Server, freeze_tree, kill_pids, pg_bindir,
                                run, tail, wait_for)

USER = "postgres"

# A checkpoint every 30 s, so that a run of a minute pays for full-page images several
# times, as a long-running server does; everything else is the default.
COMMON_SETTINGS: dict[str, str] = {
    "listen_addresses": "",
    "checkpoint_timeout": "30s",
    "log_checkpoints": "on",
    "max_connections": "40",
}


class PgServer(Server):
    program = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown: a shutdown checkpoint, then exit
    shutdown_signal = signal.SIGQUIT  # immediate shutdown
    shutdown_timeout = 30.0

    def __init__(self, lab: Lab, datadir: Path, settings: dict[str, str], name: str = "pg"
                 ) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise CheckFailed("PostgreSQL is not installed (make apps-deps)")
        self.bin = bindir
        self.lab = lab
        self.datadir = datadir
        self.sockdir = lab.dir(f"{name}-sock", owner=USER)
        self.logfile = lab.path(f"{name}.log")
        self.settings = {**COMMON_SETTINGS, "unix_socket_directories": str(self.sockdir),
                         **settings}
        self.port = "5432"  # only names the socket file; there is no TCP listener
        self.proc: subprocess.Popen[bytes] | None = None
        lab.defer(f"stop PostgreSQL in {datadir}", self.cleanup)

    def tool(self, name: str) -> str:
        return os.path.join(self.bin, name)

    # ------------------------------------------------------------------ life cycle

    def initdb(self) -> None:
        """initdb with data checksums: with full_page_writes=off a torn page would then
        fail its checksum on read instead of passing unnoticed."""
        run([self.tool("initdb"), "-D", str(self.datadir), "-A", "trust", "-U", USER,
             "--data-checksums", "--locale=C", "-E", "UTF8"], user=USER, timeout=600)

    def start(self, timeout: float = 600) -> None:
        """Start the postmaster as our child (so we hold its pid even when its data
        directory is gone with a dead mount) and wait until it accepts connections.
        Crash recovery happens here, hence the long timeout."""
        args = [self.tool("postgres"), "-D", str(self.datadir)]
        for k, v in self.settings.items():
            args += ["-c", f"{k}={v}"]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         user=USER, group=USER, extra_groups=[],
                                         start_new_session=True, cwd="/")

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise CheckFailed(f"postgres exited {self.proc.returncode} during start-up:"
                                  f"\n{self.log_tail()}")
            return run([self.tool("pg_isready"), "-q", "-h", str(self.sockdir), "-p",
                        self.port, "-t", "2"], check=False).returncode == 0

        wait_for(ready, timeout, "PostgreSQL to accept connections")

    def freeze(self) -> list[int]:
        """Stop every server process where it stands (the first half of the crash)."""
        assert self.proc is not None
        return freeze_tree(self.proc.pid)

    def kill(self, frozen: Sequence[int] = ()) -> None:
        """SIGKILL the postmaster and all its processes (the second half)."""
        if self.proc is None:
            return
        pids = list(frozen) or freeze_tree(self.proc.pid)
        kill_pids(pids)
        self.proc.wait(60)
        self.proc = None


    # ------------------------------------------------------------------ clients

    def conn_args(self) -> list[str]:
        return ["-h", str(self.sockdir), "-p", self.port, "-U", USER]

    def psql(self, sql: str, db: str = "postgres", timeout: float = 600) -> str:
        res = run([self.tool("psql"), *self.conn_args(), "-d", db, "-X", "-A", "-t", "-q",
                   "-v", "ON_ERROR_STOP=1", "-c", sql], timeout=timeout)
        return res.stdout.strip()

    def pgbench_init(self, scale: int, timeout: float = 1800) -> None:
        run([self.tool("pgbench"), *self.conn_args(), "-i", "-q", "-s", str(scale),
             "postgres"], timeout=timeout)

    def pgbench_args(self, clients: int, seconds: int, keep_history: bool) -> list[str]:
        """keep_history: -n, no VACUUM and no TRUNCATE pgbench_history before the run, so
        that the history keeps matching the balances across runs."""
        return [self.tool("pgbench"), *self.conn_args(), "-c", str(clients),
                "-j", str(min(clients, 2)), "-T", str(seconds), "-M", "prepared",
                *(["-n"] if keep_history else []), "postgres"]

    def pgbench(self, clients: int, seconds: int, keep_history: bool = True) -> float:
        """A timed TPC-B-like run; its TPS."""
        res = run(self.pgbench_args(clients, seconds, keep_history), timeout=seconds + 600)
        return parse_tps(res.stdout)

    def pgbench_start(self, clients: int, seconds: int, logfile: Path
                      ) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as log:
            return subprocess.Popen(self.pgbench_args(clients, seconds, True), stdout=log,
                                    stderr=subprocess.STDOUT)

    def wal_lsn(self) -> int:
        text = self.psql("SELECT pg_current_wal_lsn()")
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)

    # ------------------------------------------------------------------ checks

    def check_consistency(self) -> dict[str, int]:
        """Everything we can check after recovery; raises CheckFailed on the first
        problem, returns figures for the report."""
        res = run([self.tool("pg_amcheck"), *self.conn_args(), "--all", "--install-missing",
                   "--heapallindexed", "--parent-check"],
                  check=False, timeout=3600)
        if res.returncode != 0 or res.stdout.strip():
            raise CheckFailed(f"pg_amcheck exited {res.returncode}:\n"
                              f"{tail(res.stdout + res.stderr)}")
        checked = self.psql("SELECT count(*) FROM pg_class WHERE relkind IN ('r','i','t','m')")
        sums = self.psql("SELECT (SELECT coalesce(sum(abalance),0) FROM pgbench_accounts),"
                         " (SELECT coalesce(sum(tbalance),0) FROM pgbench_tellers),"
                         " (SELECT coalesce(sum(bbalance),0) FROM pgbench_branches),"
                         " (SELECT coalesce(sum(delta),0) FROM pgbench_history),"
                         " (SELECT count(*) FROM pgbench_history)")
        acc, tel, bra, hist, txns = (int(x) for x in sums.split("|"))
        if not acc == tel == bra == hist:
            tellers = self.psql(
                "SELECT t.tid, t.tbalance, coalesce(h.s, 0), coalesce(h.n, 0) FROM "
                "pgbench_tellers t LEFT JOIN (SELECT tid, sum(delta) s, count(*) n FROM "
                "pgbench_history GROUP BY tid) h USING (tid) "
                "WHERE t.tbalance IS DISTINCT FROM coalesce(h.s, 0)")
            raise CheckFailed(f"TPC-B balances disagree after recovery: accounts {acc}, "
                              f"tellers {tel}, branches {bra}, history {hist} ({txns} rows); "
                              f"tellers off (tid|tbalance|history sum|rows):\n{tellers}")
        failures = int(self.psql("SELECT coalesce(sum(checksum_failures),0) "
                                 "FROM pg_stat_database"))
        if failures:
            raise CheckFailed(f"{failures} data checksum failures")
        return {"relations_checked": int(checked), "history_rows": txns}


def parse_tps(output: str) -> float:
    m = re.search(r"^tps = ([0-9.]+)", output, re.M)
    if m is None:
        raise CheckFailed(f"no TPS in pgbench output:\n{tail(output)}")
    return float(m.group(1))
