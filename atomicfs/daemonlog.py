"""Where the daemon logs, through the standard logging module and nothing else.

In the foreground: stderr. Detached: the system log through /dev/log (journald or syslog;
`journalctl -t atomicfs`) when that socket exists, else a size-capped rotating file in the
private runtime directory (removed when the daemon exits cleanly, so logs do not pile up).
Runs of one identical message are collapsed into a count.
"""
from __future__ import annotations

import io
import logging
import logging.handlers
import os
import stat
import sys

from atomicfs import runtime


SYSLOG_SOCKET = "/dev/log"
SYSLOG_TAG = "atomicfs"
LOG_MAX_BYTES = 1 << 20
LOG_BACKUPS = 1
REPEAT_WINDOW = 60.0  # seconds within which an identical message only counts
_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


class RepeatFilter(logging.Filter):
    """Let the first of a run of identical messages through and count the rest; the count
    is logged before the next different message, or with the first repeat once
    REPEAT_WINDOW has passed (so a message that never stops still shows now and then)."""

    def __init__(self, handler: logging.Handler, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self._last: tuple[str, int, str] | None = None
        self._shown_at = 0.0
        self._repeats = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:  # another error, another line
            text += f" ({record.exc_info[1]!r})"
        key = (record.name, record.levelno, text)
        if key == self._last and record.created - self._shown_at < self.window:
            self._repeats += 1
            return False
        self.flush_repeats()
        self._last = key
        self._shown_at = record.created
        return True

    def flush_repeats(self) -> None:
        if not self._repeats or self._last is None:
            return
        name, level, _ = self._last
        summary = logging.LogRecord(name, level, __file__, 0,
                                    "last message repeated %d times", (self._repeats,), None)
        summary.repeat_summary = True
        self._repeats = 0
        self.handler.handle(summary)


class _PrivateFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that is opened without following symlinks, not inherited."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def system_log_available() -> bool:
    try:
        return stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode)
    except OSError:
        return False


def where(pid: int) -> str:
    """Where a detached daemon with this pid logs, for messages that point there."""
    path = runtime.file_path(runtime.log_name(pid))
    if os.path.exists(path) or not system_log_available():
        return path
    return f"the system log: journalctl -t {SYSLOG_TAG} _PID={pid}"


def _install(handler: logging.Handler, fmt: str, debug: bool) -> RepeatFilter:
    handler.setFormatter(logging.Formatter(fmt))
    repeats = RepeatFilter(handler)
    handler.addFilter(repeats)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    return repeats


def log_to_stderr(debug: bool) -> RepeatFilter:
    return _install(logging.StreamHandler(sys.stderr), _FORMAT, debug)


def log_detached(debug: bool) -> RepeatFilter:
    """Log to the system log or the private file; stdin and stdout go to /dev/null, stderr
    (what C code prints) to the file, or to /dev/null when the system log is used."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    handler: logging.Handler | None = None
    if system_log_available():
        try:
            handler = logging.handlers.SysLogHandler(
                SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError:  # a socket nobody listens on: the file, then
            handler = None
    if handler is not None:
        os.dup2(devnull, 2)
        fmt = f"{SYSLOG_TAG}[%(process)d]: %(name)s %(levelname)s: %(message)s"
    else:
        path = runtime.file_path(runtime.log_name(os.getpid()))
        handler = _PrivateFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS)
        fmt = _FORMAT
        assert handler.stream is not None  # opened by the constructor
        os.dup2(handler.stream.fileno(), 2)
    os.close(devnull)
    return _install(handler, fmt, debug)


def drop_own_log() -> None:
    """After a clean exit: this daemon's log file (if it wrote one) is of no further use."""
    pid = os.getpid()
    names = [runtime.log_name(pid)] + [f"{runtime.log_name(pid)}.{i}"
                                       for i in range(1, LOG_BACKUPS + 1)]
    for h in logging.getLogger().handlers:
        if isinstance(h, _PrivateFileHandler):
            logging.getLogger().removeHandler(h)
            h.close()
            runtime.remove_files(*names)
