"""Free space: allocation, alignment, reservations, the metadata reserve and delayed frees."""
from __future__ import annotations

import random

import pytest

from atomicfs.alloc import Allocator
from atomicfs.errors import NoSpace

TOTAL, DATA_START = 1100, 37  # data area not byte aligned on purpose


def make_alloc(total: int = TOTAL, data_start: int = DATA_START,
               meta_reserve: int = 0) -> Allocator:
    a = Allocator(total, data_start)
    a.meta_reserve = meta_reserve
    return a


def test_fresh_allocator_accounting() -> None:
    a = Allocator(TOTAL, DATA_START)
    assert a.data_blocks == TOTAL - DATA_START
    assert a.free_blocks == TOTAL - DATA_START
    assert a.meta_reserve == 64  # the minimum for a small filesystem
    assert a.available_blocks == TOTAL - DATA_START - 64
    assert a.is_used(0, DATA_START) == DATA_START  # superblocks and log are never free
    assert a.is_used(DATA_START, TOTAL - DATA_START) == 0


def test_allocate_and_free() -> None:
    a = make_alloc()
    start, count = a.allocate(10)
    assert (start, count) == (DATA_START, 10)
    assert a.is_used(start, 10) == 10
    assert a.free_blocks == TOTAL - DATA_START - 10
    nxt, _ = a.allocate(5)
    assert nxt == start + 10  # the rolling goal continues after the last allocation
    a.free_now(start, 10)
    assert a.is_used(start, 10) == 0
    assert a.free_blocks == TOTAL - DATA_START - 5
    with pytest.raises(ValueError):
        a.free_now(start, 10)  # double free
    with pytest.raises(ValueError):
        a.free_now(nxt, 6)  # partly free
    assert a.is_used(nxt, 5) == 5


def test_alignment() -> None:
    a = make_alloc()
    a.allocate(1)  # DATA_START is used now
    for _ in range(20):
        start, count = a.allocate(4, align=4)
        assert start % 4 == 0 and count == 4
    start, count = a.allocate(16, align=16)
    assert start % 16 == 0 and count == 16


def test_partial_allocation_with_min_len() -> None:
    a = make_alloc(total=100, data_start=0)
    for s in range(0, 100, 10):
        a.mark_used(s + 6, 4)  # free runs of 6, each followed by 4 used blocks
    start, count = a.allocate(20, min_len=1)
    assert count == 6 and a.is_used(start, 6) == 6
    with pytest.raises(NoSpace):
        a.allocate(20, min_len=7)
    before = a.free_blocks
    with pytest.raises(NoSpace):
        a.allocate(7)  # min_len defaults to want
    assert a.free_blocks == before  # a failed allocation takes nothing


def test_goal_and_wrap_around() -> None:
    a = make_alloc()
    start, _ = a.allocate(4, goal=500)
    assert start == 500
    start, _ = a.allocate(4, goal=TOTAL - 2)  # not enough room before the end: wrap
    assert start == DATA_START
    start, _ = a.allocate(2, goal=TOTAL - 2)
    assert start == TOTAL - 2
    # goal outside the data area means the start of it
    start, _ = a.allocate(3, goal=5)
    assert start == DATA_START + 4


def test_reservations() -> None:
    a = make_alloc(total=200, data_start=0, meta_reserve=10)
    assert a.available_blocks == 190
    a.reserve(100)
    assert a.reserved_blocks == 100 and a.available_blocks == 90
    with pytest.raises(NoSpace):
        a.reserve(91)
    assert a.reserved_blocks == 100  # a failed reservation changes nothing
    # unreserved allocations cannot eat into what others reserved
    with pytest.raises(NoSpace):
        a.allocate(91)
    a.allocate(90)
    assert a.available_blocks == 0
    # a reserved request may use its own reservation
    start, count = a.allocate(40, reserved=40)
    a.unreserve(40)
    assert count == 40 and a.reserved_blocks == 60
    with pytest.raises(ValueError):
        a.unreserve(61)
    with pytest.raises(ValueError):
        a.unreserve(-1)
    a.reserve(0)  # no-op
    assert a.reserved_blocks == 60


def test_meta_reserve_is_for_metadata_only() -> None:
    a = make_alloc(total=200, data_start=0, meta_reserve=20)
    a.allocate(180)
    assert a.available_blocks == 0
    with pytest.raises(NoSpace):
        a.allocate(1)
    start, count = a.allocate(20, metadata=True)
    assert count == 20 and a.free_blocks == 0
    with pytest.raises(NoSpace):
        a.allocate(1, metadata=True)


def test_reservations_survive_a_snapshot_taken_from_the_reserve() -> None:
    """A snapshot written after reservations were granted may use the metadata reserve;
    the reserved blocks must still be allocatable (else writeback hits ENOSPC after the
    write was accepted), and nothing beyond them may take the rest of the reserve."""
    a = make_alloc(total=200, data_start=0, meta_reserve=20)
    a.reserve(180)
    assert a.available_blocks == 0
    a.allocate(15, metadata=True)  # the snapshot
    assert a.free_blocks - a.reserved_blocks == 5
    with pytest.raises(NoSpace):
        a.allocate(1)  # unreserved data: not out of the reserve
    start, count = a.allocate(180, min_len=180, reserved=180)
    a.unreserve(180)
    assert count == 180 and a.free_blocks == 5 and a.reserved_blocks == 0


def test_set_snapshot_estimate_grows_the_reserve() -> None:
    a = Allocator(100_000, 100)
    base = a.meta_reserve
    a.set_snapshot_estimate(10 << 20, 4096)  # room for three 10 MiB snapshots
    assert a.meta_reserve == 3 * 2560 + 16
    a.set_snapshot_estimate(100, 4096)  # never below the minimum
    assert a.meta_reserve == base


def test_free_after_waits_for_the_batch_to_be_durable() -> None:
    a = make_alloc(total=100, data_start=0)
    start, count = a.allocate(100)
    a.free_after(7, [(start, 30), (start + 50, 10)])
    assert a.pending_blocks == 40
    assert a.available_blocks == 0
    with pytest.raises(NoSpace):
        a.allocate(1)
    assert a.release_durable(6) == 0  # an earlier batch: still pending
    with pytest.raises(NoSpace):
        a.allocate(1)
    assert a.release_durable(7) == 40
    assert a.pending_blocks == 0 and a.free_blocks == 40
    got = {a.allocate(1, goal=start)[0] for _ in range(40)}
    assert got == set(range(start, start + 30)) | set(range(start + 50, start + 60))


def test_free_after_releases_in_sequence_order() -> None:
    a = make_alloc(total=100, data_start=0)
    a.allocate(100)
    a.free_after(3, [(0, 10)])
    a.free_after(5, [(10, 10)])
    a.free_after(4, [(20, 10)])
    assert a.release_durable(4) == 20
    assert a.is_used(0, 10) == 0 and a.is_used(20, 10) == 0 and a.is_used(10, 10) == 10
    assert a.pending_blocks == 10
    assert a.release_durable(100) == 10 and a.pending_blocks == 0
    a.free_after(9, [])
    assert a.pending_blocks == 0


def test_range_checks() -> None:
    a = make_alloc()
    for start, count in ((0, 1), (DATA_START - 1, 2), (TOTAL - 1, 2), (DATA_START, 0)):
        with pytest.raises(ValueError):
            a.mark_used(start, count)
        with pytest.raises(ValueError):
            a.free_now(start, count)
        with pytest.raises(ValueError):
            a.free_after(1, [(start, count)])


def test_mark_used_detects_overlap() -> None:
    a = make_alloc()
    a.mark_used(100, 10)
    assert a.free_blocks == TOTAL - DATA_START - 10
    for start, count in ((100, 1), (109, 5), (95, 6), (90, 30)):
        with pytest.raises(ValueError):
            a.mark_used(start, count)
    assert a.free_blocks == TOTAL - DATA_START - 10  # nothing was taken by the failures
    assert a.is_used(90, 30) == 10
    a.mark_used(110, 5)
    assert a.is_used(100, 15) == 15


def test_randomized_against_a_set_model() -> None:
    """Random allocations, frees, delayed frees, reservations: the allocator agrees with a
    set of used blocks, never hands out a used block, and only fails when the model shows
    that no fitting aligned run or not enough unreserved space exists."""
    rng = random.Random(11)
    for round_ in range(40):
        total = rng.randrange(60, 400)
        data_start = rng.randrange(0, 30)
        meta = rng.randrange(0, 10)
        a = make_alloc(total, data_start, meta)
        used: set[int] = set()
        owned: list[tuple[int, int]] = []  # extents we may free
        pending: list[tuple[int, list[tuple[int, int]]]] = []
        reserved = 0
        seq = 0
        for step in range(300):
            op = rng.random()
            pend = sum(c for _, e in pending for _, c in e)
            free = (total - data_start) - len(used)
            if op < 0.45:
                want = rng.randrange(1, 24)
                align = rng.choice((1, 1, 2, 4, 8))
                min_len = rng.choice((want, 1, align if align <= want else want))
                metadata = rng.random() < 0.1
                use_res = rng.randrange(0, min(reserved, want) + 1)
                goal = rng.choice((0, rng.randrange(0, total + 10)))
                # blocks awaiting a commit are still in use: not part of `free`; reserved
                # blocks are granted whatever became of the metadata reserve since
                limit = use_res + max(0, free - reserved - (0 if metadata else meta))
                try:
                    start, count = a.allocate(want, goal=goal, align=align, min_len=min_len,
                                              reserved=use_res, metadata=metadata)
                except NoSpace:
                    if min_len <= limit:
                        # A partial allocation is rounded down to the alignment, so with
                        # align > 1 the shortest acceptable run is min_len rounded up.
                        need = min(min(want, max(limit, min_len)),
                                   -(-min_len // align) * align)
                        for p in range(data_start, total - need + 1):
                            if p % align == 0:
                                assert any(b in used for b in range(p, p + need)), \
                                    (round_, step, p)
                    continue
                blocks = set(range(start, start + count))
                assert not blocks & used, (round_, step)
                assert data_start <= start and start + count <= total
                assert start % align == 0
                assert min_len <= count <= want
                assert count == min(want, max(limit, min_len)) or count % align == 0
                assert count <= max(limit, min_len)
                used |= blocks
                owned.append((start, count))
                if use_res:
                    a.unreserve(min(use_res, count))
                    reserved -= min(use_res, count)
            elif op < 0.6 and owned:
                start, count = owned.pop(rng.randrange(len(owned)))
                a.free_now(start, count)
                used -= set(range(start, start + count))
            elif op < 0.7 and owned:
                seq += 1
                ext = [owned.pop(rng.randrange(len(owned)))
                       for _ in range(rng.randrange(1, min(3, len(owned)) + 1))]
                a.free_after(seq, ext)
                pending.append((seq, ext))
            elif op < 0.8 and pending:
                durable = rng.randrange(pending[0][0], seq + 1)
                expect = 0
                for s, ext in [p for p in pending if p[0] <= durable]:
                    for start, count in ext:
                        used -= set(range(start, start + count))
                        expect += count
                pending = [p for p in pending if p[0] > durable]
                assert a.release_durable(durable) == expect
            elif op < 0.9:
                n = rng.randrange(1, 20)
                avail = max(0, free - reserved - meta)
                if n <= avail:
                    a.reserve(n)
                    reserved += n
                else:
                    with pytest.raises(NoSpace):
                        a.reserve(n)
            else:
                n = rng.randrange(0, reserved + 1)
                a.unreserve(n)
                reserved -= n
            pend = sum(c for _, e in pending for _, c in e)
            assert a.free_blocks == (total - data_start) - len(used)
            assert a.pending_blocks == pend
            assert a.reserved_blocks == reserved
            assert a.available_blocks == max(0, a.free_blocks - reserved - meta)
            assert a.is_used(data_start, total - data_start) == len(used)


def test_blocks_freed_after_the_fallback_checkpoint_are_held() -> None:
    """A block freed by batch s stays in use until the fallback checkpoint covers s."""
    a = make_alloc(total=100, data_start=0)
    a.fallback_boundary = 4  # the kept previous checkpoint covers batches up to 4
    start, _ = a.allocate(20)
    a.free_after(3, [(start, 5)])  # before the fallback's boundary: freed when durable
    a.free_after(6, [(start + 10, 5)])  # after it: the fallback may map these
    assert a.release_durable(6) == 5
    assert a.held_blocks == 5 and a.pending_blocks == 5
    assert a.is_used(start + 10, 5) == 5
    assert a.checkpointed(5) == 0  # the next fallback covers batch 5 only
    assert a.checkpointed(7) == 5 and a.held_blocks == 0
    assert a.is_used(start + 10, 5) == 0


def test_hold_marks_blocks_used_until_a_checkpoint_covers_them() -> None:
    a = make_alloc(total=100, data_start=0)
    a.fallback_boundary = 0
    a.hold(9, [(40, 4)])
    assert a.is_used(40, 4) == 4 and a.held_blocks == 4
    assert a.checkpointed(8) == 0
    assert a.checkpointed(9) == 4 and a.is_used(40, 4) == 0
