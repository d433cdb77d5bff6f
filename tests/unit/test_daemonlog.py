"""The daemon's log: runs of one identical message are collapsed into a count."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

from atomicfs.daemonlog import RepeatFilter


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def record(msg: str, *args: object, at: float = 0.0) -> logging.LogRecord:
    r = logging.LogRecord("atomicfs.writeback", logging.WARNING, __file__, 1, msg, args, None)
    r.created = at
    return r


def handler_with_filter(window: float = 60.0) -> tuple[ListHandler, RepeatFilter]:
    h = ListHandler()
    f = RepeatFilter(h, window)
    h.addFilter(f)
    return h, f


def test_a_run_of_identical_messages_is_one_line_and_a_count() -> None:
    h, f = handler_with_filter()
    for i in range(640):
        h.handle(record("no space to write back inode %d", 7, at=i * 0.01))
    h.handle(record("something else", at=7.0))
    assert h.lines == ["no space to write back inode 7", "last message repeated 639 times",
                       "something else"]


def test_different_arguments_are_different_messages() -> None:
    h, _ = handler_with_filter()
    for ino in (1, 2, 2, 3):
        h.handle(record("inode %d", ino))
    assert h.lines == ["inode 1", "inode 2", "last message repeated 1 times", "inode 3"]


def test_an_endless_run_still_shows_after_the_window_and_at_the_end() -> None:
    h, f = handler_with_filter(window=10.0)
    for t in range(25):
        h.handle(record("stuck", at=float(t)))
    f.flush_repeats()
    assert h.lines == ["stuck", "last message repeated 9 times", "stuck",
                       "last message repeated 9 times", "stuck",
                       "last message repeated 4 times"]


def test_a_detached_daemon_logs_to_the_system_log_socket(tmp_path: Path) -> None:
    """Where /dev/log exists (journald, syslog) the daemon logs there, tagged atomicfs[PID];
    a stand-in socket takes its place (in a child process: its stdio is replaced)."""
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(60)
        code = ("import logging, atomicfs.daemonlog as d\n"
                f"d.SYSLOG_SOCKET = {path!r}\n"
                "d.log_detached(False)\n"
                "for _ in range(3): logging.getLogger('atomicfs.x').warning('hello %d', 1)\n"
                "logging.getLogger('atomicfs.x').warning('bye')\n")
        child = subprocess.run([sys.executable, "-c", code], timeout=60)
        assert child.returncode == 0
        got = [server.recv(65536).decode() for _ in range(3)]
    assert "atomicfs[" in got[0] and got[0].endswith("atomicfs.x WARNING: hello 1\x00")
    assert "last message repeated 2 times" in got[1] and "bye" in got[2]
