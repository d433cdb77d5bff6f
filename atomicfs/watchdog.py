"""Work in flight and what it waits for, so that a hang explains itself.

Every FUSE request and every checkpoint is *tracked* while it runs (a `Tracked` entry in the
volume's `Watchdog`); the places that can wait long (log space, a log batch, a folio under
writeback, a device request) say what they wait for with `waiting(...)`, which annotates
whatever tracked work the current trio task is running (a context variable: pyfuse3 runs one
request at a time per worker task). The watchdog task logs, once each, tracked work older
than its threshold with the wait it is in; `atomicfs stat MOUNTPOINT` shows the oldest.

The same tracking times every request and job into a latency histogram of its kind (FUSE
operations apart from internal jobs such as the checkpoint): a perf_counter_ns pair and a
bucket increment per request (atomicfs.stats.Histogram).
"""
from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

import trio

from atomicfs.stats import Histograms

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 30.0


class Tracked:
    """One request or internal job in flight."""

    __slots__ = ("kind", "detail", "started", "waits", "reported")

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        self.started = time.monotonic()
        self.waits: list[str] = []  # innermost last
        self.reported = False

    def describe(self, now: float) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail,
                "age_s": round(now - self.started, 3),
                "waiting_for": self.waits[-1] if self.waits else None}


_current: contextvars.ContextVar[Tracked | None] = contextvars.ContextVar(
    "atomicfs_tracked", default=None)


def current_kind() -> str | None:
    """The kind of the tracked work the current task runs (None: untracked)."""
    work = _current.get()
    return work.kind if work is not None else None


class waiting:
    """Say what the current tracked work waits for while the block runs. (A class, not a
    generator: it wraps every wait and every request, and this costs a third.)"""

    __slots__ = ("what", "work")

    def __init__(self, what: str) -> None:
        self.what = what
        self.work = _current.get()

    def __enter__(self) -> None:
        if self.work is not None:
            self.work.waits.append(self.what)

    def __exit__(self, *exc: object) -> None:
        if self.work is not None:
            self.work.waits.pop()


class _Tracking:
    """Watchdog.track's context: registered, current and timed while the block runs."""

    __slots__ = ("watchdog", "work", "latency", "token", "t0")

    def __init__(self, watchdog: "Watchdog", work: Tracked, latency: Histograms) -> None:
        self.watchdog = watchdog
        self.work = work
        self.latency = latency

    def __enter__(self) -> Tracked:
        work = self.work
        self.watchdog._active[id(work)] = work
        self.token = _current.set(work)
        self.t0 = time.perf_counter_ns()
        return work

    def __exit__(self, *exc: object) -> None:
        work = self.work
        self.latency.add(work.kind, time.perf_counter_ns() - self.t0)
        _current.reset(self.token)
        del self.watchdog._active[id(work)]
        if work.reported:
            log.warning("%s %s finished after %.1f s", work.kind, work.detail,
                        time.monotonic() - work.started)


class Watchdog:
    """The registry of tracked work of one volume, and the task that reports the old."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._active: dict[int, Tracked] = {}
        self.reported = 0  # how many entries were logged as slow
        self.fuse_latency = Histograms()  # by FUSE operation
        self.job_latency = Histograms()  # by internal job (checkpoint)

    def track(self, kind: str, detail: str = "", fuse: bool = False) -> "_Tracking":
        """Track a FUSE request (fuse=True) or an internal job while the block runs."""
        return _Tracking(self, Tracked(kind, detail),
                         self.fuse_latency if fuse else self.job_latency)

    def oldest(self) -> dict[str, Any] | None:
        """The oldest tracked work other than the caller's own (the stat request)."""
        me = _current.get()
        others = [w for w in self._active.values() if w is not me]
        if not others:
            return None
        return min(others, key=lambda w: w.started).describe(time.monotonic())

    def stats(self) -> dict[str, Any]:
        me = _current.get()
        return {"in_flight": sum(w is not me for w in self._active.values()),
                "oldest": self.oldest(),
                "threshold_s": self.threshold, "reported_slow": self.reported}

    def latency(self, device: Histograms | None = None) -> dict[str, Any]:
        """The `latency` key of the mount's stat: per FUSE operation, per device request
        kind (when given) and per internal job."""
        out = {"fuse": self.fuse_latency.as_dict()}
        if device is not None:
            out["device"] = device.as_dict()
        out["jobs"] = self.job_latency.as_dict()
        return out

    def check(self) -> int:
        """Log each tracked entry older than the threshold once; how many were new."""
        now = time.monotonic()
        new = 0
        for work in list(self._active.values()):
            if not work.reported and now - work.started > self.threshold:
                work.reported = True
                new += 1
                self.reported += 1
                log.warning("%s %s has run for %.0f s, waiting for %s", work.kind,
                            work.detail, now - work.started,
                            " <- ".join(reversed(work.waits)) or "nothing tracked")
        return new

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        task_status.started()
        while True:
            await trio.sleep(max(0.1, self.threshold / 4))
            self.check()
