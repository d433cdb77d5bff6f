"""The request loop's pieces that need no mount: how a handler is driven (`serve`), the
hand-off at its first block, and the poll window's rule (mount tests:
tests/mount/test_request_loop.py)."""
from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from atomicfs import fuseloop
from atomicfs.fuseloop import SPIN_STEP_NS, RequestLoop, adapt, serve

MAX = 100_000  # the default request_poll_us, in ns


class Recorder(RequestLoop):
    def __init__(self) -> None:
        super().__init__(-1, -1, -1, poll_ns=0)
        self.hand_offs = 0

    def hand_off(self) -> None:
        self.hand_offs += 1


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(fuseloop, "_loop", rec)
    return rec


def test_a_handler_that_never_blocks_hands_nothing_off(loop: Recorder) -> None:
    async def handler() -> int:
        return 7

    async def main() -> int:
        return await serve(handler())
    assert trio.run(main) == 7
    assert loop.hand_offs == 0


def test_a_handler_hands_off_once_at_its_first_block(loop: Recorder) -> None:
    seen: list[int] = []

    async def handler() -> str:
        seen.append(loop.hand_offs)  # before its first block: nothing handed off yet
        await trio.sleep(0)
        seen.append(loop.hand_offs)
        await trio.sleep(0.01)
        return "done"

    async def main() -> str:
        return await serve(handler())
    assert trio.run(main) == "done"
    assert seen == [0, 1] and loop.hand_offs == 1


def test_errors_reach_the_caller_before_and_after_a_block(loop: Recorder) -> None:
    async def early() -> None:
        raise OSError(5, "before any await")

    async def late() -> None:
        await trio.sleep(0)
        raise KeyError("after a block")

    async def main() -> None:
        with pytest.raises(OSError):
            await serve(early())
        with pytest.raises(KeyError):
            await serve(late())
    trio.run(main)


def test_cancellation_reaches_a_blocked_handler(loop: Recorder) -> None:
    cleaned: list[bool] = []

    async def handler() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append(True)

    async def main() -> None:
        with trio.move_on_after(0.01) as scope:
            await serve(handler())
        assert scope.cancelled_caught
    trio.run(main)
    assert cleaned == [True]


def test_a_handler_catching_cancellation_goes_on(loop: Recorder) -> None:
    """trio throws Cancelled into the handler; what it does with it is its own (here it
    shields a last step and returns a value)."""
    async def handler() -> str:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await trio.sleep(0)
            raise
        return "unreachable"

    async def main() -> None:
        with trio.move_on_after(0.01):
            await serve(handler())
    trio.run(main)


def test_idle_workers_wait_and_end() -> None:
    """Workers beyond the one waiting on the fd park; end() makes them all return False."""
    async def main() -> None:
        loop = RequestLoop(-1, -1, -1, poll_ns=0)
        loop.waiting = True  # as if a worker waited on /dev/fuse
        results: list[bool] = []

        async def worker() -> None:
            results.append(await loop.wait_readable())
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop.idle) == 3
            loop.hand_off()  # a waiter exists: nobody is woken
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop.idle) == 3
            loop.end()
        assert results == [False, False, False]
    trio.run(main)


def test_hand_off_wakes_one_idle_worker() -> None:
    a, b = socket.socketpair()  # a stands for /dev/fuse, never readable here

    async def main() -> None:
        loop = RequestLoop(a.fileno(), -1, -1, poll_ns=0)
        loop.waiting = True

        async def worker() -> None:
            await loop.wait_readable()
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(worker)
            await trio.testing.wait_all_tasks_blocked()
            loop.waiting = False  # the waiter took a request; its handler blocks
            loop.hand_off()
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop.idle) == 1  # one woke, found no waiter, and waits on the fd
            assert loop.waiting
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        a.close()
        b.close()


def test_poll_window_rule() -> None:
    # caught: the window stays
    assert adapt(20_000, 5_000, True, MAX) == 20_000
    # missed, but the request came within reach: grow (from none to the first step)
    assert adapt(0, 3_000, False, MAX) == SPIN_STEP_NS
    assert adapt(10_000, 15_000, False, MAX) == 20_000
    assert adapt(10_000, 30_000, False, MAX) == 37_500  # enough to catch that gap next time
    assert adapt(80_000, 95_000, False, MAX) == MAX
    # out of reach: halve, and below one step, none
    assert adapt(MAX, 10 * MAX, False, MAX) == MAX // 2
    assert adapt(SPIN_STEP_NS, 10 * MAX, False, MAX) == 0
    assert adapt(0, 10 * MAX, False, MAX) == 0
    # a smaller maximum caps the growth
    assert adapt(15_000, 19_000, False, 20_000) == 20_000
