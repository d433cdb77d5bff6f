"""PostgreSQL with full_page_writes=off on 8 KiB atomic units: pgbench, then SIGKILL of the
daemon and the server mid-run; recovery must succeed and pg_amcheck find nothing."""
from __future__ import annotations

import pytest

from tests.apps.conftest import need_tools
from tests.apps.harness import Lab
from tests.apps.scenarios import Report, postgres_scenario

pytestmark = [pytest.mark.apps, pytest.mark.mount, pytest.mark.timeout(1200)]


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_postgres_without_full_page_writes_survives_crash(lab: Lab, report: Report) -> None:
    need_tools("postgres")
    postgres_scenario(lab, report, scale=2, clients=4, seconds=15, kills=1)
    assert any("crash 1" in c.name for c in report.checks)
