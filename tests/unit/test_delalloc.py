"""Delayed allocation over a real page cache and allocator: reservations, their
conversion into extents, the undo steps, and the invariant that the allocator's reserved
blocks are the reserved bits of the cached folios."""
from __future__ import annotations

import pytest

from atomicfs.alloc import Allocator
from atomicfs.delalloc import Delalloc
from atomicfs.errors import NoSpace
from atomicfs.metadata import Inode
from atomicfs.pagecache import PageCache
from tests.unit.cacheutil import BS, FULL, atomic_mapping, make_cache, uptodate_folio

TOTAL = 256


class MD:
    block_size = BS
    snapshot_bytes = 0


def make(total: int = TOTAL) -> tuple[PageCache, Allocator, Delalloc]:
    cache = make_cache()
    alloc = Allocator(total, 0)
    alloc.meta_reserve = 0
    return cache, alloc, Delalloc(alloc, MD(), cache, debug=True)  # type: ignore[arg-type]


def test_a_write_into_holes_reserves_each_new_block_once() -> None:
    cache, alloc, da = make()
    inode, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    da.reserve_for_write(inode, [(folio, 0b0011)])
    assert folio.reserved == 0b0011 and alloc._reserved == 2
    cache.mark_dirty(folio, 0b0011)
    da.reserve_for_write(inode, [(folio, 0b0111)])  # blocks 0, 1 hold theirs already
    assert folio.reserved == 0b0111 and alloc._reserved == 3
    inode.extents.map(4, 100, 4)  # type: ignore[union-attr]  # folio 1 has homes
    other = uptodate_folio(cache, m, 1)
    da.reserve_for_write(inode, [(other, FULL)])
    assert other.reserved == 0 and alloc._reserved == 3
    da.check()


def test_no_space_changes_nothing() -> None:
    cache, alloc, da = make(total=8)
    inode, m = atomic_mapping(cache)
    folios = [uptodate_folio(cache, m, i) for i in range(3)]
    with pytest.raises(NoSpace):
        da.reserve_for_write(inode, [(f, FULL) for f in folios])
    assert all(f.reserved == 0 for f in folios) and alloc._reserved == 0
    da.check()


def test_conversion_and_its_undo() -> None:
    cache, alloc, da = make()
    inode, m = atomic_mapping(cache)
    a, b = uptodate_folio(cache, m, 0), uptodate_folio(cache, m, 1)
    da.reserve_for_write(inode, [(a, FULL), (b, FULL)])
    assert alloc._reserved == 8
    # in place: one run of a hole
    start, got = da.allocate_run(a, 1, 2, goal=0)
    assert got == 2 and a.reserved == 0b1001 and alloc._reserved == 6
    alloc.free_now(start, got)
    da.reserve_again(m, 1, 2)  # the write failed
    assert a.reserved == FULL and alloc._reserved == 8
    # hardware path: both units move to an aligned extent, and back on failure
    old = [a.reserved, b.reserved]
    dblock = da.allocate_units([a, b], 8, goal=0)
    assert dblock % 8 == 0 and a.reserved == b.reserved == 0 and alloc._reserved == 0
    da.undo_units([a, b], old, dblock, 8)
    assert [a.reserved, b.reserved] == old and alloc._reserved == 8
    # log path: homes for the holes, all or none
    cache.mark_dirty(a, FULL)
    cache.set_atomic(a)
    homes = da.homes_for(inode, a, FULL)
    assert len(homes) == 1 and homes[0][2] == 4 and homes[0][1] % 4 == 0  # aligned unit
    assert a.reserved == 0 and alloc._reserved == 4
    da.undo_homes(a, homes, FULL)
    assert a.reserved == FULL and alloc._reserved == 8
    da.check()


def test_release_discard_and_drop() -> None:
    cache, alloc, da = make()
    inode, m = atomic_mapping(cache)
    a, b = uptodate_folio(cache, m, 0), uptodate_folio(cache, m, 1)
    da.reserve_for_write(inode, [(a, FULL), (b, FULL)])
    cache.mark_dirty(a, FULL)
    assert da.reserved_in(m) == 8
    da.discard(a, 0b1100)  # truncated
    assert a.reserved == 0b0011 and alloc._reserved == 6 and da.reserved_in(m) == 6
    da.release(b, 0b0001)  # a writeback given up
    assert alloc._reserved == 5 and da.reserved_in(m) == 5
    da.release_mapping(m)
    assert alloc._reserved == 0 and da.reserved_in(m) == 0
    cache.drop_mapping(m.ino)
    da.check()


def test_check_finds_a_leak() -> None:
    cache, alloc, da = make()
    inode = Inode(10, 0o100644)
    inode.atomic_unit = 4 * BS
    m = cache.mapping(inode, 4 * BS)
    folio = uptodate_folio(cache, m)
    cache.reserve_blocks(folio, 0b0001)  # a bit without its block in the allocator
    with pytest.raises(AssertionError):
        da.check()
    alloc.reserve(1)
    da.check()


def test_check_finds_a_wrong_count_of_a_file() -> None:
    cache, alloc, da = make()
    inode, m = atomic_mapping(cache)
    folio = uptodate_folio(cache, m)
    da.reserve_for_write(inode, [(folio, FULL)])
    assert da.reserved_in(m) == 4
    m.reserved_blocks += 1  # the count st_blocks reads, off by one
    with pytest.raises(AssertionError, match="counts 5 reserved blocks"):
        da.check()
