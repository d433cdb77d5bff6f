"""A pytest plugin: a test fails when the atomicfs daemon(s) it ran logged an unexpected
WARNING, ERROR or CRITICAL.

Two kinds of daemon are watched:

* in-process (tests/unit, tests/fs, the crash explorer's checks): a handler on the `atomicfs`
  logger collects what the package logs while the test runs;
* mounted daemons (`atomicfs mount`, detached): each writes `<pid>.log` in the runtime
  directory (when there is no system log) and removes it on a clean exit. A thread looks at
  that directory every few milliseconds and opens each new log at once, so the text stays
  readable after the daemon removed it; `watch_now()` does the same synchronously (the
  mount fixture calls it as soon as it knows the daemon's pid). The directory is shared
  with every other user of the machine: a log is taken only when its daemon's environment
  carries this session's token (set in os.environ, inherited by every command a test runs).

After the test's teardown (so what unmounting logs counts too) each record of level WARNING
or above that no allowance matches fails the test (reported as an error in teardown). A
test that failed already gets the records as a section of its failure instead. Allowances,
regular expressions searched in the record's message:

    @pytest.mark.daemon_log(allow=[r"device error", ...])   # or daemon_log(r"...", ...)
    def test_x(daemon_log): daemon_log.allow(r"...")         # decided while running

The patterns are multi-line (^ and $ match at each line of a message with a traceback).
A "last message repeated N times" line counts as allowed when the message it repeats was.
Not seen: daemons that log to the system log (/dev/log exists; the summary says so), and
daemons that exit within milliseconds of starting, outside the mount fixture, without
leaving their log behind.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from typing import BinaryIO, Generator, Iterable

import pytest

from atomicfs import daemonlog, runtime
from atomicfs.errors import UserError

TOKEN_VAR = "ATOMICFS_TEST_SESSION"
POLL_INTERVAL = 0.02  # seconds; a daemon that serves a mount lives far longer
MAX_SHOWN = 20  # offending lines shown per test
LOG_NAME = re.compile(r"^\d+\.log(\.\d+)?$")
# daemonlog's file format: "%(asctime)s %(name)s %(levelname)s: %(message)s"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\S+) "
                  r"(DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$")
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
          "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
REPEATED = re.compile(r"^last message repeated \d+ times$")

_reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()
_allow_key = pytest.StashKey[list[re.Pattern[str]]]()


@dataclass
class Record:
    source: str  # "in-process" or "pid N"
    name: str
    level: int
    message: str  # with continuation lines (tracebacks, C stderr)

    def line(self) -> str:
        return f"[{self.source}] {self.name} {logging.getLevelName(self.level)}: {self.message}"


# ------------------------------------------------------------------------ in-process

class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[Record] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.records.append(Record("in-process", record.name, record.levelno, text))

    def take(self) -> list[Record]:
        assert self.lock is not None  # made by Handler.__init__
        with self.lock:
            taken, self.records = self.records, []
        return taken


# -------------------------------------------------------------------- mounted daemons

@dataclass
class _LogFile:
    pid: int
    file: BinaryIO  # opened while the daemon still had the file
    partial: bytes = b""  # an unfinished last line, completed by the next read


@dataclass
class _Watcher:
    """Opens the log files of this session's daemons as they appear in the directory."""
    directory: str
    token: str
    # Open files by inode: an inode held open cannot be reused, so this names them well.
    files: dict[tuple[int, int], _LogFile] = field(default_factory=dict)
    # Other sessions' logs by name, with the inode and ctime seen: a removed file's inode
    # is soon another file's (ext4), so an inode alone would hide a later log of ours.
    foreign: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def poll(self) -> None:
        with self.lock:
            try:
                names = [n for n in os.listdir(self.directory) if LOG_NAME.match(n)]
            except OSError:
                return
            for name in names:
                self._consider(name)
            for gone in self.foreign.keys() - set(names):
                del self.foreign[gone]

    def _consider(self, name: str) -> None:
        path = os.path.join(self.directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in self.files \
                or self.foreign.get(name) == (st.st_dev, st.st_ino, st.st_ctime_ns):
            return
        pid = int(name.split(".")[0])
        if not self._ours(pid):
            self.foreign[name] = (st.st_dev, st.st_ino, st.st_ctime_ns)
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in self.files:  # renamed (rotated) since the lstat
            os.close(fd)
            return
        self.files[(st.st_dev, st.st_ino)] = _LogFile(pid, os.fdopen(fd, "rb"))

    def _ours(self, pid: int) -> bool:
        """Whether the daemon runs with this session's token (a dead one cannot tell)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            return False
        return f"{TOKEN_VAR}={self.token}".encode() in env

    def read_new(self) -> list[Record]:
        """Every record written since the last call; files already removed by their daemon
        are closed once read to the end."""
        self.poll()
        records: list[Record] = []
        with self.lock:
            for key, lf in list(self.files.items()):
                data = lf.partial + lf.file.read()
                lines = data.split(b"\n")
                lf.partial = lines.pop()
                records += parse(lines, f"pid {lf.pid}")
                if os.fstat(lf.file.fileno()).st_nlink == 0:
                    lf.file.close()
                    del self.files[key]
        return records

    def run(self) -> None:
        while not self.stop.wait(POLL_INTERVAL):
            self.poll()

    def close(self) -> None:
        self.stop.set()
        with self.lock:
            for lf in self.files.values():
                lf.file.close()
            self.files.clear()


def parse(lines: Iterable[bytes], source: str) -> list[Record]:
    """Records of WARNING and above in daemonlog's file format; a line that is not a
    record's first belongs to the record before it (a traceback), or, with none before,
    is output nobody formatted (C code writing to stderr) and counts as a warning."""
    out: list[Record] = []
    current: Record | None = None
    for raw in lines:
        text = raw.decode(errors="replace").rstrip("\r")
        m = LINE.match(text)
        if m:
            name, level, message = m.groups()
            current = Record(source, name, LEVELS[level], message)
            out.append(current)
        elif current is not None:
            current.message += "\n" + text
        elif text.strip():
            current = Record(source, "stderr", logging.WARNING, text)
            out.append(current)
    return out


# ----------------------------------------------------------------------------- verdict

def allowances(patterns: Iterable[str]) -> list[re.Pattern[str]]:
    return [re.compile(p, re.MULTILINE) for p in patterns]


def unexpected(records: list[Record], allow: list[re.Pattern[str]]) -> list[Record]:
    """The records of WARNING and above that no pattern matches."""
    bad: list[Record] = []
    allowed_last: dict[tuple[str, str], bool] = {}  # per daemon and logger: for repeats
    for r in records:
        key = (r.source, r.name)
        if REPEATED.match(r.message):
            ok = allowed_last.get(key, False)
        else:
            ok = any(p.search(r.message) for p in allow)
            allowed_last[key] = ok
        if r.level >= logging.WARNING and not ok:
            bad.append(r)
    return bad


class DaemonLog:
    """The `daemon_log` fixture: allowances decided while the test runs."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item

    def allow(self, *patterns: str) -> None:
        self._item.stash[_allow_key] += allowances(patterns)


@pytest.fixture
def daemon_log(request: pytest.FixtureRequest) -> DaemonLog:
    return DaemonLog(request.node)


# -------------------------------------------------------------------------------- hooks

_collector = _Collector()
_watcher: _Watcher | None = None
_note: str | None = None


def watch_now() -> None:
    """Open the logs of daemons that started since the last look (call it once a daemon's
    pid is known: the log is then certain to exist and to be taken)."""
    if _watcher is not None:
        _watcher.poll()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("daemon_log_dir", "where detached atomicfs daemons write their logs "
                  "(default: the runtime directory)", default="")


def pytest_configure(config: pytest.Config) -> None:
    global _watcher, _note
    config.addinivalue_line("markers", "daemon_log(*patterns, allow=[...]): regular "
                            "expressions of the daemon log warnings and errors this test "
                            "expects")
    logging.getLogger("atomicfs").addHandler(_collector)
    # A fresh token even when one is inherited: a pytest run by a test has its own daemons.
    token = os.environ[TOKEN_VAR] = uuid.uuid4().hex
    directory = str(config.getini("daemon_log_dir"))
    if not directory:
        if daemonlog.system_log_available():
            _note = ("daemon log check: mounted daemons log to the system log here; only "
                     "in-process records are checked")
            return
        try:
            directory = runtime.runtime_dir()
        except UserError as exc:
            _note = f"daemon log check: only in-process records are checked ({exc})"
            return
    _watcher = _Watcher(directory, token)
    with _watcher.lock:  # what is there already belongs to nobody's test: read from the end
        for name in os.listdir(directory):
            if LOG_NAME.match(name):
                _watcher._consider(name)
        for lf in _watcher.files.values():
            lf.file.seek(0, os.SEEK_END)
    threading.Thread(target=_watcher.run, name="daemon-log-watcher", daemon=True).start()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _watcher
    logging.getLogger("atomicfs").removeHandler(_collector)
    if _watcher is not None:
        _watcher.close()
        _watcher = None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _note is not None:  # shown even with -q: a check that did less should say so
        terminalreporter.write_line(_note)


def _taken() -> list[Record]:
    records = _collector.take()
    if _watcher is not None:
        records += _watcher.read_new()
    return records


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    _taken()  # what came before this test is not its own
    item.stash[_reports_key] = {}
    item.stash[_allow_key] = allowances(p for m in item.iter_markers("daemon_log")
                                        for p in list(m.args) + list(m.kwargs.get("allow", [])))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_reports_key, {})[report.when] = report
    return report


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        result = yield
    except BaseException:
        _taken()  # the teardown's own error is the one to see
        raise
    bad = unexpected(_taken(), item.stash.get(_allow_key, []))
    if bad:
        _report(item, bad)
    return result


def _report(item: pytest.Item, bad: list[Record]) -> None:
    shown = [r.line() for r in bad[:MAX_SHOWN]]
    if len(bad) > MAX_SHOWN:
        shown.append(f"... and {len(bad) - MAX_SHOWN} more")
    text = "\n".join(shown)
    reports = item.stash.get(_reports_key, {})
    if all(r.passed for r in reports.values()) and "call" in reports:
        pytest.fail(f"daemon log: {len(bad)} unexpected warning(s)/error(s); if the test "
                    "expects them, mark it @pytest.mark.daemon_log(allow=[regex, ...])\n"
                    + text, pytrace=False)
    for r in reports.values():  # failed, skipped or xfailed already: show them with it
        if not r.passed:
            r.sections.append(("daemon log: unexpected warnings/errors", text))
            break
