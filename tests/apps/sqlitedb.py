"""SQLite: a bank database created with the sqlite3 shell, written by several processes
at once (Python's sqlite3 module, plus one sqlite3 shell), checked with the shell's
PRAGMA integrity_check and with invariants that a torn or lost page would break."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.apps.harness import CheckFailed, run

WORKER = Path(__file__).parent / "sqlite_worker.py"
START_BALANCE = 1000


def create(db: Path, mode: str, accounts: int, page_size: int) -> None:
    """mode: 'wal' or 'delete' (the rollback journal)."""
    journal = {"wal": "WAL", "delete": "DELETE"}[mode]
    script = f"""
PRAGMA page_size={page_size};
PRAGMA journal_mode={journal};
CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL);
CREATE TABLE hist(worker TEXT NOT NULL, seq INTEGER NOT NULL, a INTEGER NOT NULL,
                  b INTEGER NOT NULL, amount INTEGER NOT NULL, pad BLOB,
                  PRIMARY KEY(worker, seq));
CREATE INDEX hist_a ON hist(a);
CREATE INDEX hist_b ON hist(b);
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < {accounts})
INSERT INTO acct SELECT x, {START_BALANCE} FROM n;
"""
    out = run(["sqlite3", "-bail", "-batch", str(db)], input=script).stdout
    if mode == "wal" and "wal" not in out:
        raise CheckFailed(f"sqlite3 did not switch to WAL mode: {out!r}")


def shell_script(name: str, seed: int, count: int, accounts: int) -> str:
    """The same transfers as the Python workers, as a sqlite3 shell script; each commit
    is followed by a line naming it."""
    rnd = random.Random(seed)
    lines = [".timeout 60000", "PRAGMA synchronous=EXTRA;"]
    for seq in range(count):
        a, b = rnd.randrange(1, accounts + 1), rnd.randrange(1, accounts + 1)
        amount = rnd.randrange(1, 100)
        lines.append(
            f"BEGIN IMMEDIATE; UPDATE acct SET bal = bal - {amount} WHERE id = {a}; "
            f"UPDATE acct SET bal = bal + {amount} WHERE id = {b}; "
            f"INSERT INTO hist VALUES ('{name}', {seq}, {a}, {b}, {amount}, "
            f"randomblob({rnd.randrange(100, 2000)})); COMMIT; SELECT '{name} {seq}';")
    return "\n".join(lines) + "\n"


class Workload:
    """Writers started together; each one's commit lines go to a file outside the
    filesystem under test."""

    def __init__(self, db: Path, outdir: Path, tag: str, workers: int, accounts: int,
                 seed: int, count: int) -> None:
        """tag names this run's writers (history keys are unique per writer)."""
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outs: list[Path] = []
        for i in range(workers):
            out = outdir / f"worker{i}.out"
            self.outs.append(out)
            with open(out, "wb") as f:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), str(db), f"{tag}py{i}", str(seed * 100 + i),
                     str(count), str(accounts)], stdout=f, stderr=subprocess.STDOUT))
        # One sqlite3 shell among them. Its output is block-buffered, so after a crash
        # fewer of its commits are claimed, never more.
        script = outdir / "shell.sql"
        script.write_text(shell_script(f"{tag}sh", seed * 100 + 99, count or 100_000, accounts))
        out = outdir / "shell.out"
        self.outs.append(out)
        with open(out, "wb") as f, open(script, "rb") as src:
            self.procs.append(subprocess.Popen(["sqlite3", "-bail", "-batch", str(db)],
                                               stdin=src, stdout=f, stderr=subprocess.STDOUT))

    def wait(self, timeout: float) -> None:
        for p in self.procs:
            p.wait(timeout)
        bad = [(p.args, p.returncode) for p in self.procs if p.returncode != 0]
        if bad:
            raise CheckFailed(f"SQLite writers failed: {bad}:\n" +
                              "\n".join(o.read_text(errors="replace")[-500:]
                                        for o in self.outs))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def reap(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(30)

    def committed(self) -> set[tuple[str, int]]:
        """Transactions reported committed (complete lines only)."""
        done: set[tuple[str, int]] = set()
        for out in self.outs:
            text = out.read_text(errors="replace")
            for line in text.split("\n")[:-1]:  # the last piece has no newline yet
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    done.add((parts[0], int(parts[1])))
        return done


def check(db: Path, mode: str, accounts: int, claimed: set[tuple[str, int]]
          ) -> dict[str, int]:
    """The shell opens the database first (rolling back a hot journal or recovering the
    WAL), then integrity_check, the balance invariants and durability of every claimed
    commit."""
    res = run(["sqlite3", "-batch", str(db), "PRAGMA integrity_check;"], check=False)
    if res.returncode != 0 or res.stdout.strip() != "ok":
        raise CheckFailed(f"PRAGMA integrity_check on {db.name}: "
                          f"{(res.stdout + res.stderr).strip()[:2000]}")
    conn = sqlite3.connect(db, timeout=60)
    try:
        jm = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if jm != mode:
            raise CheckFailed(f"journal_mode is {jm}, expected {mode}")
        total, n = conn.execute("SELECT sum(bal), count(*) FROM acct").fetchone()
        if n != accounts or total != accounts * START_BALANCE:
            raise CheckFailed(f"{n} accounts holding {total}; expected {accounts} holding "
                              f"{accounts * START_BALANCE}")
        wrong = conn.execute(
            f"SELECT count(*) FROM acct WHERE bal != {START_BALANCE}"
            " + (SELECT coalesce(sum(amount), 0) FROM hist WHERE b = acct.id)"
            " - (SELECT coalesce(sum(amount), 0) FROM hist WHERE a = acct.id)").fetchone()[0]
        if wrong:
            raise CheckFailed(f"{wrong} balances disagree with the history")
        present = set(conn.execute("SELECT worker, seq FROM hist").fetchall())
    finally:
        conn.close()
    lost = claimed - present
    if lost:
        raise CheckFailed(f"{len(lost)} committed transactions lost, e.g. "
                          f"{sorted(lost)[:5]}")
    return {"transactions": len(present), "claimed": len(claimed)}
