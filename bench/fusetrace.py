"""The kernel's side of a FUSE mount's requests: how long each one took from the moment the
kernel queued it to the moment the daemon's reply arrived, per opcode, from the `fuse`
tracepoints (`fuse_request_send`, `fuse_request_end`; Linux 6.12 and later).

The daemon's own histograms (`atomicfs stat`'s `latency`) start when a handler starts;
this round trip adds what the daemon cannot see: the time a request waits in the kernel's
queue until the daemon reads it (the daemon busy elsewhere, or asleep and waiting for a
CPU) and the transport both ways. It records into a private ftrace instance, filtered to
the mount's connection, so it neither reads nor disturbs anybody else's tracing.

    with FuseTrace(mountpoint) as trace:   # trace.result() afterwards: opcode -> histogram
        ...
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from atomicfs.stats import Histogram

log = logging.getLogger(__name__)

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("fuse_request_send", "fuse_request_end")
# Per CPU. A 5 s pgbench run at ~3,000 requests/s needs about 1 MiB in all; 64 MiB shared
# out over the CPUs, within 1-16 MiB each, leaves room on small machines and stays modest
# on large ones (the kernel allocates it for every CPU).
BUFFER_KB = max(1024, min(16384, 65536 // (os.cpu_count() or 1)))
# "...  12345.678901: fuse_request_send: connection 46 req 1234 opcode 16 (FUSE_WRITE) len"
_LINE = re.compile(r"\s(\d+)\.(\d{6}): (fuse_request_send|fuse_request_end): "
                   r"connection \d+ req (\d+)(?: opcode \d+ \((\w+)\))?")


def parse(text: str) -> dict[str, Histogram]:
    """Round trip histograms per opcode (FUSE_WRITE -> "write") from the trace's text;
    requests with only one of their two events (the trace started or stopped between
    them) are left out."""
    sent: dict[str, tuple[int, str]] = {}
    out: dict[str, Histogram] = {}
    for m in _LINE.finditer(text):
        ns = int(m.group(1)) * 1_000_000_000 + int(m.group(2)) * 1000
        if m.group(3) == "fuse_request_send":
            sent[m.group(4)] = (ns, (m.group(5) or "unknown").removeprefix("FUSE_").lower())
        elif (start := sent.pop(m.group(4), None)) is not None:
            t0, op = start
            out.setdefault(op, Histogram()).add(max(1, ns - t0))
    return out


def kernel_dev(st_dev: int) -> int:
    """The kernel's dev_t (MAJOR << 20 | MINOR), which the tracepoints print, of a
    user-space st_dev."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


class FuseTrace:
    """Records the round trips of one FUSE mount while the block runs. Unavailable (root
    only, a kernel without the tracepoints) means result() is None, never an error: the
    figures are an addition to the bench, not a condition of it."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.instance = TRACEFS / "instances" / f"atomicfs-bench-{os.getpid()}"
        self.why_not: str | None = None
        self._mounted_tracefs = False
        self._text: str | None = None

    def __enter__(self) -> "FuseTrace":
        try:
            self._start()
        except OSError as exc:
            self.why_not = f"no FUSE tracepoints ({exc.strerror or exc})"
            log.info("kernel FUSE round trips not recorded: %s", self.why_not)
            self._remove()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.why_not is None:
            try:
                self._set("tracing_on", "0")
                self._text = (self.instance / "trace").read_text()
            except OSError as err:
                self.why_not = f"reading the trace failed ({err.strerror or err})"
        self._remove()

    def result(self) -> dict[str, dict[str, Any]] | None:
        """Per opcode, the round trips in `atomicfs stat`'s histogram form (count, mean_us,
        p50_us, p99_us, ...); None when nothing was recorded."""
        if self._text is None:
            return None
        return {op: h.as_dict() for op, h in sorted(parse(self._text).items())}

    # ------------------------------------------------------------------------ ftrace

    def _start(self) -> None:
        if not (TRACEFS / "instances").is_dir():
            # tracefs is not mounted here (systemd mounts it; a container may not)
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False,
                           capture_output=True)
            self._mounted_tracefs = (TRACEFS / "instances").is_dir()
        if not (TRACEFS / "events" / "fuse" / EVENTS[0]).is_dir():
            raise FileNotFoundError(0, "this kernel has no fuse tracepoints")
        dev = kernel_dev(os.stat(self.mountpoint).st_dev)
        self.instance.mkdir()
        self._set("buffer_size_kb", str(BUFFER_KB))
        for event in EVENTS:
            self._set(f"events/fuse/{event}/filter", f"connection == {dev}")
            self._set(f"events/fuse/{event}/enable", "1")
        self._set("tracing_on", "1")

    def _set(self, name: str, value: str) -> None:
        (self.instance / name).write_text(value + "\n")

    def _remove(self) -> None:
        if self.instance.is_dir():
            for event in EVENTS:
                with contextlib.suppress(OSError):
                    self._set(f"events/fuse/{event}/enable", "0")
            with contextlib.suppress(OSError):
                self.instance.rmdir()  # ftrace frees the instance and its buffers
        if self._mounted_tracefs:
            subprocess.run(["umount", str(TRACEFS)], check=False, capture_output=True)
            self._mounted_tracefs = False
