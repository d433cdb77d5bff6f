"""fio with verify=crc32c on 16 KiB units: buffered, O_DSYNC, O_DIRECT (libaio),
random, sequential and mixed sizes, several jobs each, verified again after a remount."""
from __future__ import annotations

import os

import pytest

from tests.apps.conftest import need_tools
from tests.apps.harness import Lab
from tests.apps.scenarios import Report, fio_scenario

pytestmark = [pytest.mark.apps, pytest.mark.mount, pytest.mark.timeout(900)]


def test_fio_jobs_verify_before_and_after_remount(lab: Lab, report: Report) -> None:
    need_tools("fio")
    fio_scenario(lab, report, size=os.environ.get("APPS_FIO_SIZE", "16m"))
    assert len(report.checks) >= 8
