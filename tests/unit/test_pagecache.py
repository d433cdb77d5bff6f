"""The page cache: every folio state transition, dirty/writeback/logged accounting, the LRU,
and the generic write path's atomic tagging policy. The I/O side is a small fake FolioIO
(reads fill zeros): this layer tests the cache logic, not the device."""
from __future__ import annotations

import errno
import random
import stat
from typing import Any

import pytest
import trio
import trio.testing

from atomicfs.metadata import Inode
from atomicfs.pagecache import (Folio, InvalidTransition, Mapping, PageCache, mask_range,
                                mask_runs, popcount)
from atomicfs.stats import Counters

BS = 4096
UNIT = 4 * BS  # atomic unit of the test files: folios of four blocks
FULL = mask_range(0, 4)
DEFAULT_FOLIO = 64 << 10


class ZeroIO:
    """A FolioIO whose device holds zeros everywhere; it records what it was asked."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []  # (folio index, block mask)
        self.written: list[bool] = []  # inode_written(size_grew)
        self.reserved: list[list[tuple[int, int]]] = []
        self.through: list[dict[str, Any]] = []

    async def read_folios(self, inode: Inode, mapping: Mapping,
                          needs: list[tuple[Folio, int]]) -> None:
        for folio, mask in needs:
            self.reads.append((folio.index, mask))
            mask &= ~folio.dirty
            for b, n in mask_runs(mask):
                folio.buf.zero(b * BS, n * BS)
            folio.uptodate |= mask

    async def balance_dirty(self) -> None:
        pass

    async def write_through(self, inode: Inode, mapping: Mapping,
                            items: list[tuple[Folio, int]], size_grew: bool,
                            durable: bool = True) -> None:
        self.through.append({"stable": mapping.stable, "inflight": mapping.wt_inflight,
                             "items": [(f.index, m) for f, m in items],
                             "size_grew": size_grew})

    def inode_written(self, inode: Inode, size_grew: bool = False) -> None:
        self.written.append(size_grew)

    def reserve_for_write(self, inode: Inode, mapping: Mapping,
                          items: list[tuple[Folio, int]]) -> None:
        self.reserved.append([(f.index, m) for f, m in items])


def make_cache(limit: int = 64 * UNIT) -> PageCache:
    return PageCache(BS, limit, DEFAULT_FOLIO, Counters())


def make_inode(ino: int, unit: int = UNIT) -> Inode:
    inode = Inode(ino, stat.S_IFREG | 0o644)
    inode.atomic_unit = unit if unit else -1
    return inode


def atomic_mapping(cache: PageCache, ino: int = 10) -> tuple[Inode, Mapping]:
    inode = make_inode(ino)
    m = cache.mapping(inode, UNIT)
    assert m.atomic and m.blocks_per_folio == 4
    return inode, m


def check_accounting(cache: PageCache) -> None:
    """Every total the cache keeps equals what its folios say."""
    folios = [f for m in cache.mappings.values() for f in m.folios.values()]
    assert cache.bytes == sum(f.size for f in folios)
    assert cache.lru_bytes == sum(f.size for f in folios if f.in_lru)
    assert all(f.size <= f.mapping.folio_size for f in folios)
    assert all(f.size == f.mapping.folio_size for f in folios if f.mapping.atomic)
    for f in folios:  # blocks past a small buffer are neither valid nor dirty
        assert (f.uptodate | f.dirty | f.reserved) >> (f.size // BS) == 0
    assert cache.dirty_bytes == sum(popcount(f.dirty) for f in folios) * BS
    assert cache.writeback_bytes == sum(popcount(f.wb_mask) for f in folios
                                        if f.writeback) * BS
    assert cache.logged_bytes == sum(f.size for f in folios if f.logged_seq)
    for m in cache.mappings.values():
        assert {i: id(f) for i, f in m.dirty.items()} == \
            {i: id(f) for i, f in m.folios.items() if f.dirty}
        assert {i: id(f) for i, f in m.busy.items()} == \
            {i: id(f) for i, f in m.folios.items() if f.writeback or f.locked}
    # the LRU holds exactly the evictable folios
    assert set(cache.lru) == {(f.mapping.ino, f.index) for f in folios if f.evictable}
    assert all(f.in_lru == f.evictable for f in folios)
    for f in folios:
        assert f.dirty & ~f.uptodate == 0, "dirty blocks must be uptodate"
        assert not f.wb_mask or f.writeback
        assert f.pins >= 0


def folio_state(f: Folio) -> tuple:
    return (f.uptodate, f.dirty, f.reserved, f.atomic, f.writeback, f.wb_stable, f.wb_mask,
            f.locked, f.logged_seq, f.in_lru, f.pins, f.buf.crc32c())


def cache_state(cache: PageCache) -> tuple:
    return (cache.bytes, cache.dirty_bytes, cache.writeback_bytes, cache.logged_bytes,
            list(cache.lru),
            {(m.ino, i): folio_state(f) for m in cache.mappings.values()
             for i, f in m.folios.items()},
            {m.ino: (sorted(m.dirty), sorted(m.busy)) for m in cache.mappings.values()})


def uptodate_folio(cache: PageCache, m: Mapping, index: int = 0,
                   mask: int = FULL) -> Folio:
    folio = cache.get_folio(m, index)
    cache.mark_uptodate(folio, mask)
    return folio


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
    assert cache.start_writeback(folio, FULL, stable=True) is True  # it was atomic
    assert folio.writeback and folio.wb_stable and folio.wb_mask == FULL
    assert not folio.atomic  # writeback clears the tag
    assert folio.dirty == 0 and m.dirty == {} and m.busy == {0: folio}
    assert (cache.dirty_bytes, cache.writeback_bytes) == (0, 4 * BS)
    assert m.must_wait(folio)  # stable writeback: writers wait
    check_accounting(cache)
    cache.end_writeback(folio)
    assert not folio.writeback and folio.wb_mask == 0 and m.busy == {}
    assert (cache.dirty_bytes, cache.writeback_bytes) == (0, 0)
    assert folio.evictable and folio.in_lru
    assert not m.must_wait(folio)
    check_accounting(cache)


def test_writeback_of_some_blocks_keeps_the_others_dirty() -> None:
    cache = make_cache()
    _, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    cache.mark_dirty(folio, 0b1011)
    assert cache.start_writeback(folio, 0b0011, stable=False) is False
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
    was_atomic = cache.start_writeback(folio, FULL, stable=True)
    cache.end_writeback(folio, failed_mask=FULL, restore_atomic=was_atomic)
    assert folio.dirty == FULL and folio.atomic  # the untorn unit is to be retried whole
    assert (cache.dirty_bytes, cache.writeback_bytes) == (4 * BS, 0)
    assert m.dirty == {0: folio} and not folio.in_lru
    check_accounting(cache)
    # a partial failure, without restoring the tag; failed blocks outside the
    # writeback are ignored
    cache.start_writeback(folio, 0b0011, stable=False)
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
        cache.start_writeback(folio, 0b0001, stable=False)  # clean block
    cache.mark_dirty(folio, 0b0011)
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0, stable=False)  # nothing
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0111, stable=False)  # block 2 is clean
    cache.lock(folio)
    before = cache_state(cache)
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0011, stable=False)  # being read in
    assert cache_state(cache) == before
    cache.unlock(folio)
    cache.start_writeback(folio, 0b0001, stable=False)
    before = cache_state(cache)
    with pytest.raises(InvalidTransition):
        cache.start_writeback(folio, 0b0010, stable=False)  # one at a time
    with pytest.raises(InvalidTransition):
        cache.start_home_write(folio)
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
    cache.start_writeback(folio, 0b0001, stable=False)
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
    cache.start_home_write(folio)
    assert folio.writeback and folio.wb_stable and folio.wb_mask == 0
    assert cache.writeback_bytes == 0 and m.must_wait(folio)
    with pytest.raises(InvalidTransition):
        cache.start_home_write(folio)
    check_accounting(cache)
    cache.end_writeback(folio)
    cache.clear_logged(folio, 3)
    assert folio.evictable and folio.in_lru
    check_accounting(cache)
    cache.lock(folio)
    with pytest.raises(InvalidTransition):
        cache.start_home_write(folio)


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
    cache.start_writeback(folio, FULL, stable=False)
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
    cache.start_writeback(folio, FULL, stable=True)
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


def _expected_valid(op: str, f: Folio, mask: int) -> bool:
    full = mask_range(0, f.mapping.blocks_per_folio)
    return {
        "mark_uptodate": True,
        "mark_dirty": mask & ~f.uptodate == 0,
        "set_atomic": f.dirty == full and f.uptodate == full,
        "clear_atomic": True,
        "start_writeback": not f.writeback and not f.locked and mask != 0
        and mask & ~f.dirty == 0,
        "end_writeback": f.writeback,
        "take_clean": mask & ~f.dirty == 0,
        "start_home_write": not f.writeback and not f.locked,
        "set_logged": True,
        "clear_logged": True,
        "lock": not f.locked,
        "unlock": f.locked,
        "pin": True,
        "unpin": f.pins > 0,
        "discard_blocks": not f.writeback and not f.locked,
        "reserve_blocks": True,
    }[op]


@pytest.mark.parametrize("seed", range(6))
def test_random_transition_sequences_keep_the_books(seed: int) -> None:
    """Random transitions on folios of two mappings (atomic 16 KiB, plain 64 KiB): valid
    ones keep every total equal to what the folios say, invalid ones raise
    InvalidTransition and change nothing."""
    rng = random.Random(seed)
    cache = make_cache(limit=1 << 30)
    _, ma = atomic_mapping(cache, 10)
    mp = cache.mapping(make_inode(11, unit=0), DEFAULT_FOLIO)
    assert not mp.atomic and mp.blocks_per_folio == 16
    folios = [cache.get_folio(ma, i) for i in range(3)] + \
        [cache.get_folio(mp, i) for i in range(2)]
    ops = ["mark_uptodate", "mark_dirty", "mark_dirty", "set_atomic", "clear_atomic",
           "start_writeback", "end_writeback", "take_clean", "start_home_write",
           "set_logged", "clear_logged", "lock", "unlock", "pin", "unpin",
           "discard_blocks", "reserve_blocks"]
    seq = 0
    for step in range(3000):
        f = rng.choice(folios)
        n = f.mapping.blocks_per_folio
        op = rng.choice(ops)
        # masks biased towards the folio's current state, so that valid calls are common
        choices = [f.dirty, f.uptodate, f.dirty & rng.getrandbits(n),
                   f.uptodate & rng.getrandbits(n), rng.getrandbits(n), mask_range(0, n)]
        mask = rng.choice(choices)
        valid = _expected_valid(op, f, mask)
        before = cache_state(cache)
        try:
            if op == "start_writeback":
                getattr(cache, op)(f, mask, rng.random() < 0.5)
            elif op == "end_writeback":
                failed = rng.choice((0, 0, f.wb_mask, rng.getrandbits(n)))
                cache.end_writeback(f, failed, restore_atomic=rng.random() < 0.3)
            elif op == "set_logged":
                seq += 1
                cache.set_logged(f, seq)
            elif op == "clear_logged":
                cache.clear_logged(f, rng.randrange(0, seq + 2))
            elif op in ("mark_uptodate", "mark_dirty", "take_clean", "discard_blocks",
                        "reserve_blocks"):
                if op == "discard_blocks":
                    f.buf.write(0, b"\x01" * f.buf.size)
                    before = cache_state(cache)
                getattr(cache, op)(f, mask)
            else:
                getattr(cache, op)(f)
        except InvalidTransition:
            assert not valid, (step, op, f.state())
            assert cache_state(cache) == before, (step, op)
        else:
            assert valid, (step, op, f.state())
        check_accounting(cache)


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
    cache.start_writeback(a, FULL, stable=True)
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


# ------------------------------------------------------------------ generic write path


async def test_write_tags_folios_covered_whole_as_atomic() -> None:
    """A pwritev of several units plus ragged edges: the units covered whole become
    atomic, the edges do not."""
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    inode.size = 10 * UNIT  # existing data: partial blocks must be read first
    data = bytes(range(256)) * ((3 * UNIT) // 256)
    off = UNIT - 2 * BS  # the last two blocks of folio 0, folios 1 and 2, half of 3
    n = await cache.write(io, inode, m, off, data[:2 * BS + 2 * UNIT + 2 * BS])
    assert n == 2 * BS + 2 * UNIT + 2 * BS
    f = m.folios
    assert [f[i].atomic for i in range(4)] == [False, True, True, False]
    assert f[0].dirty == 0b1100 and f[1].dirty == FULL and f[3].dirty == 0b0011
    assert cache.counters.atomic_cleared_partial == 0
    assert io.reads == []  # block aligned: nothing to read
    assert cache.dirty_bytes == (2 + 8 + 2) * BS
    assert io.written == [False]
    check_accounting(cache)
    out = await cache.read(io, inode, m, off, 2 * BS + 2 * UNIT + 2 * BS)
    assert bytes(out) == data[:2 * BS + 2 * UNIT + 2 * BS]


async def test_a_partial_write_clears_the_atomic_tag() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    await cache.write(io, inode, m, UNIT, b"a" * UNIT)
    folio = m.folios[1]
    assert folio.atomic
    await cache.write(io, inode, m, UNIT + 100, b"b" * 10)
    assert not folio.atomic
    assert cache.counters.atomic_cleared_partial == 1
    await cache.write(io, inode, m, UNIT + 200, b"c" * 10)
    assert cache.counters.atomic_cleared_partial == 1  # counted when a tag is lost only
    await cache.write(io, inode, m, UNIT, b"d" * UNIT)  # whole again: atomic again
    assert folio.atomic
    out = await cache.read(io, inode, m, UNIT, UNIT)
    assert bytes(out) == b"d" * UNIT


async def test_atomic_strict_rejects_unaligned_writes_and_changes_nothing() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    await cache.write(io, inode, m, 0, b"x" * UNIT, strict=True)
    before = cache_state(cache)
    size, mtime = inode.size, inode.mtime_ns
    for off, length in ((BS, UNIT), (0, UNIT + BS), (UNIT, 100), (1, UNIT - 1)):
        with pytest.raises(OSError) as exc:
            await cache.write(io, inode, m, off, b"y" * length, strict=True)
        assert exc.value.errno == errno.EINVAL
    assert cache.counters.atomic_strict_rejected == 4
    assert cache_state(cache) == before
    assert (inode.size, inode.mtime_ns) == (size, mtime)
    assert io.written == [True] and len(io.reserved) == 1  # only the first write
    await cache.write(io, inode, m, 2 * UNIT, b"z" * 2 * UNIT, strict=True)
    assert m.folios[2].atomic and m.folios[3].atomic
    # without an atomic unit, strict means nothing
    inode2 = make_inode(20, unit=0)
    plain = cache.mapping(inode2, DEFAULT_FOLIO)
    await cache.write(io, inode2, plain, 5, b"q", strict=True)
    assert not plain.folios[0].atomic


async def test_partial_blocks_are_read_first_only_when_they_hold_data() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    # beyond EOF: the device holds nothing there, so no read
    await cache.write(io, inode, m, 100, b"a" * 10)
    assert io.reads == []
    assert inode.size == 110
    # inside the file, in a block not cached: read that block only
    inode.size = 4 * UNIT
    await cache.write(io, inode, m, UNIT + BS + 5, b"b" * (BS + 10))
    assert io.reads == [(1, 0b0110)]
    io.reads.clear()
    # blocks already uptodate or dirty are not read again
    await cache.write(io, inode, m, UNIT + BS + 7, b"c" * 3)
    await cache.write(io, inode, m, 50, b"d")
    assert io.reads == []
    check_accounting(cache)


async def test_write_extends_the_file_and_reports_it() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    await cache.write(io, inode, m, 0, b"a" * 10, now=123)
    assert inode.size == 10 and inode.mtime_ns == inode.ctime_ns == 123
    await cache.write(io, inode, m, 0, b"b" * 5, now=124)
    assert inode.size == 10
    assert io.written == [True, False]
    assert await cache.write(io, inode, m, 0, b"") == 0
    out = await cache.read(io, inode, m, 0, 100)
    assert bytes(out) == b"b" * 5 + b"a" * 5


async def test_write_through_runs_with_the_mapping_stable() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    await cache.write(io, inode, m, 0, b"w" * (UNIT + BS), writethrough=True)
    assert io.through == [{"stable": True, "inflight": 1,
                           "items": [(0, FULL), (1, 0b0001)], "size_grew": True}]
    assert not m.stable and m.wt_inflight == 0
    assert all(f.pins == 0 for f in m.folios.values())


async def test_failed_write_through_still_ends_the_stable_period() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)

    class FailingIO(ZeroIO):
        async def write_through(self, inode: Inode, mapping: Mapping,
                                items: list[tuple[Folio, int]], size_grew: bool,
                                durable: bool = True) -> None:
            raise OSError(errno.EIO, "device error")

    with pytest.raises(OSError):
        await cache.write(FailingIO(), inode, m, 0, b"w" * UNIT, writethrough=True)
    assert not m.stable and m.wt_inflight == 0
    assert all(f.pins == 0 for f in m.folios.values())
    check_accounting(cache)


async def test_read_holes_and_beyond_eof() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    await cache.write(io, inode, m, 3 * UNIT, b"e" * 10)
    out = await cache.read(io, inode, m, UNIT - 5, 2 * UNIT + 20)
    assert bytes(out) == bytes(2 * UNIT + 5) + b"e" * 10
    assert await cache.read(io, inode, m, inode.size, 10) == b""
    assert all(f.pins == 0 for f in m.folios.values())
    check_accounting(cache)


async def test_truncate_drops_folios_beyond_and_zeroes_the_tail_block() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = ZeroIO()
    await cache.write(io, inode, m, 0, b"t" * 3 * UNIT)
    m.folios[2].reserved = 0b1111
    released = await cache.truncate(io, inode, m, UNIT + 100)
    inode.size = UNIT + 100
    assert released == 4
    assert set(m.folios) == {0, 1}
    tail = m.folios[1]
    assert tail.dirty == 0b0001 and not tail.atomic
    assert tail.buf.bytes(0, 100) == b"t" * 100 and tail.buf.is_zero(100)
    check_accounting(cache)
    inode.size = 2 * UNIT  # extended again: reads zeros past the old end
    out = await cache.read(io, inode, m, UNIT, UNIT)
    assert bytes(out) == b"t" * 100 + bytes(UNIT - 100)


# ----------------------------------------------------------------- write groups (issue 15)

class GroupIO(ZeroIO):
    """Records write_group calls; taking a group cleans its members, as the log does."""

    def __init__(self, cache: PageCache) -> None:
        super().__init__()
        self.cache = cache
        self.groups: list[list[int]] = []

    async def write_group(self, inode: Inode, mapping: Mapping, group: Any) -> None:
        self.groups.append(sorted(f.index for f in group.folios))
        for f in group.folios:
            self.cache.take_clean(f, f.dirty)
        group.dissolve(1)


async def test_a_write_of_several_whole_units_is_one_group() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = GroupIO(cache)
    await cache.write(io, inode, m, UNIT, b"g" * 3 * UNIT)  # units 1..3
    members = [m.folios[i] for i in (1, 2, 3)]
    assert all(f.group is members[0].group is not None for f in members)
    assert all(f.atomic for f in members)  # each unit stays atomic on its own too
    await cache.write(io, inode, m, 0, b"u" * UNIT)  # one whole unit: its own tag only
    assert m.folios[0].group is None and m.folios[0].atomic
    assert cache.counters.atomic_group_writes == 1
    check_accounting(cache)


async def test_a_later_write_into_a_group_sends_the_group_out_first() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = GroupIO(cache)
    await cache.write(io, inode, m, 0, b"g" * 4 * UNIT)
    assert io.groups == []
    await cache.write(io, inode, m, 2 * UNIT + 100, b"p" * 10)  # partial, into unit 2
    assert io.groups == [[0, 1, 2, 3]]  # the whole group, before the change
    assert all(f.group is None for f in m.folios.values())
    assert m.folios[2].dirty and not m.folios[2].atomic
    check_accounting(cache)


async def test_an_announced_atomic_write_groups_even_without_a_unit() -> None:
    cache = make_cache()
    inode = make_inode(11, unit=0)
    m = cache.mapping(inode, DEFAULT_FOLIO)
    assert not m.atomic
    io = GroupIO(cache)
    await cache.write(io, inode, m, 8192, b"a" * 4096, atomic=True)  # part of one folio
    assert m.folios[0].group is not None and not m.folios[0].atomic
    await cache.write(io, inode, m, 0, b"b" * 4096)  # a plain write: no group of its own
    assert io.groups == [[0]]


async def test_truncate_takes_folios_out_of_their_group() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    io = GroupIO(cache)
    await cache.write(io, inode, m, 0, b"g" * 4 * UNIT)
    group = m.folios[0].group
    assert group is not None
    await cache.truncate(io, inode, m, 2 * UNIT)
    inode.size = 2 * UNIT
    assert sorted(f.index for f in group.folios) == [0, 1]


# ------------------------------------------------------------- folio sizes and bound


def plain_mapping(cache: PageCache, ino: int = 20) -> tuple[Inode, Mapping]:
    inode = make_inode(ino, unit=0)
    m = cache.mapping(inode, DEFAULT_FOLIO)
    assert not m.atomic and m.blocks_per_folio == 16
    return inode, m


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
    cache.start_writeback(folio, 1, stable=True)
    assert not cache.fit(folio, 2)
    cache.end_writeback(folio)
    cache.mark_dirty(folio, 1)
    cache.start_writeback(folio, 1, stable=False)
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


def test_trim_evicts_as_soon_as_folios_come_back_clean() -> None:
    cache = make_cache(limit=4 * UNIT)
    _, m = atomic_mapping(cache)
    folios = []
    for i in range(6):  # dirty at once: nothing evictable, the cache goes over its limit
        folios.append(uptodate_folio(cache, m, i))
        cache.mark_dirty(folios[-1], FULL)
    assert cache.bytes == 6 * UNIT and cache.pinned_bytes == 6 * UNIT
    for f in folios:
        cache.start_writeback(f, FULL, stable=False)
        cache.end_writeback(f)
    assert cache.bytes == 6 * UNIT and cache.pinned_bytes == 0
    assert cache.trim() == 2 and cache.bytes == 4 * UNIT
    assert cache.trim() == 0
    check_accounting(cache)
