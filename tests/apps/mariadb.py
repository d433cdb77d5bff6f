"""MariaDB (Debian's mariadb-server): a private server on a Unix socket (no TCP) with
innodb_doublewrite=0, a bank workload driven by mariadb-slap, and the checks after a
crash: CHECK TABLE ... EXTENDED on every table (mariadb-check) and the balance invariant."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Sequence

from tests.apps.harness import (CheckFailed, Lab, Server, kill_pids, run, tail, wait_for,
                                which)

USER = "mysql"
ACCOUNTS = 20000
START_BALANCE = 1000

BANK_SQL = f"""
CREATE DATABASE bank;
USE bank;
CREATE TABLE acct(id INT PRIMARY KEY, bal BIGINT NOT NULL,
                  pad CHAR(200) NOT NULL DEFAULT '') ENGINE=InnoDB;
CREATE TABLE hist(id BIGINT AUTO_INCREMENT PRIMARY KEY, a INT NOT NULL, b INT NOT NULL,
                  amount INT NOT NULL, pad VARCHAR(400), KEY(a), KEY(b)) ENGINE=InnoDB;
INSERT INTO acct(id, bal) SELECT seq, {START_BALANCE} FROM seq_1_to_{ACCOUNTS};
DELIMITER //
CREATE PROCEDURE transfer()
BEGIN
  DECLARE a INT DEFAULT FLOOR(1 + RAND() * {ACCOUNTS});
  DECLARE b INT DEFAULT FLOOR(1 + RAND() * {ACCOUNTS});
  DECLARE d INT DEFAULT FLOOR(1 + RAND() * 99);
  START TRANSACTION;
  UPDATE acct SET bal = bal - d WHERE id = a;
  UPDATE acct SET bal = bal + d WHERE id = b;
  INSERT INTO hist(a, b, amount, pad) VALUES (a, b, d, REPEAT('x', 100 + FLOOR(RAND() * 300)));
  COMMIT;
END//
DELIMITER ;
"""

O_DIRECT = 0o40000


class MariaServer(Server):
    program = "mariadbd"

    def __init__(self, lab: Lab, datadir: Path, flush_method: str = "O_DIRECT",
                 name: str = "mariadb") -> None:
        if which("mariadbd") is None:
            raise CheckFailed("MariaDB is not installed (make apps-deps)")
        self.lab = lab
        self.datadir = datadir
        self.rundir = lab.dir(f"{name}-run", owner=USER)
        self.socket = self.rundir / "mysqld.sock"
        self.logfile = self.rundir / "error.log"
        self.flush_method = flush_method
        self.proc: subprocess.Popen[bytes] | None = None
        lab.defer(f"stop MariaDB in {datadir}", self.cleanup)

    def server_args(self) -> list[str]:
        """No option files: everything that matters is on the command line."""
        return ["--no-defaults", f"--user={USER}", f"--datadir={self.datadir}",
                f"--socket={self.socket}", "--skip-networking",
                f"--pid-file={self.rundir / 'mysqld.pid'}", f"--log-error={self.logfile}",
                f"--tmpdir={self.rundir}",
                "--innodb-doublewrite=0", f"--innodb-flush-method={self.flush_method}",
                "--innodb-flush-log-at-trx-commit=1", "--innodb-buffer-pool-size=256M"]

    def install(self) -> None:
        run(["mariadb-install-db", "--no-defaults", f"--user={USER}",
             f"--datadir={self.datadir}", "--auth-root-authentication-method=normal",
             "--skip-test-db", "--innodb-doublewrite=0",
             f"--innodb-flush-method={self.flush_method}"], timeout=900)

    def start(self, timeout: float = 900) -> None:
        """mariadbd drops to user mysql itself, so the pid we hold is the server's.
        InnoDB crash recovery happens here."""
        mariadbd = which("mariadbd")
        assert mariadbd is not None
        self.proc = subprocess.Popen([mariadbd, *self.server_args()], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     cwd="/")

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise CheckFailed(f"mariadbd exited {self.proc.returncode} during start-up:"
                                  f"\n{self.log_tail()}")
            return run(["mariadb-admin", f"--socket={self.socket}", "-u", "root", "ping"],
                       check=False, timeout=30).returncode == 0

        wait_for(ready, timeout, "MariaDB to accept connections")

    def stop(self, timeout: float = 900) -> None:
        super().stop(timeout)  # SIGTERM: a normal shutdown

    def freeze(self) -> list[int]:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        return [self.proc.pid]

    def kill(self, frozen: Sequence[int] = ()) -> None:
        if self.proc is None:
            return
        kill_pids([self.proc.pid])
        self.proc.wait(60)
        self.proc = None


    # ------------------------------------------------------------------ clients

    def sql(self, sql: str, db: str = "", timeout: float = 900) -> str:
        args = ["mariadb", f"--socket={self.socket}", "-u", "root", "-N", "-B"]
        if db:
            args.append(db)
        return run(args, input=sql, timeout=timeout).stdout.strip()

    def variables(self, *names: str) -> dict[str, str]:
        out = self.sql("SELECT " + ", ".join(f"@@{n}" for n in names))
        return dict(zip(names, out.split("\t")))

    def create_bank(self) -> None:
        self.sql(BANK_SQL)

    def slap_args(self, clients: int, transactions: int) -> list[str]:
        return ["mariadb-slap", f"--socket={self.socket}", "-u", "root",
                "--create-schema=bank", "--query=CALL transfer()",
                f"--concurrency={clients}", f"--number-of-queries={transactions}",
                "--iterations=1"]

    def slap(self, clients: int, transactions: int) -> float:
        """Run transactions transfers from clients connections; seconds taken."""
        out = run(self.slap_args(clients, transactions), timeout=3600).stdout
        for line in out.splitlines():
            if "Average number of seconds" in line:
                return float(line.split(":")[1].split()[0])
        raise CheckFailed(f"no timing in mariadb-slap output:\n{tail(out)}")

    def slap_start(self, clients: int, logfile: Path) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as log:
            return subprocess.Popen(self.slap_args(clients, 10_000_000), stdout=log,
                                    stderr=subprocess.STDOUT)

    def o_direct_files(self) -> tuple[int, int]:
        """(files under the data directory open with O_DIRECT, all open there)."""
        assert self.proc is not None
        direct = total = 0
        root = str(self.datadir) + "/"
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
                with open(f"/proc/{self.proc.pid}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
            except (OSError, IndexError, ValueError):
                continue
            if target.startswith(root) and target.endswith(".ibd"):
                total += 1
                direct += bool(flags & O_DIRECT)
        return direct, total

    # ------------------------------------------------------------------ checks

    def check_consistency(self) -> dict[str, int]:
        res = run(["mariadb-check", f"--socket={self.socket}", "-u", "root",
                   "--all-databases", "--extended"], check=False, timeout=3600)
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip()]
        # "db.table   OK", or "db.table" followed by "note : ..." for engines without
        # CHECK; problems come as "error : ..." / "warning : ..." lines.
        bad: list[str] = []
        table = ""
        for ln in lines:
            low = ln.lower()
            if not low.startswith(("note", "status", "error", "warning")):
                table = ln.split()[0]
            # "hasn't closed the table properly" is what any crash leaves on an open
            # table; CHECK then looks at the data, whose problems are errors.
            if low.startswith("error") or "corrupt" in low or \
                    (low.startswith("warning") and "closed the table properly" not in low):
                bad.append(f"{table}: {ln}")
        tables = [ln for ln in lines
                  if not ln.lower().startswith(("note", "status", "error", "warning"))]
        if res.returncode != 0 or bad or not tables:
            raise CheckFailed(f"mariadb-check exited {res.returncode}:\n"
                              f"{tail(chr(10).join(bad) or res.stdout + res.stderr)}")
        total, n = (int(x) for x in self.sql("SELECT sum(bal), count(*) FROM acct",
                                             "bank").split("\t"))
        if n != ACCOUNTS or total != ACCOUNTS * START_BALANCE:
            raise CheckFailed(f"{n} accounts holding {total}; expected {ACCOUNTS} holding "
                              f"{ACCOUNTS * START_BALANCE}")
        wrong = int(self.sql(
            f"SELECT count(*) FROM acct WHERE bal != {START_BALANCE}"
            " + (SELECT coalesce(sum(amount), 0) FROM hist WHERE b = acct.id)"
            " - (SELECT coalesce(sum(amount), 0) FROM hist WHERE a = acct.id)", "bank"))
        if wrong:
            raise CheckFailed(f"{wrong} balances disagree with the history")
        txns = int(self.sql("SELECT count(*) FROM hist", "bank"))
        return {"tables_checked": len(tables), "transactions": txns}
