"""Helpers of the page-cache and filemap unit tests: caches, mappings, and a check that
every total the cache keeps equals what its folios say."""
from __future__ import annotations

import stat

from atomicfs.metadata import Inode
from atomicfs.pagecache import DATA_IO, Folio, Mapping, PageCache, mask_range, popcount
from atomicfs.stats import Counters

BS = 4096
UNIT = 4 * BS  # atomic unit of the test files: folios of four blocks
FULL = mask_range(0, 4)
DEFAULT_FOLIO = 64 << 10


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
    assert cache.writeback_bytes == sum(popcount(f.io_mask) for f in folios) * BS
    assert cache.logged_bytes == sum(f.size for f in folios if f.logged_seq)
    for m in cache.mappings.values():
        assert {i: id(f) for i, f in m.dirty.items()} == \
            {i: id(f) for i, f in m.folios.items() if f.dirty}
        assert {i: id(f) for i, f in m.busy.items()} == \
            {i: id(f) for i, f in m.folios.items() if f.writeback or f.locked}
        assert {i: id(f) for i, f in m.data_busy.items()} == \
            {i: id(f) for i, f in m.folios.items() if f.locked or f.io in DATA_IO}
    # the folios a checkpoint looks at are exactly the logged ones
    assert {id(f) for f in cache._logged.values()} == {id(f) for f in folios if f.logged_seq}
    # the LRU holds exactly the evictable folios
    assert set(cache.lru) == {(f.mapping.ino, f.index) for f in folios if f.evictable}
    assert all(f.in_lru == f.evictable for f in folios)
    for f in folios:
        assert f.dirty & ~f.uptodate == 0, "dirty blocks must be uptodate"
        assert not f.io_mask or f.io in DATA_IO
        assert f.pins >= 0


def folio_state(f: Folio) -> tuple:
    return (f.uptodate, f.dirty, f.reserved, f.atomic, f.io, f.io_mask, f.locked,
            f.logged_seq, f.in_lru, f.pins, f.buf.crc32c())


def cache_state(cache: PageCache) -> tuple:
    return (cache.bytes, cache.dirty_bytes, cache.writeback_bytes, cache.logged_bytes,
            list(cache.lru),
            {(m.ino, i): folio_state(f) for m in cache.mappings.values()
             for i, f in m.folios.items()},
            {m.ino: (sorted(m.dirty), sorted(m.busy), sorted(m.data_busy))
             for m in cache.mappings.values()})


def uptodate_folio(cache: PageCache, m: Mapping, index: int = 0,
                   mask: int = FULL) -> Folio:
    folio = cache.get_folio(m, index)
    cache.mark_uptodate(folio, mask)
    return folio



def plain_mapping(cache: PageCache, ino: int = 20) -> tuple[Inode, Mapping]:
    inode = make_inode(ino, unit=0)
    m = cache.mapping(inode, DEFAULT_FOLIO)
    assert not m.atomic and m.blocks_per_folio == 16
    return inode, m
