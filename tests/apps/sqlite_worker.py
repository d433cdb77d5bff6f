"""One writer of the SQLite bank workload (run as a separate process, so that several
processes share the database and, in WAL mode, its mmapped -shm index).

usage: sqlite_worker.py DB NAME SEED COUNT ACCOUNTS

Each transaction moves a random amount between two accounts and records itself in the
history under (NAME, seq); "NAME seq" is printed only after COMMIT returned, so every
printed line is a transaction SQLite promised durable. synchronous=EXTRA, because in
rollback-journal mode the commit point is the journal's unlink, which FULL leaves to the
next directory sync (SQLite's documented gap, on ext4 as here); in WAL mode EXTRA is FULL.
"""
from __future__ import annotations

import random
import sqlite3
import sys


def main(argv: list[str]) -> int:
    db, name, seed, count, accounts = argv[1], argv[2], int(argv[3]), int(argv[4]), \
        int(argv[5])
    rnd = random.Random(seed)
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    conn.execute("PRAGMA synchronous=EXTRA")
    seq = 0
    while count == 0 or seq < count:
        a, b = rnd.randrange(1, accounts + 1), rnd.randrange(1, accounts + 1)
        amount = rnd.randrange(1, 100)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE acct SET bal = bal - ? WHERE id = ?", (amount, a))
        conn.execute("UPDATE acct SET bal = bal + ? WHERE id = ?", (amount, b))
        conn.execute("INSERT INTO hist(worker, seq, a, b, amount, pad) "
                     "VALUES (?, ?, ?, ?, ?, randomblob(?))",
                     (name, seq, a, b, amount, rnd.randrange(100, 2000)))
        conn.execute("COMMIT")
        print(f"{name} {seq}", flush=True)
        seq += 1
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
