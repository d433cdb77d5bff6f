"""The generic buffered paths of filemap.py over a real page cache and delalloc: which
blocks are read, the atomic tagging policy, write groups, write-through's stable period,
truncate. The layers below (flusher, writeback, metadata) are small recording fakes; reads
of a file without extents fill zeros without touching a device."""
from __future__ import annotations

import errno
from typing import Any

import pytest

from atomicfs.alloc import Allocator
from atomicfs.delalloc import Delalloc
from atomicfs.errors import NoSpace
from atomicfs.filemap import FileMap, ReplyBuffers
from atomicfs.metadata import Inode
from atomicfs.pagecache import Folio, Mapping, PageCache
from tests.unit.cacheutil import (BS, DEFAULT_FOLIO, FULL, UNIT, atomic_mapping, cache_state,
                                  check_accounting, make_cache, make_inode)


class Lower:
    """What filemap calls below it: the flusher, writeback and metadata, recording. Taking
    a write group cleans its members, as the log does."""

    block_size = BS
    snapshot_bytes = 0

    def __init__(self, cache: PageCache) -> None:
        self.cache = cache
        self.alloc = Allocator(1 << 16, 0)
        self.reads: list[tuple[int, int]] = []  # (folio index, block mask)
        self.written: list[bool] = []  # mark_dirty(size_changed)
        self.reserved: list[list[tuple[int, int]]] = []
        self.through: list[dict[str, Any]] = []
        self.groups: list[list[int]] = []

    async def balance_dirty(self) -> None:
        pass

    def mark_dirty(self, inode: Inode, size_changed: bool = False) -> None:
        self.written.append(size_changed)

    async def write_through(self, inode: Inode, mapping: Mapping,
                            items: list[tuple[Folio, int]], size_grew: bool,
                            durable: bool = True) -> None:
        self.through.append({"stable": mapping.stable, "inflight": mapping.wt_inflight,
                             "items": [(f.index, m) for f, m in items],
                             "size_grew": size_grew})

    async def write_group(self, inode: Inode, mapping: Mapping, group: Any) -> None:
        self.groups.append(sorted(f.index for f in group.folios))
        for f in group.folios:
            self.cache.take_clean(f, f.dirty)
        self.cache.dissolve_group(group, 1)


class RecordingDelalloc(Delalloc):
    def __init__(self, lower: Lower) -> None:
        super().__init__(lower.alloc, lower, lower.cache, debug=True)  # type: ignore[arg-type]
        self.lower = lower

    def reserve_for_write(self, inode: Inode, items: list[tuple[Folio, int]]) -> None:
        self.lower.reserved.append([(f.index, m) for f, m in items])
        super().reserve_for_write(inode, items)


class RecordingFileMap(FileMap):
    lower: Lower

    async def read_folios(self, inode: Inode, needs: list[tuple[Folio, int]]) -> None:
        self.lower.reads.extend((f.index, mask) for f, mask in needs)
        await super().read_folios(inode, needs)


def make_filemap(cache: PageCache, lower: Lower | None = None) -> tuple[FileMap, Lower]:
    low = lower or Lower(cache)
    fm = RecordingFileMap(None, low, cache, RecordingDelalloc(low), low, low,  # type: ignore[arg-type]
                          cache.counters)
    fm.lower = low
    return fm, low


async def test_write_tags_folios_covered_whole_as_atomic() -> None:
    """A pwritev of several units plus ragged edges: the units covered whole become
    atomic, the edges do not."""
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    inode.size = 10 * UNIT  # existing data: partial blocks must be read first
    data = bytes(range(256)) * ((3 * UNIT) // 256)
    off = UNIT - 2 * BS  # the last two blocks of folio 0, folios 1 and 2, half of 3
    n = await fm.write(inode, m, off, data[:2 * BS + 2 * UNIT + 2 * BS])
    assert n == 2 * BS + 2 * UNIT + 2 * BS
    f = m.folios
    assert [f[i].atomic for i in range(4)] == [False, True, True, False]
    assert f[0].dirty == 0b1100 and f[1].dirty == FULL and f[3].dirty == 0b0011
    assert cache.counters.atomic_cleared_partial == 0
    assert io.reads == []  # block aligned: nothing to read
    assert cache.dirty_bytes == (2 + 8 + 2) * BS
    assert io.written == [False]
    check_accounting(cache)
    out = await fm.read(inode, m, off, 2 * BS + 2 * UNIT + 2 * BS)
    assert bytes(out) == data[:2 * BS + 2 * UNIT + 2 * BS]


async def test_a_partial_write_clears_the_atomic_tag() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, UNIT, b"a" * UNIT)
    folio = m.folios[1]
    assert folio.atomic
    await fm.write(inode, m, UNIT + 100, b"b" * 10)
    assert not folio.atomic
    assert cache.counters.atomic_cleared_partial == 1
    await fm.write(inode, m, UNIT + 200, b"c" * 10)
    assert cache.counters.atomic_cleared_partial == 1  # counted when a tag is lost only
    await fm.write(inode, m, UNIT, b"d" * UNIT)  # whole again: atomic again
    assert folio.atomic
    out = await fm.read(inode, m, UNIT, UNIT)
    assert bytes(out) == b"d" * UNIT


async def test_atomic_strict_rejects_unaligned_writes_and_changes_nothing() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 0, b"x" * UNIT, strict=True)
    before = cache_state(cache)
    size, mtime = inode.size, inode.mtime_ns
    for off, length in ((BS, UNIT), (0, UNIT + BS), (UNIT, 100), (1, UNIT - 1)):
        with pytest.raises(OSError) as exc:
            await fm.write(inode, m, off, b"y" * length, strict=True)
        assert exc.value.errno == errno.EINVAL
    assert cache.counters.atomic_strict_rejected == 4
    assert cache_state(cache) == before
    assert (inode.size, inode.mtime_ns) == (size, mtime)
    assert io.written == [True] and len(io.reserved) == 1  # only the first write
    await fm.write(inode, m, 2 * UNIT, b"z" * 2 * UNIT, strict=True)
    assert m.folios[2].atomic and m.folios[3].atomic
    # without an atomic unit, strict means nothing
    inode2 = make_inode(20, unit=0)
    plain = cache.mapping(inode2, DEFAULT_FOLIO)
    await fm.write(inode2, plain, 5, b"q", strict=True)
    assert not plain.folios[0].atomic


async def test_partial_blocks_are_read_first_only_when_they_hold_data() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    # beyond EOF: the device holds nothing there, so no read
    await fm.write(inode, m, 100, b"a" * 10)
    assert io.reads == []
    assert inode.size == 110
    # inside the file, in a block not cached: read that block only
    inode.size = 4 * UNIT
    await fm.write(inode, m, UNIT + BS + 5, b"b" * (BS + 10))
    assert io.reads == [(1, 0b0110)]
    io.reads.clear()
    # blocks already uptodate or dirty are not read again
    await fm.write(inode, m, UNIT + BS + 7, b"c" * 3)
    await fm.write(inode, m, 50, b"d")
    assert io.reads == []
    check_accounting(cache)


async def test_write_extends_the_file_and_reports_it() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 0, b"a" * 10, now=123)
    assert inode.size == 10 and inode.mtime_ns == inode.ctime_ns == 123
    await fm.write(inode, m, 0, b"b" * 5, now=124)
    assert inode.size == 10
    assert io.written == [True, False]
    assert await fm.write(inode, m, 0, b"") == 0
    out = await fm.read(inode, m, 0, 100)
    assert bytes(out) == b"b" * 5 + b"a" * 5


def _spare_with_old_bytes(cache: PageCache) -> Any:
    """A spare buffer of a whole unit that holds another file's bytes."""
    other, om = atomic_mapping(cache, 99)
    folio = cache.get_folio(om, 0)
    folio.buf.write(0, b"o" * UNIT)
    cache.mark_uptodate(folio, FULL)
    cache.drop_mapping(other.ino)
    assert cache.spare_bytes == UNIT
    return folio.buf


async def test_a_new_folio_covered_whole_never_shows_old_bytes() -> None:
    """Its buffer is not zeroed before the copy: if the write awaits first (a partial
    block of another folio is read) or fails, it is zeroed then."""
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    inode.size = 4 * UNIT
    seen: list[bool] = []

    class Checking(RecordingFileMap):
        async def read_folios(self, inode: Inode, needs: list[tuple[Folio, int]]) -> None:
            seen.append(m.folios[0].buf.is_zero())
            await super().read_folios(inode, needs)

    low = Lower(cache)
    fm = Checking(None, low, cache, RecordingDelalloc(low), low, low,  # type: ignore[arg-type]
                  cache.counters)
    fm.lower = low
    old = _spare_with_old_bytes(cache)
    await fm.write(inode, m, 0, b"w" * (UNIT + 10))  # folio 0 whole, block 0 of 1 in part
    assert m.folios[0].buf is old and seen == [True]
    assert bytes(await fm.read(inode, m, 0, UNIT + 10)) == b"w" * (UNIT + 10)

    def no_space(inode: Inode, items: list[tuple[Folio, int]]) -> None:
        raise NoSpace("full")

    old = _spare_with_old_bytes(cache)
    fm.delalloc.reserve_for_write = no_space  # type: ignore[method-assign]
    with pytest.raises(NoSpace):
        await fm.write(inode, m, 2 * UNIT, b"x" * UNIT)
    assert m.folios[2].buf is old and old.is_zero() and not m.folios[2].uptodate
    check_accounting(cache)


async def test_write_through_runs_with_the_mapping_stable() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 0, b"w" * (UNIT + BS), writethrough=True)
    assert io.through == [{"stable": True, "inflight": 1,
                           "items": [(0, FULL), (1, 0b0001)], "size_grew": True}]
    assert not m.stable and m.wt_inflight == 0
    assert all(f.pins == 0 for f in m.folios.values())


async def test_failed_write_through_still_ends_the_stable_period() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)

    class FailingLower(Lower):
        async def write_through(self, inode: Inode, mapping: Mapping,
                                items: list[tuple[Folio, int]], size_grew: bool,
                                durable: bool = True) -> None:
            raise OSError(errno.EIO, "device error")

    fm, _ = make_filemap(cache, FailingLower(cache))
    with pytest.raises(OSError):
        await fm.write(inode, m, 0, b"w" * UNIT, writethrough=True)
    assert not m.stable and m.wt_inflight == 0
    assert all(f.pins == 0 for f in m.folios.values())
    check_accounting(cache)


async def test_read_holes_and_beyond_eof() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 3 * UNIT, b"e" * 10)
    out = await fm.read(inode, m, UNIT - 5, 2 * UNIT + 20)
    assert bytes(out) == bytes(2 * UNIT + 5) + b"e" * 10
    assert await fm.read(inode, m, inode.size, 10) == b""
    assert all(f.pins == 0 for f in m.folios.values())
    check_accounting(cache)


async def test_truncate_drops_folios_beyond_and_zeroes_the_tail_block() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 0, b"t" * 3 * UNIT)
    assert io.alloc._reserved == 12  # a new file: every block needs a home
    await fm.truncate(inode, m, UNIT + 100)
    inode.size = UNIT + 100
    assert io.alloc._reserved == 5  # folio 2 dropped, blocks 1-3 of folio 1 discarded
    fm.delalloc.check()
    assert set(m.folios) == {0, 1}
    tail = m.folios[1]
    assert tail.dirty == 0b0001 and not tail.atomic
    assert tail.buf.bytes(0, 100) == b"t" * 100 and tail.buf.is_zero(100)
    check_accounting(cache)
    inode.size = 2 * UNIT  # extended again: reads zeros past the old end
    out = await fm.read(inode, m, UNIT, UNIT)
    assert bytes(out) == b"t" * 100 + bytes(UNIT - 100)


# ----------------------------------------------------------------- write groups (issue 15)


async def test_a_write_of_several_whole_units_is_one_group() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, UNIT, b"g" * 3 * UNIT)  # units 1..3
    members = [m.folios[i] for i in (1, 2, 3)]
    assert all(f.group is members[0].group is not None for f in members)
    assert all(f.atomic for f in members)  # each unit stays atomic on its own too
    await fm.write(inode, m, 0, b"u" * UNIT)  # one whole unit: its own tag only
    assert m.folios[0].group is None and m.folios[0].atomic
    assert cache.counters.atomic_group_writes == 1
    check_accounting(cache)


async def test_a_later_write_into_a_group_sends_the_group_out_first() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 0, b"g" * 4 * UNIT)
    assert io.groups == []
    await fm.write(inode, m, 2 * UNIT + 100, b"p" * 10)  # partial, into unit 2
    assert io.groups == [[0, 1, 2, 3]]  # the whole group, before the change
    assert all(f.group is None for f in m.folios.values())
    assert m.folios[2].dirty and not m.folios[2].atomic
    check_accounting(cache)


async def test_an_announced_atomic_write_groups_even_without_a_unit() -> None:
    cache = make_cache()
    inode = make_inode(11, unit=0)
    m = cache.mapping(inode, DEFAULT_FOLIO)
    assert not m.atomic
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 8192, b"a" * 4096, atomic=True)  # part of one folio
    assert m.folios[0].group is not None and not m.folios[0].atomic
    await fm.write(inode, m, 0, b"b" * 4096)  # a plain write: no group of its own
    assert io.groups == [[0]]


async def test_truncate_takes_folios_out_of_their_group() -> None:
    cache = make_cache()
    inode, m = atomic_mapping(cache)
    fm, io = make_filemap(cache)
    await fm.write(inode, m, 0, b"g" * 4 * UNIT)
    group = m.folios[0].group
    assert group is not None
    await fm.truncate(inode, m, 2 * UNIT)
    inode.size = 2 * UNIT
    assert sorted(f.index for f in group.folios) == [0, 1]


class FakeDevice:
    """A device of bytes; `during_read` runs while a read is in flight (a racing change)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.reads: list[tuple[int, int]] = []
        self.during_read: Any = None

    async def readv(self, offset: int, segments: list[Any]) -> None:
        if self.during_read is not None:
            hook, self.during_read = self.during_read, None
            hook()
        pos = offset
        for buf, off, n in segments:
            buf.write(off, self.data[pos:pos + n])
            pos += n
        self.reads.append((offset, pos - offset))


def mapped_file(cache: PageCache, nblocks: int) -> tuple[Inode, Mapping, FileMap, FakeDevice]:
    """A plain file of nblocks blocks mapped at device block 100 + i, except blocks 3 and 4
    (a hole); block i's device content is bytes of value i + 1."""
    inode = make_inode(11, 0)
    m = cache.mapping(inode, DEFAULT_FOLIO)
    fm, _ = make_filemap(cache)
    dev = FakeDevice((200 + nblocks) * BS)
    fm.dev = dev  # type: ignore[assignment]
    for i in range(nblocks):
        dev.data[(100 + i) * BS:(101 + i) * BS] = bytes([i + 1]) * BS
    assert inode.extents is not None
    inode.extents.map(0, 100, 3)
    inode.extents.map(5, 105, nblocks - 5)
    inode.size = nblocks * BS - 100
    return inode, m, fm, dev


def expected(nblocks: int) -> bytearray:
    out = bytearray()
    for i in range(nblocks):
        out += bytes(BS) if i in (3, 4) else bytes([i + 1]) * BS
    return out[:nblocks * BS - 100]


async def test_uncached_read_merges_extents_zeroes_holes_and_leaves_the_cache_alone() -> None:
    cache = make_cache()
    inode, m, fm, dev = mapped_file(cache, 40)
    out = await fm.read_uncached(inode, m, 10, 1 << 20)
    assert bytes(out) == expected(40)[10:]
    assert dev.reads == [(100 * BS, 3 * BS), (105 * BS, 35 * BS)]
    assert not m.folios
    check_accounting(cache)


async def test_uncached_read_takes_dirty_and_cached_blocks_from_the_cache() -> None:
    cache = make_cache()
    inode, m, fm, dev = mapped_file(cache, 40)
    await fm.write(inode, m, 2 * BS + 7, b"x" * (2 * BS))  # blocks 2..4, 3 in the hole
    want = expected(40)
    want[2 * BS + 7: 4 * BS + 7] = b"x" * (2 * BS)
    dev.reads.clear()  # the write read block 2 in (its partial first block)
    out = await fm.read_uncached(inode, m, 0, 40 * BS)
    assert bytes(out) == bytes(want)
    # blocks 2, 3 and 4 came from the cache: only blocks 0, 1 and 5.. from the device
    assert dev.reads == [(100 * BS, 2 * BS), (105 * BS, 35 * BS)]
    check_accounting(cache)


async def test_uncached_read_falls_back_when_the_mapping_changes_under_it() -> None:
    cache = make_cache()
    inode, m, fm, dev = mapped_file(cache, 40)
    dev.data[150 * BS:151 * BS] = b"n" * BS
    assert inode.extents is not None
    extents = inode.extents
    # block 6 moves to device block 150 while the first read is in flight
    dev.during_read = lambda: extents.map(6, 150, 1)
    out = await fm.read_uncached(inode, m, 0, 10 * BS)
    want = expected(40)[:10 * BS]
    want[6 * BS:7 * BS] = b"n" * BS
    assert bytes(out) == bytes(want)
    assert m.folios  # the fallback went through the cache
    check_accounting(cache)


async def test_uncached_read_clips_to_a_size_that_shrank_meanwhile() -> None:
    cache = make_cache()
    inode, m, fm, dev = mapped_file(cache, 40)

    def shrink() -> None:
        inode.size = 5000
    dev.during_read = shrink
    out = await fm.read_uncached(inode, m, 4096, 8192)
    assert bytes(out) == bytes(expected(40)[4096:5000])
    assert await fm.read_uncached(inode, m, 6000, 10) == b""


def test_reply_buffers_are_reused_only_after_the_reply_is_dropped() -> None:
    replies = ReplyBuffers(4096)
    a, view = replies.get(5000)
    b, held = replies.get(5000)
    assert a is not b and len(view) == 5000 and a.size == 64 << 10
    view[:3] = b"abc"
    assert a.bytes(0, 3) == b"abc"
    del view
    c, _ = replies.get(70000)
    assert c.size == 128 << 10
    d, _ = replies.get(100)
    assert d is a  # a's reply was dropped; b's is still held
    del held
