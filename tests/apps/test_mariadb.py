"""MariaDB with innodb_doublewrite=0 and O_DIRECT on 16 KiB atomic units: a transfer
workload, SIGKILL of the daemon and the server mid-run; recovery must succeed and
CHECK TABLE find nothing."""
from __future__ import annotations

import pytest

from tests.apps.conftest import need_tools
from tests.apps.harness import Lab
from tests.apps.scenarios import Report, mariadb_scenario

pytestmark = [pytest.mark.apps, pytest.mark.mount, pytest.mark.timeout(1200)]


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_mariadb_without_doublewrite_survives_crash(lab: Lab, report: Report) -> None:
    need_tools("mariadbd", "mariadb-slap")
    mariadb_scenario(lab, report, transactions=2000, clients=4, kills=1)
    assert any("crash 1" in c.name for c in report.checks)
