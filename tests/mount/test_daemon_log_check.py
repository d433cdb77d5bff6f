"""The daemon log check (tests/daemonlog_plugin.py) on a real mount, in a pytest of its own:
a detached daemon's error fails the test that made it, unless the test allows it."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.mount

ROOT = Path(__file__).resolve().parents[2]

INNER = '''
import os

import pytest


def fail_one_log_write(mounter, image):
    m = mounter(image, "inject=off")
    m.control("inject=log:1")  # the next log write fails, the rewrite succeeds
    fd = os.open(m / "f", os.O_CREAT | os.O_RDWR | os.O_DSYNC, 0o644)
    try:
        for _ in range(2):
            try:
                os.pwrite(fd, b"x" * 4096, 0)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_unmarked(mounter, image):
    fail_one_log_write(mounter, image)


@pytest.mark.daemon_log(allow=[r"^log write of batch \\d+ failed: .*Input/output error$"])
def test_marked(mounter, image):
    fail_one_log_write(mounter, image)
'''


def test_a_mounted_daemons_error_fails_the_test_unless_allowed(
        mount_env: None, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_inner=INNER)
    res = pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider",
                                        "-ra")
    res.assert_outcomes(passed=2, errors=1)
    out = res.stdout.str()
    assert "ERROR test_inner.py::test_unmarked" in out
    assert "atomicfs.journal ERROR: log write of batch" in out
