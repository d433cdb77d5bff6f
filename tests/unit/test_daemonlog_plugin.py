"""The daemon log check (tests/daemonlog_plugin.py), run on tiny test files by a pytest of
their own: a daemon's unexpected warning fails the test, an allowed one does not; a
mounted daemon's log is read even after the daemon removed it, and another session's
daemons are not this test's."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.daemonlog_plugin import Record, allowances, parse, unexpected

ROOT = Path(__file__).resolve().parents[2]


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str
              ) -> pytest.RunResult:
    """Run source as a test file in a separate pytest with the plugin, mounted daemons'
    logs looked for in pytester's log/ directory."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    log_dir = pytester.mkdir("log")
    monkeypatch.setenv("INNER_LOG_DIR", str(log_dir))
    pytester.makeini(f"[pytest]\ndaemon_log_dir = {log_dir}\n")
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "tests.daemonlog_plugin", "-p",
                                         "no:cacheprovider", "-ra")


IN_PROCESS = '''
import logging
import pytest

log = logging.getLogger("atomicfs.journal")

def test_unexpected():
    log.warning("log write of batch 1 failed: EIO")

@pytest.mark.daemon_log(allow=[r"^log write of batch \\d+ failed"])
def test_allowed_by_marker():
    log.warning("log write of batch 1 failed: EIO")

@pytest.mark.daemon_log(r"^something else")
def test_another_allowance():
    log.error("checkpoint failed")

def test_allowed_by_fixture(daemon_log):
    daemon_log.allow("^checkpoint failed$")
    log.error("checkpoint failed")

def test_info_is_not_checked():
    log.info("mounted")

def test_failing_on_its_own():
    log.warning("the reason it failed")
    assert False
'''


def test_in_process_warnings_fail_the_test_unless_allowed(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_inner(pytester, monkeypatch, IN_PROCESS)
    res.assert_outcomes(passed=5, failed=1, errors=2)
    out = res.stdout.str()
    assert "ERROR test_inner.py::test_unexpected" in out
    assert "ERROR test_inner.py::test_another_allowance" in out
    assert "[in-process] atomicfs.journal WARNING: log write of batch 1 failed: EIO" in out
    assert "[in-process] atomicfs.journal ERROR: checkpoint failed" in out
    # a test that failed by itself shows the records with its failure, no second error
    assert "daemon log: unexpected warnings/errors" in out
    assert "the reason it failed" in out


MOUNTED = '''
import os
import subprocess
import sys

import pytest

from tests.daemonlog_plugin import watch_now

# A stand-in for a detached daemon: writes <pid>.log in daemonlog's format, then, as on a
# clean exit, removes it.
DAEMON = """
import os, sys, time
path = os.path.join(sys.argv[1], f"{os.getpid()}.log")
with open(path, "a") as f:
    f.write("2026-12-05 06:39:53,097 atomicfs.device INFO: opened fs.img\\\\n")
    f.flush()
    print("up", flush=True)
    sys.stdin.readline()
    f.write("2026-12-05 06:39:54,001 atomicfs.journal ERROR: log write of batch 1 failed\\\\n"
            "Traceback (most recent call last):\\\\n")
time.sleep(float(sys.argv[2]))
os.unlink(path)
"""

def daemon(watch=True, env=None):
    p = subprocess.Popen([sys.executable, "-c", DAEMON, os.environ["INNER_LOG_DIR"],
                          "0" if watch else "0.3"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline() == "up\\n"
    if watch:
        watch_now()
    p.communicate("go\\n")
    assert p.returncode == 0

def test_warns():
    daemon()

def test_warns_seen_by_the_watcher_alone():
    daemon(watch=False)

@pytest.mark.daemon_log(allow=[r"^log write of batch 1 failed"])
def test_warns_allowed():
    daemon()

def test_another_sessions_daemon():
    daemon(env={k: v for k, v in os.environ.items() if k != "ATOMICFS_TEST_SESSION"})
'''


def test_a_mounted_daemons_removed_log_is_read(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    res = run_inner(pytester, monkeypatch, MOUNTED)
    res.assert_outcomes(passed=4, errors=2)
    out = res.stdout.str()
    assert "ERROR test_inner.py::test_warns " in out
    assert "ERROR test_inner.py::test_warns_seen_by_the_watcher_alone" in out
    assert "atomicfs.journal ERROR: log write of batch 1 failed\nTraceback" in out
    assert "atomicfs.device" not in out  # INFO is not checked


def rec(message: str, level: int = logging.WARNING, name: str = "atomicfs.fs") -> Record:
    return Record("pid 1", name, level, message)


def test_lines_parse_into_records_with_their_continuations() -> None:
    lines = [b"C code wrote this",
             b"2026-12-05 06:39:53,097 atomicfs.device INFO: opened x",
             b"2026-12-05 06:39:53,098 atomicfs.fs ERROR: boom",
             b"Traceback (most recent call last):", b"  oops"]
    got = parse(lines, "pid 1")
    assert [(r.name, r.level, r.message) for r in got] == [
        ("stderr", logging.WARNING, "C code wrote this"),
        ("atomicfs.device", logging.INFO, "opened x"),
        ("atomicfs.fs", logging.ERROR, "boom\nTraceback (most recent call last):\n  oops")]


def test_a_repeat_count_is_allowed_only_after_an_allowed_message() -> None:
    allow = allowances(["^expected"])
    records = [rec("expected 1"), rec("last message repeated 4 times"),
               rec("surprise"), rec("last message repeated 2 times"),
               rec("mounted", logging.INFO)]
    assert [r.message for r in unexpected(records, allow)] == [
        "surprise", "last message repeated 2 times"]


def test_a_pattern_matches_each_line_of_a_message_with_a_traceback() -> None:
    message = "opendir failed; the request gets EIO\nTraceback (most recent call last):"
    assert unexpected([rec(message)], allowances([r"^opendir failed; .* EIO$"])) == []
    assert unexpected([rec(message)], allowances([r"^Traceback$"])) != []
