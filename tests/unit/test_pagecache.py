"""The page cache: every folio state transition (checked against the table of legal ones
in pagecache.py), dirty/writeback/logged accounting, the LRU, folio sizes and the bound.
The generic read and write paths are tested in test_filemap.py."""
from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from atomicfs.pagecache import (DATA_IO, TRANSITIONS, InvalidTransition, IOKind,
                                mask_range)
from tests.unit.cacheutil import (BS, DEFAULT_FOLIO, FULL, UNIT, atomic_mapping, cache_state,
                                  check_accounting, make_cache, make_inode, plain_mapping,
                                  uptodate_folio)

# ------------------------------------------------------------------ state transitions


def test_a_new_folio_is_clean_cached_and_evictable() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = cache.get_folio(m, 3)
    assert folio.fblock == 12 and folio.buf.size == UNIT and folio.buf.is_zero()
    assert folio.evictable and folio.in_lru
    assert cache.bytes == UNIT
    assert cache.get_folio(m, 3) is folio
    assert (cache.counters.cache_misses, cache.counters.cache_hits) == (1, 1)
    check_accounting(cache)


def test_mark_dirty() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = cache.get_folio(m, 0)
    before = cache_state(cache)
    with pytest.raises(InvalidTransition):
        cache.mark_dirty(folio, 0b0001)  # not uptodate
    assert cache_state(cache) == before
    cache.mark_uptodate(folio, 0b0011)
    with pytest.raises(InvalidTransition):
        cache.mark_dirty(folio, 0b0110)  # block 2 not uptodate
    cache.mark_dirty(folio, 0b0001)
    assert folio.dirty == 0b0001 and folio.dirty_since > 0
    assert m.dirty == {0: folio} and not folio.in_lru and not folio.evictable
    since = folio.dirty_since
    cache.mark_dirty(folio, 0b0011)
    cache.mark_dirty(folio, 0b0011)  # no double counting
    assert cache.dirty_bytes == 2 * BS
    assert folio.dirty_since == since  # the age of the oldest dirty data
    check_accounting(cache)


def test_set_and_clear_atomic() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, 0b0111)
    with pytest.raises(InvalidTransition):
        cache.set_atomic(folio)  # not wholly dirty
    assert not folio.atomic
    cache.mark_dirty(folio, FULL)
    cache.set_atomic(folio)
    assert folio.atomic
    assert cache.clear_atomic(folio) is True
    assert cache.clear_atomic(folio) is False
    assert not folio.atomic


def test_writeback_that_succeeds() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, FULL)
    cache.set_atomic(folio)
    assert cache.start_writeback(folio, FULL, IOKind.ATOMIC) is True  # it was atomic
    assert folio.io is IOKind.ATOMIC and folio.io_mask == FULL
    assert not folio.atomic  # writeback clears the tag
    assert folio.dirty == 0 and m.dirty == {} and m.busy == {0: folio}
    assert (cache.dirty_bytes, cache.writeback_bytes) == (0, 4 * BS)
    assert m.must_wait(folio)  # stable writeback: writers wait
    check_accounting(cache)
    cache.end_writeback(folio)
    assert folio.io is IOKind.NONE and folio.io_mask == 0 and m.busy == {}
    assert (cache.dirty_bytes, cache.writeback_bytes) == (0, 0)
    assert folio.evictable and folio.in_lru
    assert not m.must_wait(folio)
    check_accounting(cache)


def test_writeback_of_some_blocks_keeps_the_others_dirty() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, 0b1011)
    assert cache.start_writeback(folio, 0b0011, IOKind.IN_PLACE) is False
    assert folio.dirty == 0b1000 and m.dirty == {0: folio}
    assert not m.must_wait(folio)  # not stable, mapping not stable: writers go on
    m.writethrough_begin()
    assert m.must_wait(folio)  # a write-through in flight makes the mapping stable
    m.writethrough_end()
    cache.mark_dirty(folio, 0b0001)  # redirtied under (non-stable) writeback
    cache.end_writeback(folio)
    assert folio.dirty == 0b1001 and cache.dirty_bytes == 2 * BS
    assert not folio.evictable
    check_accounting(cache)


def test_writeback_that_fails_makes_the_blocks_dirty_again() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, FULL)
    cache.set_atomic(folio)
    was_atomic = cache.start_writeback(folio, FULL, IOKind.STABLE_IN_PLACE)
    cache.end_writeback(folio, failed_mask=FULL, restore_atomic=was_atomic)
    assert folio.dirty == FULL and folio.atomic  # the untorn unit is to be retried whole
    assert (cache.dirty_bytes, cache.writeback_bytes) == (4 * BS, 0)
    assert m.dirty == {0: folio} and not folio.in_lru
    check_accounting(cache)
    # a partial failure, without restoring the tag; failed blocks outside the
    # writeback are ignored
    cache.start_writeback(folio, 0b0011, IOKind.IN_PLACE)
    cache.end_writeback(folio, failed_mask=0b0110)
    assert folio.dirty == 0b1110 and not folio.atomic
    check_accounting(cache)


def test_invalid_writeback_transitions() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    with pytest.raises(InvalidTransition):
        cache.end_writeback(folio)  # none running
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0001, IOKind.IN_PLACE)  # clean block
    cache.mark_dirty(folio, 0b0011)
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0, IOKind.IN_PLACE)  # nothing
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0111, IOKind.IN_PLACE)  # block 2 is clean
    cache.lock(folio)
    before = cache_state(cache)
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0011, IOKind.IN_PLACE)  # being read in
    assert cache_state(cache) == before
    cache.unlock(folio)
    cache.start_writeback(folio, 0b0001, IOKind.IN_PLACE)
    before = cache_state(cache)
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0010, IOKind.IN_PLACE)  # one at a time
    with pytest.raises(InvalidTransition):
        cache.start_home_copy(folio)
    assert cache_state(cache) == before
    check_accounting(cache)


def test_take_clean() -> None:
    """Blocks copied into the log are clean at once (software atomic path)."""
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, FULL)
    cache.set_atomic(folio)
    with pytest.raises(InvalidTransition):
        cache.take_clean(folio, FULL | 0b10000)  # a block outside the folio
    assert cache.take_clean(folio, FULL) is True
    assert folio.dirty == 0 and not folio.atomic and cache.dirty_bytes == 0
    assert folio.in_lru  # clean and not logged: evictable
    with pytest.raises(InvalidTransition):
        cache.take_clean(folio, 0b0001)  # already clean
    check_accounting(cache)


def test_logged_folios_stay_until_a_checkpoint_covers_them() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, FULL)
    cache.take_clean(folio, FULL)
    cache.set_logged(folio, 5)
    assert folio.logged_seq == 5 and cache.logged_bytes == UNIT and not folio.evictable
    cache.set_logged(folio, 7)  # logged again, later batch: counted once
    assert cache.logged_bytes == UNIT
    cache.clear_logged(folio, 6)  # a checkpoint up to batch 6 does not cover batch 7
    assert folio.logged_seq == 7 and not folio.in_lru
    cache.clear_logged(folio, 7)
    assert folio.logged_seq == 0 and cache.logged_bytes == 0 and folio.in_lru
    cache.clear_logged(folio, 9)  # nothing to clear
    assert cache.logged_bytes == 0
    check_accounting(cache)


def test_lock_unlock_pin_unpin() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = cache.get_folio(m, 0)
    cache.lock(folio)
    assert folio.locked and m.busy == {0: folio} and not folio.in_lru
    with pytest.raises(InvalidTransition):
        cache.lock(folio)
    assert m.must_wait(folio)
    cache.unlock(folio)
    assert m.busy == {} and folio.in_lru
    with pytest.raises(InvalidTransition):
        cache.unlock(folio)
    cache.pin(folio)
    cache.pin(folio)
    assert folio.pins == 2 and not folio.in_lru
    cache.unpin(folio)
    assert not folio.in_lru
    cache.unpin(folio)
    assert folio.in_lru
    with pytest.raises(InvalidTransition):
        cache.unpin(folio)
    assert folio.pins == 0
    check_accounting(cache)


def test_lock_and_writeback_together_keep_the_folio_busy() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, 0b0001)
    cache.start_writeback(folio, 0b0001, IOKind.IN_PLACE)
    cache.lock(folio)
    cache.end_writeback(folio)
    assert m.busy == {0: folio}  # still locked
    cache.unlock(folio)
    assert m.busy == {}
    check_accounting(cache)


def test_home_write() -> None:
    """A checkpoint copying a logged folio home holds it stable without dirty blocks."""
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, FULL)
    cache.take_clean(folio, FULL)
    cache.set_logged(folio, 3)
    cache.start_home_copy(folio)
    assert folio.io is IOKind.HOME and folio.io_mask == 0
    assert cache.writeback_bytes == 0 and m.must_wait(folio)
    with pytest.raises(InvalidTransition):
        cache.start_home_copy(folio)
    with pytest.raises(InvalidTransition):
        cache.end_writeback(folio)  # a home copy is not a writeback of dirty blocks
    check_accounting(cache)
    cache.end_home_copy(folio)
    cache.clear_logged(folio, 3)
    assert folio.evictable and folio.in_lru
    check_accounting(cache)
    cache.lock(folio)
    with pytest.raises(InvalidTransition):
        cache.start_home_copy(folio)


def test_discard_blocks() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    folio.buf.write(0, b"\xff" * UNIT)
    cache.mark_dirty(folio, FULL)
    cache.set_atomic(folio)
    cache.reserve_blocks(folio, 0b1100)
    assert cache.discard_blocks(folio, 0b1110) == 2  # reservations released
    assert folio.reserved == 0 and folio.dirty == 0b0001 and folio.uptodate == 0b0001
    assert not folio.atomic
    assert folio.buf.is_zero(BS) and not folio.buf.is_zero(0, BS)
    assert cache.dirty_bytes == BS
    cache.discard_blocks(folio, 0b0001)
    assert folio.evictable and folio.in_lru
    check_accounting(cache)


def test_discard_blocks_under_io_is_refused() -> None:
    """Data under I/O never changes: blocks of a folio under writeback (or being read in)
    cannot be discarded (truncate waits for such folios first)."""
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    folio.buf.write(0, b"\xff" * UNIT)
    cache.mark_dirty(folio, FULL)
    cache.start_writeback(folio, FULL, IOKind.IN_PLACE)
    before = cache_state(cache)
    with pytest.raises(InvalidTransition):
        cache.discard_blocks(folio, 0b0010)
    assert cache_state(cache) == before
    cache.end_writeback(folio, failed_mask=FULL)  # the failed blocks are still valid
    assert folio.dirty == FULL
    cache.lock(folio)
    with pytest.raises(InvalidTransition):
        cache.discard_blocks(folio, 0b0010)
    check_accounting(cache)


def test_reserve_and_unreserve_blocks() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = cache.get_folio(m, 0)
    cache.reserve_blocks(folio, 0b0110)
    cache.reserve_blocks(folio, 0b0100)
    assert cache.unreserve_blocks(folio, 0b1100) == 1
    assert folio.reserved == 0b0010


def test_writethrough_counter_sets_and_clears_stable() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    m.writethrough_begin()
    m.writethrough_begin()
    assert m.stable and m.wt_inflight == 2
    m.writethrough_end()
    assert m.stable  # cleared by the last one only
    m.writethrough_end()
    assert not m.stable and m.wt_inflight == 0
    with pytest.raises(InvalidTransition):
        m.writethrough_end()


async def test_waiters_wake_at_the_end_of_stable_writeback() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, FULL)
    cache.start_writeback(folio, FULL, IOKind.STABLE_IN_PLACE)
    woke: list[int] = []

    async def waiter() -> None:
        await cache.wait_folio(folio)
        woke.append(folio.writeback)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        cache.end_writeback(folio)
    assert woke == [False, False]
    assert cache.counters.stable_waits == 2


async def test_unlock_wakes_waiters_without_counting_a_stable_wait() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = cache.get_folio(m, 0)
    cache.lock(folio)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.wait_folio, folio)
        await trio.testing.wait_all_tasks_blocked()
        cache.unlock(folio)
    assert cache.counters.stable_waits == 0

# ------------------------------------------------------------ randomized sequences


@pytest.mark.parametrize("seed", range(6))
def test_random_transition_sequences_keep_the_books(seed: int) -> None:
    """Random transitions on folios of two mappings (atomic 16 KiB, plain 64 KiB): those
    the state machine's table (pagecache.TRANSITIONS) calls legal keep every total equal
    to what the folios say, the others raise InvalidTransition and change nothing."""
    rng = random.Random(seed)
    cache = make_cache(limit=1 << 30)
    _, ma = atomic_mapping(cache, 10)
    mp = cache.mapping(make_inode(11, unit=0), DEFAULT_FOLIO)
    assert not mp.atomic and mp.blocks_per_folio == 16
    folios = [cache.get_folio(ma, i) for i in range(3)] + \
        [cache.get_folio(mp, i) for i in range(2)]
    ops = list(TRANSITIONS) + ["mark_dirty", "start_writeback", "end_writeback"]
    kinds = sorted(DATA_IO, key=lambda k: k.value)
    seq = 0
    seen: set[tuple[str, bool]] = set()
    for step in range(4000):
        f = rng.choice(folios)
        n = f.mapping.blocks_per_folio
        op = rng.choice(ops)
        # masks biased towards the folio's current state, so that legal calls are common
        choices = [f.dirty, f.uptodate, f.dirty & rng.getrandbits(n),
                   f.uptodate & rng.getrandbits(n), rng.getrandbits(n), mask_range(0, n)]
        mask = rng.choice(choices)
        if op == "discard_blocks":
            f.buf.write(0, b"\x01" * f.buf.size)
        valid = TRANSITIONS[op](f, mask)
        before = cache_state(cache)
        try:
            if op == "start_writeback":
                cache.start_writeback(f, mask, rng.choice(kinds))
            elif op == "end_writeback":
                failed = rng.choice((0, 0, f.io_mask, rng.getrandbits(n)))
                cache.end_writeback(f, failed, restore_atomic=rng.random() < 0.3)
            elif op == "set_logged":
                seq += 1
                cache.set_logged(f, seq)
            elif op == "clear_logged":
                cache.clear_logged(f, rng.randrange(0, seq + 2))
            elif op in ("mark_uptodate", "mark_dirty", "take_clean", "discard_blocks",
                        "reserve_blocks", "unreserve_blocks"):
                getattr(cache, op)(f, mask)
            else:
                getattr(cache, op)(f)
        except InvalidTransition:
            assert not valid, (step, op, f.state())
            assert cache_state(cache) == before, (step, op)
        else:
            assert valid, (step, op, f.state())
        seen.add((op, valid))
        check_accounting(cache)
    assert {op for op, valid in seen if valid} == set(TRANSITIONS)  # each one exercised

# ---------------------------------------------------------------------- LRU eviction


def test_eviction_takes_clean_folios_least_recently_used_first() -> None:
    cache = make_cache(limit=4 * UNIT)
    _, m = atomic_mapping(cache)
    a, b, c, d = (cache.get_folio(m, i) for i in range(4))
    assert cache.bytes == 4 * UNIT
    cache.find_folio(m, 0)  # a used again: b is now the least recently used
    cache.mark_uptodate(c, FULL)
    cache.mark_dirty(c, FULL)  # dirty: not evictable
    e = cache.get_folio(m, 4)  # one folio must go to make room
    assert set(m.folios) == {0, 2, 3, 4}
    assert cache.counters.cache_evictions == 1
    cache.get_folio(m, 5)  # next: d (a was used after it)
    assert set(m.folios) == {0, 2, 4, 5}
    cache.pin(a)
    cache.lock(e)
    cache.get_folio(m, 6)  # a pinned, c dirty, e locked: only 5 can go
    assert set(m.folios) == {0, 2, 4, 6}
    assert cache.bytes == 4 * UNIT
    check_accounting(cache)


def test_eviction_never_takes_busy_or_logged_folios_even_over_the_limit() -> None:
    cache = make_cache(limit=2 * UNIT)
    _, m = atomic_mapping(cache)
    a = uptodate_folio(cache, m, 0)
    cache.mark_dirty(a, FULL)
    cache.start_writeback(a, FULL, IOKind.STABLE_IN_PLACE)
    b = uptodate_folio(cache, m, 1)
    cache.mark_dirty(b, FULL)
    cache.take_clean(b, FULL)
    cache.set_logged(b, 1)
    c = cache.get_folio(m, 2)  # over the limit: nothing can go, the cache grows
    assert cache.bytes == 3 * UNIT and set(m.folios) == {0, 1, 2}
    assert cache.evict() == 1  # only c, the clean one
    assert set(m.folios) == {0, 1}
    cache.end_writeback(a)
    cache.clear_logged(b, 1)
    assert cache.evict() == 0  # at the limit now
    assert cache.evict(UNIT) == 1 and set(m.folios) == {1}  # a was released first
    del c
    check_accounting(cache)


def test_drop_mapping() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    a = uptodate_folio(cache, m, 0)
    cache.mark_dirty(a, FULL)
    b = cache.get_folio(m, 1)
    cache.lock(b)
    with pytest.raises(InvalidTransition):
        cache.drop_mapping(m.ino)
    cache.unlock(b)
    cache.set_logged(b, 4)
    cache.drop_mapping(m.ino)
    assert m.ino not in cache.mappings
    assert (cache.bytes, cache.dirty_bytes, cache.logged_bytes) == (0, 0, 0)
    assert not cache.lru
    cache.drop_mapping(m.ino)  # gone already: nothing to do

# ------------------------------------------------------------- folio sizes and bound


def test_a_plain_folio_holds_what_is_cached_and_grows_by_powers_of_two() -> None:
    cache = make_cache()
    _, m = plain_mapping(cache)
    folio = cache.get_folio(m, 0, nblocks=1)
    assert folio.size == BS and cache.bytes == BS
    cache.pin(folio)
    cache.mark_uptodate(folio, 1)
    folio.buf.write(0, b"hello")
    cache.mark_dirty(folio, 1)
    assert cache.fit(folio, 3)
    assert folio.size == 4 * BS and cache.bytes == 4 * BS
    assert folio.buf.bytes(0, 5) == b"hello" and folio.buf.is_zero(5)
    assert cache.fit(folio, 2) and folio.size == 4 * BS  # never shrinks
    assert cache.fit(folio, 16) and folio.size == DEFAULT_FOLIO
    cache.unpin(folio)
    check_accounting(cache)
    # an atomic unit fixes the size whatever is asked
    _, ma = atomic_mapping(cache)
    assert cache.get_folio(ma, 0, nblocks=1).size == UNIT
    check_accounting(cache)


def test_fit_waits_for_reads_and_stable_writeback_not_for_plain_writeback() -> None:
    cache = make_cache()
    _, m = plain_mapping(cache)
    folio = cache.get_folio(m, 0, nblocks=1)
    cache.mark_uptodate(folio, 1)
    cache.lock(folio)
    assert not cache.fit(folio, 2) and folio.size == BS
    cache.unlock(folio)
    cache.mark_dirty(folio, 1)
    cache.start_writeback(folio, 1, IOKind.STABLE_IN_PLACE)
    assert not cache.fit(folio, 2)
    cache.end_writeback(folio)
    cache.mark_dirty(folio, 1)
    cache.start_writeback(folio, 1, IOKind.IN_PLACE)
    old = folio.buf
    assert cache.fit(folio, 2) and folio.buf is not old  # the I/O keeps the old buffer
    assert cache.spare_bytes == 0  # which is not reused while the I/O reads it
    cache.end_writeback(folio)
    check_accounting(cache)


def test_spare_buffers_count_against_the_limit() -> None:
    cache = make_cache(limit=8 * BS)
    inode, m = plain_mapping(cache)
    for i in range(8):
        cache.get_folio(m, i, nblocks=1)
    cache.drop_mapping(inode.ino)
    assert cache.bytes == 0 and 0 < cache.spare_bytes <= 8 * BS
    _, m2 = plain_mapping(cache, 21)
    big = cache.get_folio(m2, 0)  # 64 KiB: spares of other sizes are freed for it
    assert big.size == DEFAULT_FOLIO
    assert cache.spare_bytes == 0
    check_accounting(cache)


def test_a_new_folio_at_the_limit_takes_the_buffer_of_the_folio_evicted_for_it() -> None:
    cache = make_cache(limit=8 * UNIT)  # spares may hold limit / 8
    _, m = atomic_mapping(cache)
    folios = [cache.get_folio(m, i) for i in range(8)]
    for f in folios:
        cache.mark_uptodate(f, FULL)
        f.buf.write(0, b"x" * BS)
    old = folios[0].buf
    new = cache.get_folio(m, 8)  # over the limit: folio 0 goes, its buffer is reused
    assert new.buf is old and new.buf.is_zero() and 0 not in m.folios
    assert cache.bytes == 8 * UNIT and cache.spare_bytes == 0
    check_accounting(cache)


def test_trim_evicts_as_soon_as_folios_come_back_clean() -> None:
    cache = make_cache(limit=4 * UNIT)
    _, m = atomic_mapping(cache)
    folios = []
    for i in range(6):  # dirty at once: nothing evictable, the cache goes over its limit
        folios.append(uptodate_folio(cache, m, i))
        cache.mark_dirty(folios[-1], FULL)
    assert cache.bytes == 6 * UNIT and cache.pinned_bytes == 6 * UNIT
    for f in folios:
        cache.start_writeback(f, FULL, IOKind.IN_PLACE)
        cache.end_writeback(f)
    assert cache.bytes == 6 * UNIT and cache.pinned_bytes == 0
    assert cache.trim() == 2 and cache.bytes == 4 * UNIT
    assert cache.trim() == 0
    check_accounting(cache)
