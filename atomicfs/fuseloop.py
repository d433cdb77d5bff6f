"""Which of pyfuse3's worker tasks reads /dev/fuse next, and how it waits for a request.

pyfuse3 (3.5) runs a request's handler in the worker task that read it, and passes the
reading on to the next worker through a trio Lock before the handler starts. So every
request, even one whose handler never waits, costs a second task's step and one more pass
of trio's scheduler. Here the worker that read a request reads the next one too, unless
the handler blocks: at its first block the worker wakes an idle one to read meanwhile
(`hand_off`), so requests are still read while a commit waits for the device (group commit
needs them). `serve` is how a handler runs: it drives the handler's coroutine by hand up
to its first block, then passes trio's messages through. pyfuse3 looks its
`_wait_fuse_readable` up by name at each call, so `install` puts `RequestLoop.wait_readable`
in its place.

Between a reply and the next request the daemon would sleep in epoll_wait. On a VM guest
whose idle vCPUs halt at once, each sleep and wake-up costs tens of microseconds, and a
program doing one request after another (a create is four) finds the daemon asleep every
time. So, when no other task has work, the waiting worker first polls /dev/fuse and the I/O
threads' completion eventfd without sleeping (native `afs_poll_spin`, GIL released) for a
window that adapts as KVM's halt polling does: it grows while requests come within
`-o request_poll_us` (default 100) of the reply, and shrinks (down to no polling at all)
when they do not, so a daemon whose requests are far apart does not burn CPU. One CPU: no
polling (the program that sends the next request needs that CPU).

Idle workers wait for work here, not on /dev/fuse, so the end of the session must reach
them: the connection wrapper (native/fuseconn.c) makes an eventfd readable when a read finds
the connection gone, and `watch_end` wakes them all to return. Without the wrapper's custom
I/O (which knows the fd and the end) pyfuse3's own loop stays.
"""
from __future__ import annotations

import logging
import os
import time
import types
from collections.abc import Coroutine, Generator
from typing import Any

import trio

from atomicfs import fuseconn
from atomicfs.native import lib

log = logging.getLogger(__name__)

DEFAULT_POLL_US = 100  # -o request_poll_us; a wake-up on this VM costs ~30-60 µs
MAX_POLL_US = 1000
SPIN_STEP_NS = 10_000  # first window after none; below it the window drops to none


def adapt(window: int, idle_ns: int, caught: bool, max_ns: int) -> int:
    """The next poll window, after a wait of idle_ns that the poll caught or not (KVM's
    halt-polling rule): caught, keep it; missed but within max_ns, grow; beyond, halve."""
    if caught:
        return window
    if idle_ns <= max_ns:
        return min(max_ns, max(SPIN_STEP_NS, window * 2, idle_ns + idle_ns // 4))
    window //= 2
    return window if window >= SPIN_STEP_NS else 0


class RequestLoop:
    """The reading side of pyfuse3's workers: whether one waits on the /dev/fuse fd (at
    most one may: trio allows one reader per fd), the idle ones, and the poll window."""

    def __init__(self, fd: int, end_fd: int, completion_fd: int, poll_ns: int) -> None:
        self.fd = fd
        self.end_fd = end_fd
        self.completion_fd = completion_fd
        self.poll_ns = poll_ns  # the longest window; 0: no polling
        self.window = 0  # ns
        self.waiting = False  # a worker waits on fd
        self.ended = False
        self.idle = trio.lowlevel.ParkingLot()
        self.caught = 0  # requests the poll caught (no sleep)
        self.slept = 0  # waits that slept

    async def wait_readable(self) -> bool:
        """pyfuse3's `_wait_fuse_readable`: True when a request can be read, False when the
        worker should end (the session ended)."""
        while not self.ended:
            if not self.waiting:
                self.waiting = True
                try:
                    await self._wait()
                except trio.ClosedResourceError:  # pyfuse3.terminate()
                    self.end()
                    return False
                finally:
                    self.waiting = False
                return True
            await self.idle.park()
        return False

    async def _wait(self) -> None:
        if not self.poll_ns or trio.lowlevel.current_statistics().tasks_runnable:
            await trio.lowlevel.wait_readable(self.fd)  # others have work: no polling
            return
        start = time.monotonic_ns()
        got = lib.afs_poll_spin(self.fd, self.completion_fd, self.window) \
            if self.window else 0
        # Even a request already there is taken through trio's wait: the scheduler
        # then runs a pass (timers, completions) between requests, as without polling.
        await trio.lowlevel.wait_readable(self.fd)
        if got == 1:
            self.caught += 1
        elif got == 0:  # (2: a completion came first; the window is not to blame)
            self.slept += 1
            self.window = adapt(self.window, time.monotonic_ns() - start, False,
                                 self.poll_ns)

    def hand_off(self) -> None:
        """The request just read blocks: wake an idle worker to read the next (unless one
        waits already, or is on its way)."""
        if not self.waiting:
            self.idle.unpark()

    def end(self) -> None:
        self.ended = True
        self.idle.unpark_all()

    async def watch_end(self) -> None:
        """Wake the idle workers to return once the connection is gone."""
        await trio.lowlevel.wait_readable(self.end_fd)
        log.debug("FUSE connection ended")
        self.end()


_loop: RequestLoop | None = None


def install(completion_fd: int = -1, poll_us: int = DEFAULT_POLL_US) -> RequestLoop | None:
    """Put the loop in pyfuse3's place (after pyfuse3.init, which mounts); None, and
    pyfuse3's own loop, without the wrapper's custom I/O. completion_fd: the device's
    completion eventfd, which ends a poll as a request does; poll_us: the longest poll
    (0: none; none either with one CPU)."""
    global _loop
    fd, end_fd = fuseconn.loop_fds()
    if fd < 0 or end_fd < 0:
        log.info("pyfuse3's own request loop (no custom I/O on the FUSE connection)")
        return None
    import pyfuse3  # (here: the volume imports this module, and the connection wrapper
    # must be loaded before pyfuse3 is; see fuseconn)
    if len(os.sched_getaffinity(0)) < 2:
        poll_us = 0
    _loop = RequestLoop(fd, end_fd, completion_fd, poll_us * 1000)
    pyfuse3._wait_fuse_readable = _loop.wait_readable  # type: ignore[attr-defined]
    return _loop


def state() -> dict[str, Any]:
    """`atomicfs stat --json`, key `request_loop`."""
    if _loop is None:
        return {"loop": "pyfuse3"}
    return {"loop": "atomicfs", "poll_max_us": _loop.poll_ns // 1000,
            "poll_window_us": _loop.window // 1000,
            "polls_caught": _loop.caught, "waits_slept": _loop.slept}


@types.coroutine
def serve(coro: Coroutine[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """Run a handler's coroutine (`await serve(handler(...))`); at its first block, hand
    the reading of requests off to another worker. Up to that block it runs at once, in
    the task that read its request, so what it asks of the connection wrapper about that
    request (fuseconn.kill_suidgid) still holds."""
    try:
        msg = coro.send(None)
    except StopIteration as done:
        return done.value
    if _loop is not None:
        _loop.hand_off()
    while True:
        try:
            reply = yield msg
        except BaseException as exc:  # trio's throw (Cancelled, say), or close()
            try:
                msg = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                msg = coro.send(reply)
            except StopIteration as done:
                return done.value
