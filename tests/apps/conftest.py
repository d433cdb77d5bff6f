"""Fixtures of the application tests: a Lab per test (torn down even when the test fails,
and a failed teardown fails the test) and the tool check, which skips on a developer
machine without the packages but fails in CI (`make test` installs them first through
`make apps-deps`)."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.apps.harness import CI, Lab, environment_problems, missing_tools
from tests.apps.scenarios import Report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "apps: real applications (fio, SQLite, PostgreSQL, "
                            "MariaDB) on real mounts; installed by make apps-deps")


def need_tools(*tools: str) -> None:
    problems = environment_problems()
    missing = missing_tools(tools)
    if not problems and not missing:
        return
    why = ", ".join(problems + ([f"Debian packages {' '.join(missing)} (make apps-deps)"]
                               if missing else []))
    if CI:
        pytest.fail(f"CI requires {why}", pytrace=False)
    pytest.skip(f"needs {why}")


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(request.node.name.replace("[", "-").replace("]", "")[:40])
    try:
        yield lab
    finally:
        errors = lab.close()
    if errors:
        pytest.fail("cleanup failed: " + "; ".join(errors), pytrace=False)


@pytest.fixture
def report() -> Report:
    return Report()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Last line of defence: no lab (servers, mounts, loop devices) outlives the run."""
    Lab.close_all()
