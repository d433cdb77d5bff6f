"""Extent maps, metadata mutations and their records, replay and snapshots."""
from __future__ import annotations

import random
import stat
from collections import Counter
import pytest

from atomicfs import format as fmt
from atomicfs.errors import CorruptFilesystem
from atomicfs.metadata import (XATTR_ATOMIC_STRICT, XATTR_ATOMIC_UNIT, XATTR_WRITETHROUGH,
                               Extent, ExtentMap, Inode, Metadata, iter_tree)
from tests.unit.fsutil import canonical

HOLE_LEN = 1 << 62

# ---------------------------------------------------------------------------- ExtentMap


def check_extent_map(em: ExtentMap, model: dict[int, int]) -> None:
    """The map agrees with a block-by-block model and is in canonical form."""
    exts = list(em)
    for f, d, c in exts:
        assert c > 0
    for (f0, d0, c0), (f1, d1, c1) in zip(exts, exts[1:]):
        assert f0 + c0 <= f1, "overlapping or unsorted extents"
        assert not (f0 + c0 == f1 and d0 + c0 == d1), "adjacent extents not merged"
    flat = {f + i: d + i for f, d, c in exts for i in range(c)}
    assert flat == model
    assert em.mapped_blocks == len(model)
    assert sorted(d + i for d, c in em.device_extents() for i in range(c)) == \
        sorted(model.values())
    top = max(model, default=0) + 3
    for f in range(0, top):
        d, n = em.lookup(f)
        if f in model:
            assert d == model[f]
            k = 0
            while model.get(f + k) == d + k:
                k += 1
            assert n == k
        else:
            assert d is None
            nxt = min((g for g in model if g > f), default=None)
            assert n == (nxt - f if nxt is not None else HOLE_LEN)


def test_extent_map_merges_and_splits() -> None:
    em = ExtentMap()
    assert em.map(10, 100, 5) == []
    assert em.map(15, 105, 5) == []  # continues in file and device: merged
    assert list(em) == [(10, 100, 10)]
    assert em.map(5, 95, 5) == []  # continues backwards: merged too
    assert list(em) == [(5, 95, 15)]
    assert em.map(20, 300, 2) == []  # file-adjacent, device not: separate
    assert list(em) == [(5, 95, 15), (20, 300, 2)]
    # overwrite the middle: split in three, the old blocks are returned
    assert em.map(8, 500, 3) == [(98, 3)]
    assert list(em) == [(5, 95, 3), (8, 500, 3), (11, 101, 9), (20, 300, 2)]
    # put the original blocks back: everything merges again
    assert em.map(8, 98, 3) == [(500, 3)]
    assert list(em) == [(5, 95, 15), (20, 300, 2)]
    # unmap a range spanning two extents and a hole
    assert em.unmap(18, 3) == [(108, 2), (300, 1)]
    assert list(em) == [(5, 95, 13), (21, 301, 1)]
    assert em.unmap(6) == [(96, 12), (301, 1)]
    assert list(em) == [(5, 95, 1)]
    assert em.unmap(100) == []


def test_extent_map_lookup_and_runs() -> None:
    em = ExtentMap()
    assert em.lookup(0) == (None, HOLE_LEN)
    em.map(4, 40, 4)
    em.map(10, 90, 2)
    assert em.lookup(0) == (None, 4)
    assert em.lookup(5) == (41, 3)
    assert em.lookup(8) == (None, 2)
    assert em.lookup(12) == (None, HOLE_LEN)
    assert list(em.runs(2, 12)) == [(2, None, 2), (4, 40, 4), (8, None, 2), (10, 90, 2),
                                    (12, None, 2)]
    assert list(em.runs(5, 1)) == [(5, 41, 1)]
    assert list(em.runs(5, 0)) == []


def test_extent_map_randomized_against_a_dict() -> None:
    rng = random.Random(21)
    for _ in range(60):
        em = ExtentMap()
        model: dict[int, int] = {}
        for _ in range(60):
            f = rng.randrange(0, 64)
            c = rng.randrange(1, 12)
            if rng.random() < 0.65:
                # device blocks either continue a neighbour (to provoke merges) or not
                d = rng.choice((model.get(f - 1, 1000) + 1, rng.randrange(0, 2000),
                                1000 + f))
                replaced = sorted(model[f + i] for i in range(c) if f + i in model)
                freed = em.map(f, d, c)
                for i in range(c):
                    model[f + i] = d + i
            else:
                whole = rng.random() < 0.3
                end = 1 << 62 if whole else f + c
                replaced = sorted(v for k, v in model.items() if f <= k < end)
                freed = em.unmap(f, None if whole else c)
                for k in [k for k in model if f <= k < end]:
                    del model[k]
            assert sorted(d + i for d, n in freed for i in range(n)) == replaced
            check_extent_map(em, model)
            start = rng.randrange(0, 70)
            count = rng.randrange(0, 20)
            pos = start
            for fb, d, n in em.runs(start, count):
                assert fb == pos and n > 0
                for i in range(n):
                    assert model.get(fb + i) == (None if d is None else d + i)
                pos += n
            assert pos == start + count


# ------------------------------------------------------------------------------ metadata


class RecordingSink:
    """A MetadataSink that keeps what the journal would get."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.released: list[Extent] = []

    def record(self, rec: bytes) -> None:
        self.records.append(rec)

    def release(self, extents: list[Extent]) -> None:
        self.released.extend(extents)

    def stream(self) -> bytes:
        return b"".join(self.records)


def replayed(stream: bytes, block_size: int = 4096) -> Metadata:
    md = Metadata(block_size)
    for r in fmt.decode_records(stream):
        md.apply(r)
    return md


def new_md() -> tuple[Metadata, RecordingSink]:
    sink = RecordingSink()
    md = Metadata(4096, sink)
    md.make_root(0, 0, 0o755, now=1)
    return md, sink


def test_scripted_mutations_replay_to_the_same_state() -> None:
    md, sink = new_md()
    root = md.root
    d = md.new_inode(stat.S_IFDIR | 0o700, 1, 2, now=10)
    md.add_entry(root, b"dir", d, now=10)
    f = md.new_inode(stat.S_IFREG | 0o644, 1, 2, now=11)
    md.add_entry(d, b"file", f, now=11)
    md.set_xattr(d, XATTR_ATOMIC_UNIT, b"16384")
    md.set_xattr(f, XATTR_WRITETHROUGH, b"1")
    md.set_xattr(f, XATTR_ATOMIC_STRICT, b"1")
    md.set_xattr(f, b"user.note", b"\0binary\xff")
    md.del_xattr(f, XATTR_ATOMIC_STRICT)
    s = md.new_inode(stat.S_IFLNK | 0o777, 0, 0, now=12)
    md.add_entry(root, b"link", s, now=12)
    md.set_symlink(s, b"dir/file")
    md.map_extent(f, 0, 3000, 4)
    md.map_extent(f, 4, 3004, 4)  # merges
    md.map_extent(f, 2, 5000, 1)  # splits, releases 3002
    md.truncate_extents(f, 6)  # releases 3006, 3007
    f.size = 6 * 4096
    f.mtime_ns = 99
    md.mark_dirty(f)
    # a hard link, then the original name goes
    md.add_entry(root, b"hard", f, now=13)
    f.nlink += 1
    md.log_inode(f)
    md.remove_entry(d, b"file", now=14)
    f.nlink -= 1
    md.log_inode(f)
    # a file that lives and dies within the log
    g = md.new_inode(stat.S_IFREG | 0o600, 0, 0, now=15)
    md.add_entry(d, b"tmp", g, now=15)
    md.map_extent(g, 0, 7000, 2)
    md.remove_entry(d, b"tmp", now=16)
    md.delete_inode(g)  # releases 7000+2
    assert md.flush_dirty() == 0  # log_inode already logged f
    assert sorted(sink.released) == [(3002, 1), (3006, 2), (7000, 2)]

    again = replayed(sink.stream())
    assert canonical(again) == canonical(md)
    assert again.serialize() == md.serialize()
    assert again.inodes[d.ino].atomic_unit == 16384
    assert again.inodes[f.ino].writethrough == 1
    assert again.inodes[f.ino].atomic_strict == -1
    assert again.inodes[s.ino].target == b"dir/file"
    assert [p for p, _ in iter_tree(again)] == [b"/", b"/dir", b"/hard", b"/link"]


def test_root_parent_survives_replay_and_snapshot() -> None:
    """The root is its own parent ('..' of the root is the root), after a remount too."""
    md, sink = new_md()
    assert md.root.parent == fmt.ROOT_INO
    assert replayed(sink.stream()).root.parent == fmt.ROOT_INO
    snap = Metadata(4096)
    snap.load(md.serialize())
    assert snap.root.parent == fmt.ROOT_INO


def test_next_ino_survives_replay_when_the_newest_inode_is_deleted() -> None:
    """Inode numbers are not handed out twice, even across a crash: the replayed counter
    is at least the live one."""
    md, sink = new_md()
    f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, now=1)
    md.add_entry(md.root, b"f", f, now=1)
    md.remove_entry(md.root, b"f", now=2)
    md.delete_inode(f)
    again = replayed(sink.stream())
    assert again.next_ino == md.next_ino == f.ino + 1


def _random_mutations(md: Metadata, rng: random.Random, steps: int) -> list[int]:
    """Apply random namespace, extent, xattr and attribute changes the way fs.py does;
    returns the device blocks mapped (each mapping once)."""
    mapped: list[int] = []
    next_dblock = [10_000]
    now = [100]

    def tick() -> int:
        now[0] += 1
        return now[0]

    for _ in range(steps):
        dirs = [i for i in md.inodes.values() if i.is_dir]
        files = [i for i in md.inodes.values() if i.is_reg]
        op = rng.random()
        if op < 0.2:
            parent = rng.choice(dirs)
            name = f"n{rng.randrange(40)}".encode()
            if name in parent.entries:
                continue
            kind = rng.choice((stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755,
                               stat.S_IFLNK | 0o777))
            child = md.new_inode(kind, rng.randrange(3), rng.randrange(3), tick())
            if child.is_symlink:
                md.set_symlink(child, rng.randbytes(rng.randrange(1, 30)))
            md.add_entry(parent, name, child, tick())
        elif op < 0.3 and files:
            f = rng.choice(files)
            parent = rng.choice(dirs)
            name = f"l{rng.randrange(40)}".encode()
            if name in parent.entries or f.nlink == 0:
                continue
            md.add_entry(parent, name, f, tick())
            f.nlink += 1
            md.log_inode(f)
        elif op < 0.45:
            parent = rng.choice(dirs)
            if not parent.entries:
                continue
            name = rng.choice(sorted(parent.entries))
            child = md.lookup(parent, name)
            assert child is not None
            if child.is_dir and child.entries:
                continue
            md.remove_entry(parent, name, tick())
            child.nlink -= 2 if child.is_dir else 1
            if child.nlink <= 0 or child.is_dir:
                md.delete_inode(child)
            else:
                md.log_inode(child)
        elif op < 0.65 and files:
            f = rng.choice(files)
            fb = rng.randrange(0, 40)
            count = rng.randrange(1, 8)
            if rng.random() < 0.5 and f.extents:
                # continue the device run of an existing extent (provokes merging)
                lf, ld, lc = list(f.extents)[-1]
                fb, d = lf + lc, ld + lc
                if any(d <= m < d + count for m in mapped):
                    d = next_dblock[0]
            else:
                d = next_dblock[0]
            next_dblock[0] = max(next_dblock[0], d + count) + rng.randrange(0, 3)
            md.map_extent(f, fb, d, count)
            mapped.extend(range(d, d + count))
        elif op < 0.72 and files:
            f = rng.choice(files)
            md.truncate_extents(f, rng.randrange(0, 40))
        elif op < 0.85:
            inode = rng.choice(list(md.inodes.values()))
            name = rng.choice((XATTR_ATOMIC_UNIT, XATTR_WRITETHROUGH, XATTR_ATOMIC_STRICT,
                               b"user.a", b"user.b"))
            if name in inode.xattrs and rng.random() < 0.4:
                md.del_xattr(inode, name)
            else:
                value = (str(rng.choice((4096, 16384, 0))).encode() if name ==
                         XATTR_ATOMIC_UNIT else rng.choice((b"1", b"0", b" 1\n", b"xyz")))
                md.set_xattr(inode, name, value)
        else:
            inode = rng.choice(list(md.inodes.values()))
            inode.size = rng.randrange(0, 1 << 36)
            inode.mtime_ns = inode.ctime_ns = tick()
            inode.mode = stat.S_IFMT(inode.mode) | rng.randrange(0o7777)
            md.mark_dirty(inode)
            if rng.random() < 0.3:
                md.flush_dirty()
    md.flush_dirty()
    return mapped


@pytest.mark.parametrize("seed", range(8))
def test_random_mutations_replay_to_the_same_state(seed: int) -> None:
    rng = random.Random(seed)
    md, sink = new_md()
    mapped = _random_mutations(md, rng, 400)
    again = replayed(sink.stream())
    assert canonical(again) == canonical(md)
    assert again.serialize() == md.serialize()
    # the running estimate of the next snapshot's size is exact, live and after replay
    assert md.snapshot_bytes == again.snapshot_bytes == len(md.serialize())
    # Every device block ever mapped is either still mapped or was released, exactly once:
    # the allocator neither leaks blocks nor frees one twice.
    still = Counter(d + i for i in md.inodes.values() if i.extents is not None
                    for d, c in i.extents.device_extents() for i in range(c))
    released = Counter(d + i for d, c in sink.released for i in range(c))
    assert still + released == Counter(mapped)
    # Replaying in two halves (a snapshot in between) gives the same result.
    cut = len(sink.records) // 2
    first = replayed(b"".join(sink.records[:cut]))
    second = Metadata(4096)
    second.load(first.serialize())
    for r in fmt.decode_records(b"".join(sink.records[cut:])):
        second.apply(r)
    assert canonical(second) == canonical(md)


@pytest.mark.parametrize("seed", range(4))
def test_snapshot_round_trip(seed: int) -> None:
    md, _ = new_md()
    _random_mutations(md, random.Random(100 + seed), 300)
    snap = md.serialize()
    loaded = Metadata(4096)
    loaded.load(snap)
    assert canonical(loaded) == canonical(md)
    assert loaded.serialize() == snap
    assert loaded.snapshot_bytes == md.snapshot_bytes == len(snap)


def test_flush_dirty_emits_one_inode_record_per_dirty_inode() -> None:
    md, sink = new_md()
    f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, now=1)
    md.add_entry(md.root, b"f", f, now=1)
    cleared, cleared_bytes = len(sink.records), len(sink.stream())
    sink.records.clear()
    md.set_size(f, 100)
    md.mark_dirty(f)
    md.set_size(f, 200)  # the record carries the state at flush time
    md.mark_dirty(f)
    md.mark_dirty(md.root)
    assert md.is_dirty(f.ino)
    assert md.flush_dirty() == 2
    recs = [r for raw in sink.records for r in fmt.decode_records(raw)]
    assert [(r.rtype, r.args[0]) for r in recs] == [(fmt.REC_INODE, fmt.ROOT_INO),
                                                     (fmt.REC_INODE, f.ino)]
    assert recs[1].args == f.record_fields() and recs[1].args[5] == 200
    assert not md.is_dirty(f.ino)
    assert md.flush_dirty() == 0
    assert len(sink.records) == 2
    # log_inode logs at once and leaves nothing for the next flush
    md.mark_dirty(f)
    md.log_inode(f)
    assert md.flush_dirty() == 0
    # a deleted inode that was dirty emits nothing more
    md.mark_dirty(f)
    md.remove_entry(md.root, b"f", now=2)
    md.delete_inode(f)
    n = len(sink.records)
    assert md.flush_dirty() == 0
    assert len(sink.records) == n
    assert md.records_emitted == cleared + len(sink.records)
    assert md.bytes_emitted == cleared_bytes + len(sink.stream())


def test_truncate_beyond_the_last_extent_emits_nothing() -> None:
    md, sink = new_md()
    f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, now=1)
    md.map_extent(f, 0, 3000, 4)
    n = len(sink.records)
    md.truncate_extents(f, 4)
    assert len(sink.records) == n and sink.released == []
    md.truncate_extents(f, 1)
    assert sink.released == [(3001, 3)]


def _apply(md: Metadata, raw: bytes) -> list[Extent]:
    (r,) = list(fmt.decode_records(raw))
    return md.apply(r)


def test_apply_rejects_records_that_contradict_the_metadata() -> None:
    md, _ = new_md()
    md.sink = None
    f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, now=1)
    d = md.new_inode(stat.S_IFDIR | 0o755, 0, 0, now=1)
    md.add_entry(md.root, b"d", d, now=1)
    md.add_entry(d, b"x", f, now=1)
    bad = [
        fmt.rec_inode_del(999),
        fmt.rec_inode_del(d.ino),  # a non-empty directory
        fmt.rec_dirent_add(f.ino, b"x", f.ino),  # entry in a file
        fmt.rec_dirent_add(fmt.ROOT_INO, b"y", 999),  # entry naming a missing inode
        fmt.rec_dirent_del(fmt.ROOT_INO, b"nope"),
        fmt.rec_extent_set(d.ino, 0, 3000, 1),  # extents of a directory
        fmt.rec_extent_set(999, 0, 3000, 1),
        fmt.rec_extent_trunc(999, 0),
        fmt.rec_xattr_set(999, b"user.a", b"1"),
        fmt.rec_xattr_del(f.ino, b"user.none"),
        fmt.rec_symlink(f.ino, b"t"),  # not a symlink
        fmt.rec_inode((f.ino, stat.S_IFDIR | 0o755) + (0,) * 11),  # changes its type
    ]
    for raw in bad:
        with pytest.raises(CorruptFilesystem):
            _apply(md, raw)


def test_apply_returns_released_extents_and_next_ino_only_grows() -> None:
    md, _ = new_md()
    md.sink = None
    f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, now=1)
    assert _apply(md, fmt.rec_extent_set(f.ino, 0, 3000, 4)) == []
    assert _apply(md, fmt.rec_extent_set(f.ino, 1, 4000, 1)) == [(3001, 1)]
    assert _apply(md, fmt.rec_extent_trunc(f.ino, 2)) == [(3002, 2)]
    assert _apply(md, fmt.rec_inode_del(f.ino)) == [(3000, 1), (4000, 1)]
    assert _apply(md, fmt.rec_data(5, 0, 1, 1, 0)) == []  # the journal's business
    before = md.next_ino
    _apply(md, fmt.rec_next_ino(before + 10))
    _apply(md, fmt.rec_next_ino(2))
    assert md.next_ino == before + 10
    _apply(md, fmt.rec_inode((before + 20, stat.S_IFREG) + (0,) * 11))
    assert md.next_ino == before + 21


def test_is_ancestor() -> None:
    md, _ = new_md()
    a = md.new_inode(stat.S_IFDIR | 0o755, 0, 0, now=1)
    md.add_entry(md.root, b"a", a, now=1)
    b = md.new_inode(stat.S_IFDIR | 0o755, 0, 0, now=1)
    md.add_entry(a, b"b", b, now=1)
    assert md.is_ancestor(md.root, b)
    assert md.is_ancestor(a, b)
    assert md.is_ancestor(b, b)
    assert not md.is_ancestor(b, a)


def test_inode_kinds() -> None:
    assert Inode(5, stat.S_IFREG).extents is not None
    assert Inode(5, stat.S_IFDIR).entries == {}
    sym = Inode(5, stat.S_IFLNK)
    assert sym.extents is None and sym.entries is None and sym.is_symlink


def test_recorded_size_follows_written_data_only() -> None:
    """A write past the end grows the size at once but the recorded size only as the
    data reaches the device, so a crash never leaves a tail of zeros."""
    md, _ = new_md()
    f = md.new_inode(stat.S_IFREG | 0o644, 0, 0, now=1)
    f.size = 3 * 4096  # a buffered write extended the file (pagecache does this)
    assert f.record_fields()[5] == 0
    md.data_written(f, 4096)  # its first block went out
    assert f.record_fields()[5] == 4096 and md.size_dirty(f.ino)
    md.set_size(f, 5 * 4096)  # truncate up over unwritten data: no growth yet
    assert f.size == 5 * 4096 and f.record_fields()[5] == 4096
    md.data_written(f, 1 << 40)  # never past the size
    assert f.record_fields()[5] == 5 * 4096
    md.set_size(f, 100)  # truncate down shrinks both
    assert f.size == f.record_fields()[5] == 100
    md.set_size(f, 8192)  # truncate up of a fully recorded file: a hole, recorded
    assert f.record_fields()[5] == 8192
