"""The log on a real image: commit, replay, torn batches, wrap-around, DATA records and their
revocation, checkpoints and log space. The journal writer runs as a trio task; a "crash" is
closing the device and recovering from the image as a mount does."""
from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from atomicfs import format as fmt
from atomicfs.device import Device, DeviceOptions, parse_inject
from atomicfs.journal import Journal, LogFailed
from atomicfs.replay import ScannedBatch, scan_log
from atomicfs.superblock import read_superblock
from atomicfs.mkfs import mkfs
from tests.unit.fsutil import (Opened, canonical, create_file, open_fs, pattern, payload,
                               read_blocks, reaped, reopen, running, scribble)

BS = 4096


def scan(target: str | Opened) -> list[ScannedBatch]:
    """The valid batches of the log as recovery would find them now."""
    if isinstance(target, Opened):
        return list(scan_log(target.dev, read_superblock(target.dev)))
    dev = Device.open(target, readonly=True)
    try:
        return list(scan_log(dev, read_superblock(dev)))
    finally:
        dev.close()


def names(o: Opened) -> set[bytes]:
    assert o.md.root.entries is not None
    return set(o.md.root.entries)


def placing(j: Journal) -> bool:
    """Is a sealed batch waiting for log space (not placed yet)?"""
    return any(b.pos < 0 for b in j._sealed)


def check_space(o: Opened) -> None:
    """Log space in use is exactly the ring distance from the tail to the head (batches
    and the waste before a wrap lie between them)."""
    j = o.journal
    assert j.used == (j.head_pos - j.tail_pos) % j.log_size
    assert 0 <= j.used <= j.log_size - BS


async def test_batches_replay_to_the_same_metadata(fs_image: str) -> None:
    o = open_fs(fs_image)
    j = o.journal
    async with running(j):
        sub = create_file(o.md, b"sub", mode=0o040755)
        for i in range(5):
            f = create_file(o.md, f"f{i}".encode(), parent=sub if i % 2 else None)
            start, _ = o.alloc.allocate(3)
            o.md.map_extent(f, 0, start, 3)
            o.md.set_xattr(f, b"user.i", str(i).encode())
            f.size = 3 * BS + i
            o.md.mark_dirty(f)  # logged with the batch, by flush_dirty
            await j.commit()
            assert j.durable_seq == i + 1
            check_space(o)
        live = canonical(o.md)
        head = (j.head_pos, j.pending_seq)
        free = o.alloc.free_blocks
    batches = scan(o)
    assert [b.seq for b in batches] == [1, 2, 3, 4, 5]
    assert batches[0].pos == 0
    assert all(a.end == b.pos for a, b in zip(batches, batches[1:]))
    again = reopen(o)
    try:
        assert canonical(again.md) == live
        assert again.result.batches == 5
        assert (again.result.head_pos, again.result.head_seq) == head
        assert again.alloc.free_blocks == free  # free space rebuilt from the extents
        # the recovered journal continues where the log ends and counts the replayed
        # batches as used until a checkpoint
        assert again.journal.used == batches[-1].end
        check_space(again)
    finally:
        again.close()


async def test_commit_without_changes_writes_nothing(fs_image: str) -> None:
    o = open_fs(fs_image)
    async with running(o.journal):
        await o.journal.commit()
        assert o.journal.durable_seq == 0 and o.journal.used == 0
    o.close()
    assert scan(fs_image) == []


async def test_data_records_are_written_home_on_replay(fs_image: str) -> None:
    o = open_fs(fs_image)
    j = o.journal
    async with running(j):
        f = create_file(o.md, b"f")
        d, _ = o.alloc.allocate(4)
        o.md.map_extent(f, 0, d, 4)
        v1 = pattern(1, 4 * BS)
        assert j.append_data(f.ino, 0, 0, d, payload(v1), 4) == j.pending_seq
        await j.commit()
        v2 = pattern(2, 2 * BS)  # a newer copy of blocks 1-2, in the next batch
        j.append_data(f.ino, 0, 1, d + 1, payload(v2), 2)
        await j.commit()
        v3 = pattern(3, BS)  # and of block 2 again, twice within one batch
        j.append_data(f.ino, 0, 2, d + 2, payload(pattern(9, BS)), 1)
        j.append_data(f.ino, 0, 2, d + 2, payload(v3), 1)
        await j.commit()
        assert j.is_resident(f.ino, 0)
    # the journal never writes home by itself: that is the checkpoint's (or replay's) job
    assert read_blocks(fs_image, d, 4) == bytes(4 * BS)
    o = reopen(o, write_home=False)
    assert o.result.data_records == 4
    assert read_blocks(fs_image, d, 4) == bytes(4 * BS)
    o = reopen(o, write_home=True)
    try:
        assert o.result.data_blocks_written == 4 + 2 + 1 + 1
        expect = v1[:BS] + v2[:BS] + v3 + v1[3 * BS:]
        assert read_blocks(fs_image, d, 4) == expect
    finally:
        o.close()


async def test_revoked_data_records_are_not_written_home(fs_image: str) -> None:
    """A DATA record lands home only where the final metadata still maps that file block
    to that device block: truncated, remapped and deleted blocks (maybe reused by another
    file since) never get the old data."""
    o = open_fs(fs_image)
    j, md, alloc = o.journal, o.md, o.alloc
    async with running(j):
        a = create_file(md, b"a")
        da, _ = alloc.allocate(2)
        md.map_extent(a, 0, da, 2)
        va = pattern(0xA, 2 * BS)
        j.append_data(a.ino, 0, 0, da, payload(va), 2)
        b = create_file(md, b"b")
        db, _ = alloc.allocate(1)
        md.map_extent(b, 0, db, 1)
        j.append_data(b.ino, 0, 0, db, payload(pattern(0xB, BS)), 1)
        c = create_file(md, b"c")
        dc, _ = alloc.allocate(1)
        md.map_extent(c, 0, dc, 1)
        j.append_data(c.ino, 0, 0, dc, payload(pattern(0xC, BS)), 1)
        await j.commit()

        md.truncate_extents(a, 1)  # a keeps block 0 only
        db2, _ = alloc.allocate(1)
        md.map_extent(b, 0, db2, 1)  # b's block moves
        md.remove_entry(md.root, b"c", now=2)
        md.delete_inode(c)
        assert alloc.is_used(da + 1) == 1  # freed only once that batch is durable
        await j.commit()
        assert alloc.is_used(da + 1) == 0 and alloc.is_used(db) == 0

        # e reuses a's old block 1, its data written in place before the mapping commits
        e = create_file(md, b"e")
        de, _ = alloc.allocate(1, goal=da + 1)
        assert de == da + 1
        ve = pattern(0xE, BS)
        await o.dev.writev(de * BS, [(payload(ve), 0, BS)], "data")
        await o.dev.flush()
        md.map_extent(e, 0, de, 1)
        await j.commit()
    o = reopen(o)
    try:
        assert o.result.data_records == 3
        assert read_blocks(fs_image, da, 1) == va[:BS]  # still mapped: applied
        assert read_blocks(fs_image, de, 1) == ve  # reused: not overwritten
        assert read_blocks(fs_image, db, 1) == bytes(BS)  # remapped away
        assert read_blocks(fs_image, db2, 1) == bytes(BS)  # the record named db, not db2
        assert read_blocks(fs_image, dc, 1) == bytes(BS)  # deleted
        assert o.result.data_blocks_written == 1
    finally:
        o.close()


async def _three_batches(path: str) -> list[ScannedBatch]:
    """Batches 1-3, each creating one file (a, b, c); b's batch also carries a DATA
    record of two blocks."""
    o = open_fs(path)
    async with running(o.journal):
        create_file(o.md, b"a")
        await o.journal.commit()
        b = create_file(o.md, b"b")
        d, _ = o.alloc.allocate(2)
        o.md.map_extent(b, 0, d, 2)
        o.journal.append_data(b.ino, 0, 0, d, payload(pattern(0xB, 2 * BS)), 2)
        await o.journal.commit()
        create_file(o.md, b"c")
        await o.journal.commit()
    o.close()
    batches = scan(path)
    assert [b.seq for b in batches] == [1, 2, 3]
    return batches


TEARS = {
    # name: (offset within the batch, or from its end when negative; bytes written)
    "zeroed-header-sector": (0, bytes(512)),
    "flipped-meta-byte": (fmt.BATCH_HEADER_SIZE + 3, b"\x5a"),
    "garbage-in-payload": (BS + 1024, b"\xa5" * 512),
    "zeroed-last-sector": (-512, bytes(512)),
}


@pytest.mark.parametrize("tear", sorted(TEARS))
async def test_a_torn_batch_ends_the_log(fs_image: str, tear: str) -> None:
    batches = await _three_batches(fs_image)
    sb_dev = Device.open(fs_image, readonly=True)
    log_off = read_superblock(sb_dev).log_offset
    sb_dev.close()
    victim = batches[1]
    where, data = TEARS[tear]
    off = victim.pos + where if where >= 0 else victim.end + where
    with open(fs_image, "rb") as img:
        img.seek(log_off + off)
        assert img.read(len(data)) != data  # the damage really changes the batch
    scribble(fs_image, log_off + off, data)
    o = open_fs(fs_image)
    try:
        # batch 1 replays; batch 2 is dropped whole and batch 3, intact, with it
        assert names(o) == {b"a"}
        assert o.result.batches == 1
        assert (o.result.head_pos, o.result.head_seq) == (victim.pos, 2)
        assert o.result.data_records == 0
    finally:
        o.close()


async def test_writing_after_recovering_from_a_torn_tail(fs_image: str) -> None:
    """After a crash tore the last batch, the next batches take its place and sequence
    number, and a later recovery finds them."""
    batches = await _three_batches(fs_image)
    dev = Device.open(fs_image, readonly=True)
    log_off = read_superblock(dev).log_offset
    dev.close()
    # batch 3 is a header block whose end is zero padding: tear it with garbage
    scribble(fs_image, log_off + batches[2].end - 512, b"\xa5" * 512)
    o = open_fs(fs_image)
    assert names(o) == {b"a", b"b"}
    async with running(o.journal):
        assert o.journal.pending_seq == 3
        create_file(o.md, b"d")
        await o.journal.commit()
        create_file(o.md, b"e")
        await o.journal.commit()
    o = reopen(o)
    try:
        assert names(o) == {b"a", b"b", b"d", b"e"}
        assert o.result.batches == 4
    finally:
        o.close()
    assert scan(fs_image)[2].pos == batches[2].pos


async def test_batches_of_a_previous_filesystem_are_not_replayed(tmp_path: Path) -> None:
    """mkfs clears only the start of the log; batches of an older filesystem on the same
    target, even with the sequence number and position replay expects next, belong to
    another uuid and end the log."""
    path = str(tmp_path / "fs.img")
    mkfs(path, size=fmt.MIN_SIZE)
    o = open_fs(path)
    async with running(o.journal):
        for name in (b"old1", b"old2", b"old3"):
            f = create_file(o.md, name)
            d, _ = o.alloc.allocate(20)
            o.md.map_extent(f, 0, d, 20)
            o.journal.append_data(f.ino, 0, 0, d, payload(pattern(1, 20 * BS)), 20)
            await o.journal.commit()
    o.close()
    old = scan(path)
    assert old[1].pos >= 16 * BS  # beyond the blocks mkfs clears
    mkfs(path, size=fmt.MIN_SIZE, force=True)
    o = open_fs(path)
    async with running(o.journal):
        # the same shape as the old first batch, so the old batch 2 sits exactly where
        # the new log expects batch 2
        f = create_file(o.md, b"new1")
        d, _ = o.alloc.allocate(20)
        o.md.map_extent(f, 0, d, 20)
        o.journal.append_data(f.ino, 0, 0, d, payload(pattern(2, 20 * BS)), 20)
        await o.journal.commit()
    o = reopen(o)
    try:
        new = scan(o)
        assert [b.seq for b in new] == [1]
        assert new[0].end == old[1].pos
        assert names(o) == {b"new1"}
    finally:
        o.close()


@pytest.mark.parametrize("same_batch", [False, True], ids=["two-batches", "one-batch"])
async def test_resident_runs_keep_the_blocks_a_later_record_does_not_overwrite(
        fs_image: str, same_batch: bool) -> None:
    """A unit logged whole, then block 1 of it logged again: the checkpoint must still
    write blocks 0, 2 and 3 home from the first record (it reclaims that record's log
    space), and block 1 from the second."""
    o = open_fs(fs_image)
    j = o.journal
    async with running(j):
        f = create_file(o.md, b"f")
        d, _ = o.alloc.allocate(4)
        o.md.map_extent(f, 0, d, 4)
        v1, v2 = pattern(1, 4 * BS), pattern(2, BS)
        j.append_data(f.ino, 0, 0, d, payload(v1), 4)
        if not same_batch:
            await j.commit()
        j.append_data(f.ino, 0, 1, d + 1, payload(v2), 1)
        await j.commit()
        expect = v1[:BS] + v2 + v1[2 * BS:]
        # the resident runs hold each block exactly once, at its newest logged copy
        runs = sorted((r for _, _, r in j.resident_runs()), key=lambda r: r.fblock)
        assert [(r.fblock, r.dblock - d, r.nblocks) for r in runs] == \
            [(0, 0, 1), (1, 1, 1), (2, 2, 2)]
        # write them home from the log, as the checkpoint does for units not in memory
        boundary = o.checkpointer.seal_for_checkpoint()
        snapshot = o.md.serialize()
        await j.commit(boundary)
        for r in runs:
            buf = await o.dev.read(j.log_offset + r.log_pos, r.nblocks * BS)
            assert buf.bytes() == expect[r.fblock * BS:(r.fblock + r.nblocks) * BS]
            await o.dev.writev(r.dblock * BS, [(buf, 0, r.nblocks * BS)], "data")
        await o.dev.flush()
        await o.checkpointer.write_checkpoint(snapshot, boundary, o.md.next_ino)
        assert j.resident_count == 0
    o = reopen(o)
    try:
        assert o.result.batches == 0
        assert read_blocks(fs_image, d, 4) == expect
    finally:
        o.close()


async def _checkpoint(o: Opened, home: dict[int, bytes]) -> int:
    """A checkpoint as Checkpointer.checkpoint does it, with the resident data's latest
    versions (tracked by the test) written home first."""
    j, ck = o.journal, o.checkpointer
    boundary = ck.seal_for_checkpoint()
    snapshot = o.md.serialize()
    await j.commit(boundary)
    for dblock, data in home.items():
        await o.dev.writev(dblock * BS, [(payload(data), 0, len(data))], "data")
    await o.dev.flush()
    await ck.write_checkpoint(snapshot, boundary, o.md.next_ino)
    return boundary


async def test_checkpoint_moves_the_tail_and_frees_log_space(fs_image: str) -> None:
    o = open_fs(fs_image)
    j = o.journal
    async with running(j):
        f = create_file(o.md, b"f")
        d, _ = o.alloc.allocate(8)
        o.md.map_extent(f, 0, d, 8)
        home = {}
        for i in range(3):
            data = pattern(i, 8 * BS)
            j.append_data(f.ino, 0, 0, d, payload(data), 8)
            home = {d: data}
            await j.commit()
            check_space(o)
        used = j.used
        assert used == 3 * (BS + 8 * BS)  # a header block and the data, three times
        ck = o.checkpointer
        old_snap = list(ck.snapshot_extents)
        boundary = await _checkpoint(o, home)
        assert boundary == 3
        assert j.used == 0 and j.tail_pos == j.head_pos and j.tail_seq == 4
        assert not j.is_resident(f.ino, 0)
        assert ck.sb.seq == 2 and ck.sb.log_tail == j.tail_pos and ck.sb.log_seq == 4
        # the old snapshot is kept as the fallback, the new one is in use
        assert ck.previous_snapshot_extents == old_snap
        assert ck.sb.prev_snap_block == old_snap[0][0] and ck.sb.prev_log_seq == 1
        assert all(o.alloc.is_used(s, c) == c for s, c in old_snap)
        assert all(o.alloc.is_used(s, c) == c for s, c in ck.snapshot_extents)
        # more changes after the checkpoint
        g = create_file(o.md, b"g")
        g.size = 123
        o.md.mark_dirty(g)
        await j.commit()
        assert 0 < j.used < used
        check_space(o)
        live = canonical(o.md)
    o = reopen(o)
    try:
        assert o.sb.seq == 2 and o.sb.log_seq == 4
        assert o.result.batches == 1  # only the batch after the checkpoint
        assert canonical(o.md) == live
        assert read_blocks(fs_image, d, 8) == home[d]
    finally:
        o.close()


async def test_log_wraps_around(fs_image: str) -> None:
    """Two laps and more around the ring with checkpoints in between, then a crash with the
    live part of the log spanning the wrap point: replay finds those batches in order,
    applies the newest data, and stops at the stale batches of the previous lap."""
    o = open_fs(fs_image)
    j = o.journal
    nblocks = 32  # 128 KiB of data per batch
    f = create_file(o.md, b"f")
    d, _ = o.alloc.allocate(4 * nblocks)
    o.md.map_extent(f, 0, d, 4 * nblocks)
    home: dict[int, bytes] = {}  # newest content of each chunk (device block -> bytes)
    wraps = 0
    since_ckpt: list[int] = []  # head positions of batches since the last checkpoint
    async with running(j):
        i = 0
        while True:
            i += 1
            chunk = i % 4
            data = pattern(i, nblocks * BS)
            j.append_data(f.ino, 0, chunk * nblocks, d + chunk * nblocks, payload(data),
                          nblocks)
            o.md.set_xattr(f, b"user.i", str(i).encode())
            home[d + chunk * nblocks] = data
            before = j.head_pos
            await j.commit()
            check_space(o)
            assert j.used <= j.log_size - j.reserve
            if j.head_pos < before:
                wraps += 1
            since_ckpt.append(j.head_pos)
            wrapped_since = any(b < a for a, b in zip(since_ckpt, since_ckpt[1:]))
            if wraps >= 2 and wrapped_since and len(since_ckpt) > 10:
                break
            if j.used > j.log_size // 2:
                await _checkpoint(o, home)
                since_ckpt = [j.head_pos]
        live = canonical(o.md)
        head_seq = j.pending_seq
    o = reopen(o)
    try:
        assert canonical(o.md) == live
        assert o.result.head_seq == head_seq
        assert o.result.batches == len(since_ckpt) - 1
        for dblock, data in home.items():
            assert read_blocks(fs_image, dblock, nblocks) == data
    finally:
        o.close()
    batches = scan(fs_image)
    assert [b.seq for b in batches] == list(range(head_seq - len(batches), head_seq))
    assert any(b.pos < a.pos for a, b in zip(batches, batches[1:]))  # spans the wrap
    # what follows the head is a batch of an earlier lap: valid, but stale
    dev = Device.open(fs_image, readonly=True)
    try:
        sb = read_superblock(dev)
        raw = dev.read_sync(sb.log_offset + batches[-1].end, BS).bytes()
    finally:
        dev.close()
    stale = fmt.BatchHeader.unpack(raw)
    assert stale is not None and stale.seq < batches[0].seq


async def test_a_full_log_holds_batches_until_a_checkpoint_frees_space(fs_image: str
                                                                       ) -> None:
    """Ordinary batches may fill the log up to the reserve kept for a checkpoint; the next
    one waits (asking for a checkpoint) and goes out as soon as a checkpoint moves the
    tail."""
    o = open_fs(fs_image)
    j = o.journal
    nblocks = 256  # 1 MiB per batch
    f = create_file(o.md, b"f")
    d, _ = o.alloc.allocate(nblocks)
    o.md.map_extent(f, 0, d, nblocks)
    async with running(j):
        snapshot, seq, latest = b"", 0, b""
        while j.used + BS + nblocks * BS <= j.log_size - j.reserve:
            data = pattern(j.pending_seq, nblocks * BS)
            j.append_data(f.ino, 0, 0, d, payload(data), nblocks)
            await j.commit()
            snapshot, seq, latest = o.md.serialize(), j.durable_seq, data
        assert o.checkpointer.want_checkpoint.is_set()
        head = j.head_pos
        last = pattern(99, nblocks * BS)
        j.append_data(f.ino, 0, 0, d, payload(last), nblocks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(j.commit)
            await trio.testing.wait_all_tasks_blocked()
            assert placing(j)
            # placement happens before any I/O, so an unchanged head means it waits
            assert j.head_pos == head and j.durable_seq == seq
            await o.dev.writev(d * BS, [(payload(latest), 0, nblocks * BS)], "data")
            await o.dev.flush()
            with trio.fail_after(10):
                await o.checkpointer.write_checkpoint(snapshot, seq, o.md.next_ino)
        assert j.durable_seq == seq + 1
        check_space(o)
    o = reopen(o)
    try:
        assert o.result.batches == 1
        assert read_blocks(fs_image, d, nblocks) == last
    finally:
        o.close()


async def test_records_after_the_checkpoint_seal_stay_in_the_log(fs_image: str) -> None:
    """Between sealing the checkpoint boundary and the writer taking that batch, other
    tasks keep changing metadata and logging data. None of it is in the snapshot, so none
    of it may go into the boundary batch, whose log space the checkpoint reclaims."""
    o = open_fs(fs_image)
    j, md = o.journal, o.md
    async with running(j):
        f = create_file(md, b"f")
        d, _ = o.alloc.allocate(2)
        md.map_extent(f, 0, d, 1)
        await j.commit()
        md.set_xattr(f, b"user.before", b"1")  # the boundary batch is not empty
        boundary = o.checkpointer.seal_for_checkpoint()
        snapshot = md.serialize()
        runs = j.resident_runs(boundary)
        # a buffered write extends the file (size logged by flush_dirty), another task
        # maps a block and logs its data, a third sets an xattr
        f.size = 2 * BS
        md.mark_dirty(f)
        md.map_extent(f, 1, d + 1, 1)
        data = pattern(7, BS)
        j.append_data(f.ino, 0, 1, d + 1, payload(data), 1)
        md.data_written(f, 2 * BS)
        md.set_xattr(f, b"user.after", b"1")
        await j.commit(boundary)
        await j.commit()  # an fsync of f: everything above is durable now
        assert runs == []  # nothing resident at the seal: nothing to write home
        await o.checkpointer.write_checkpoint(snapshot, boundary, md.next_ino)
        # the data logged after the seal is still only in the log
        assert j.is_resident(f.ino, 0)
        live = canonical(md)
    o = reopen(o)
    try:
        assert canonical(o.md) == live
        g = o.md.inodes[f.ino]
        assert g.size == 2 * BS and b"user.after" in g.xattrs
        assert read_blocks(fs_image, d + 1, 1) == data
    finally:
        o.close()


async def test_a_sealed_boundary_is_committed_like_any_batch(fs_image: str) -> None:
    """Sealing takes the pending batch out of reach at once: later records go into the
    next batch, and a commit (an fsync) right after the seal waits for the sealed batch
    instead of for the empty one after it."""
    o = open_fs(fs_image)
    j = o.journal
    async with running(j):
        create_file(o.md, b"a")
        boundary = o.checkpointer.seal_for_checkpoint()
        assert boundary == 1 and j.pending_seq == 2
        assert j.has_pending()
        with trio.fail_after(10):
            await j.commit()
        assert j.durable_seq == 1 and not j.has_pending()
        create_file(o.md, b"b")
        boundary = o.checkpointer.seal_for_checkpoint()
        create_file(o.md, b"c")  # after the seal: batch 3
        with trio.fail_after(10):
            await j.commit(boundary)
        assert j.durable_seq == 2
        with trio.fail_after(10):
            await j.commit()
        assert j.durable_seq == 3
    batches = scan(o)
    o.close()
    created = [[r.args[1] for r in b.records if r.rtype == fmt.REC_DIRENT_ADD]
               for b in batches]
    assert created == [[b"a"], [b"b"], [b"c"]]


async def test_checkpoint_while_a_batch_waits_for_log_space(fs_image: str) -> None:
    """A checkpoint sealed while a batch waits for log space covers that batch, so the
    batch must be let into the reserve: otherwise each waits for the other for ever."""
    o = open_fs(fs_image)
    j = o.journal
    nblocks = 256
    f = create_file(o.md, b"f")
    d, _ = o.alloc.allocate(nblocks)
    o.md.map_extent(f, 0, d, nblocks)
    async with running(j):
        while j.used + BS + nblocks * BS <= j.log_size - j.reserve:
            j.append_data(f.ino, 0, 0, d, payload(pattern(1, nblocks * BS)), nblocks)
            await j.commit()
        last = pattern(2, nblocks * BS)
        j.append_data(f.ino, 0, 0, d, payload(last), nblocks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(j.commit)
            await trio.testing.wait_all_tasks_blocked()
            assert placing(j)
            o.md.set_xattr(f, b"user.x", b"1")  # the checkpoint seals a non-empty batch
            with trio.move_on_after(2) as scope:
                await _checkpoint(o, {d: last})
            nursery.cancel_scope.cancel()
    o.close()
    assert not scope.cancelled_caught, "the checkpoint never finished"


def created(path: str) -> list[list[bytes]]:
    """The names each valid batch of the log adds, batch by batch."""
    return [[r.args[1] for r in b.records if r.rtype == fmt.REC_DIRENT_ADD]
            for b in scan(path)]


async def test_a_lone_commit_writes_its_batch_in_its_own_task(fs_image: str) -> None:
    """With nothing in flight a commit seals and writes the pending batch itself: it needs
    no writer task (none runs here), only the device's completions."""
    o = open_fs(fs_image)
    j = o.journal
    async with reaped(o, writer=False):
        create_file(o.md, b"a")
        with trio.fail_after(10):
            await j.commit()
        assert j.durable_seq == 1 and not j.has_pending()
        create_file(o.md, b"b")
        with trio.fail_after(10):
            await j.commit()
        assert j.durable_seq == 2
    assert created(fs_image) == [[b"a"], [b"b"]]


async def test_commits_arriving_during_a_write_share_the_next_batch(fs_image: str) -> None:
    """Group commit: while one batch is in flight (a slow device holds it), three more
    commits gather in the pending batch, and one of them writes it for all."""
    o = open_fs(fs_image, options=DeviceOptions(delay_s=0.2))
    j = o.journal
    async with reaped(o):
        create_file(o.md, b"a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(j.commit)
            await trio.testing.wait_all_tasks_blocked()
            assert j._sealed and j.durable_seq == 0  # batch 1 in flight
            for name in (b"b", b"c", b"d"):
                create_file(o.md, name)
                nursery.start_soon(j.commit)
            await trio.testing.wait_all_tasks_blocked()
            assert j._followers == 3
        assert j.durable_seq == 2 and o.journal.counters.log_batches == 2
    assert created(fs_image) == [[b"a"], [b"b", b"c", b"d"]]


async def test_a_cancelled_commit_still_writes_the_batch_it_sealed(fs_image: str) -> None:
    """The batch a commit sealed is written even if that commit is cancelled meanwhile:
    batches become durable in order, and the next one must not wait for ever."""
    o = open_fs(fs_image, options=DeviceOptions(delay_s=0.2))
    j = o.journal
    async with reaped(o):
        create_file(o.md, b"a")
        with trio.move_on_after(0.05):
            await j.commit()
        assert j.durable_seq == 1 and not j._sealed
        create_file(o.md, b"b")
        with trio.fail_after(10):
            await j.commit()
        assert j.durable_seq == 2
    assert created(fs_image) == [[b"a"], [b"b"]]


async def test_a_cancelled_follower_leaves_its_batch_to_the_writer(fs_image: str) -> None:
    """A commit waiting for the batch in flight, to write the next, is cancelled: the
    writer writes the next batch instead (nobody else would until the commit interval)."""
    o = open_fs(fs_image, options=DeviceOptions(delay_s=0.2))
    j = o.journal
    async with reaped(o):
        create_file(o.md, b"a")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(j.commit)
            await trio.testing.wait_all_tasks_blocked()
            create_file(o.md, b"b")
            with trio.move_on_after(0.05):
                await j.commit()
            assert j._followers == 0
        with trio.fail_after(10):
            await j._batch(2).done.wait()  # written by the writer task
        assert j.durable_seq == 2
    assert created(fs_image) == [[b"a"], [b"b"]]


@pytest.mark.daemon_log(allow=[r"^log write of batch 1 failed: .*Input/output error"])
async def test_a_failed_log_write_is_rewritten_in_place(tmp_path: Path) -> None:
    path = str(tmp_path / "fs.img")
    mkfs(path, size=fmt.MIN_SIZE)
    o = open_fs(path)
    o.dev.set_inject(parse_inject("log:1"))
    j = o.journal
    async with running(j):
        create_file(o.md, b"a")
        with pytest.raises(LogFailed):
            await j.commit()  # the commit that saw the failure reports it
        assert j.failed is None and j.durable_seq == 0
        with trio.fail_after(10):
            await j.commit()  # the next one rewrites the batch at its place
        assert j.durable_seq == 1
    o = reopen(o)
    try:
        assert names(o) == {b"a"} and o.result.batches == 1
    finally:
        o.close()


@pytest.mark.daemon_log(allow=[r"^log (re)?write of batch 1 failed: .*Input/output error",
                               r"^the log cannot be written, the filesystem stops"])
async def test_a_log_that_keeps_failing_stops_all_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "fs.img")
    mkfs(path, size=fmt.MIN_SIZE)
    o = open_fs(path)
    o.dev.set_inject(parse_inject("log"))
    j = o.journal
    async with running(j):
        f = create_file(o.md, b"f")
        for _ in range(10):
            with trio.fail_after(10), pytest.raises(LogFailed):
                await j.commit()
            if j.failed is not None:
                break
        assert j.failed is not None and j.durable_seq == 0
        with pytest.raises(LogFailed):
            await j.commit()
        with pytest.raises(LogFailed):
            j.append_data(f.ino, 0, 0, 5000, payload(bytes(BS)), 1)
    o.close()
    # nothing of the failed batch is on the log
    assert scan(path) == []
