"""SQLite in rollback-journal and WAL mode (WAL shares its -shm index through writable
mmap), several writer processes, SIGKILL of the daemon mid-workload; and what msync of
mmapped pages does to atomic units."""
from __future__ import annotations

import pytest

from tests.apps.conftest import need_tools
from tests.apps.harness import Lab
from tests.apps.scenarios import Report, mmap_scenario, sqlite_scenario

pytestmark = [pytest.mark.apps, pytest.mark.mount, pytest.mark.timeout(900)]


def test_mmap_writeback_makes_whole_units_atomic(lab: Lab, report: Report) -> None:
    need_tools()
    mmap_scenario(lab, report)


@pytest.mark.parametrize("mode", ["delete", "wal"])
@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_sqlite_survives_daemon_kill(lab: Lab, report: Report, mode: str) -> None:
    need_tools("sqlite3")
    sqlite_scenario(lab, report, mode, workers=3, transactions=150, kills=1)
    assert any("crash 1" in c.name for c in report.checks)
