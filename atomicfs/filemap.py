"""The generic buffered read, write and truncate paths (the role of mm/filemap.c and
iomap's buffered-io.c): which blocks to read, wait for, copy and mark.

A buffered write is `write_begin` (throttle, get the folios ready: wait for locks and
stable writeback, send out pending write groups, read partial blocks, reserve space for
new blocks) and then `write_end` (copy, mark dirty, tag atomic units and write groups,
update size and times), with no await between the last check of the first and the copy
of the second. A write-through then hands the blocks just copied to writeback.

Requests flow down only: this module calls the page cache (state), delalloc (space),
the flusher (throttling), writeback (write-through, write groups) and the device (reads);
none of them calls back up.
"""
from __future__ import annotations

import errno
import time

from atomicfs.delalloc import Delalloc, extents_of
from atomicfs.device import Device
from atomicfs.errors import DeviceError
from atomicfs.flusher import Flusher
from atomicfs.metadata import Inode, Metadata
from atomicfs.native import MAX_IOV, Buffer, Segment, copy_into, ffi
from atomicfs.pagecache import (MAX_GROUP_BYTES, Folio, InvalidTransition, Mapping,
                                PageCache, mask_range, mask_runs)
from atomicfs.stats import Counters
from atomicfs.writeback import Writeback

READAHEAD_MIN = 128 << 10
READAHEAD_MAX = 1 << 20
# Reads of at least this size (the kernel's readahead requests) skip the cache: the kernel
# keeps the data, a second copy here costs a folio buffer, zeroing and a copy per 64 KiB.
UNCACHED_READ_MIN = 128 << 10


class ReplyBuffers:
    """Aligned buffers for uncached reads, each reused once the reply made from it is gone
    (pyfuse3 drops the returned view after writing the reply): no allocation, page faults
    or zeroing of a fresh megabyte per read."""

    KEEP = 4  # free buffers kept per size

    def __init__(self, align: int) -> None:
        self.align = align
        self._free: dict[int, list[Buffer]] = {}

    def get(self, n: int) -> tuple[Buffer, memoryview]:
        """A buffer of at least n bytes (its old content is garbage: the caller writes
        every byte it returns) and a view of it that gives the buffer back when dropped."""
        size = max(n, 64 << 10)
        size = 1 << (size - 1).bit_length()
        free = self._free.setdefault(size, [])
        buf = free.pop() if free else Buffer(size, self.align)

        def release(_: object, buf: Buffer = buf, free: list[Buffer] = free) -> None:
            if len(free) < self.KEEP:
                free.append(buf)

        owner = ffi.gc(ffi.cast("char *", buf.ptr), release)
        return buf, memoryview(ffi.buffer(owner, n))


class FileMap:
    """Buffered file I/O over the page cache."""

    def __init__(self, dev: Device, md: Metadata, cache: PageCache, delalloc: Delalloc,
                 flusher: Flusher, wb: Writeback, counters: Counters) -> None:
        self.dev = dev  # a read-only mount reads through the log overlay instead
        self.md = md
        self.cache = cache
        self.delalloc = delalloc
        self.flusher = flusher
        self.wb = wb
        self.counters = counters
        self.bs = cache.block_size
        self._replies = ReplyBuffers(cache.align)

    # --------------------------------------------------------------------- pins

    def _pinned_folio(self, m: Mapping, index: int, pinned: dict[int, Folio],
                      nblocks: int | None = None, zeroed: bool = True) -> Folio:
        folio = pinned.get(index)
        if folio is None:
            folio = self.cache.get_folio(m, index, nblocks, zeroed)
            self.cache.pin(folio)
            pinned[index] = folio
        return folio

    def _unpin_all(self, pinned: dict[int, Folio]) -> None:
        for folio in pinned.values():
            self.cache.unpin(folio)
        pinned.clear()

    # --------------------------------------------------------------------- reads

    async def read_folios(self, inode: Inode, needs: list[tuple[Folio, int]]) -> None:
        """Fill the blocks in each mask from the device (holes read as zeros)."""
        bs = self.bs
        cache = self.cache
        locked: list[tuple[Folio, int]] = []
        for folio, mask in needs:
            if folio.locked:
                continue  # somebody else fills it; the caller looks again
            cache.lock(folio)
            locked.append((folio, mask & ~folio.uptodate & ~folio.dirty))
        try:
            ios: list[tuple[int, list[Segment], list[tuple[Folio, int]]]] = []
            for folio, mask in locked:
                for b, n in mask_runs(mask):
                    for f, d, k in extents_of(inode).runs(folio.fblock + b, n):
                        fb = f - folio.fblock
                        part = mask_range(fb, k)
                        if d is None:
                            folio.buf.zero(fb * bs, k * bs)
                            cache.mark_uptodate(folio, part)
                            continue
                        seg: Segment = (folio.buf, fb * bs, k * bs)
                        last = ios[-1] if ios else None
                        if last is not None and last[0] + sum(x[2] for x in last[1]) // bs == d \
                                and len(last[1]) < MAX_IOV:
                            last[1].append(seg)
                            last[2].append((folio, part))
                        else:
                            ios.append((d, [seg], [(folio, part)]))
            for dblock, segments, parts in ios:
                try:
                    await self.dev.readv(dblock * bs, segments)
                except DeviceError as exc:
                    raise OSError(errno.EIO, f"read error: {exc}") from exc
                for folio, part in parts:
                    cache.mark_uptodate(folio, part & ~folio.dirty)
        finally:
            for folio, _ in locked:
                cache.unlock(folio)

    async def read(self, inode: Inode, m: Mapping, off: int,
                   size: int) -> bytes | bytearray | memoryview:
        """Read up to size bytes at off, from the cache, reading missing blocks first."""
        end = min(off + size, inode.size)
        if off >= end:
            return b""
        fs = m.folio_size
        bs = self.bs
        first, last = off // fs, (end - 1) // fs
        ra_end = max(end, self._readahead_end(m, inode, off, end))
        pinned: dict[int, Folio] = {}
        try:
            while True:
                needs: list[tuple[Folio, int]] = []
                waited = False
                for index in range(first, (ra_end - 1) // fs + 1):
                    lo = max(off, index * fs) - index * fs
                    hi = min(ra_end, (index + 1) * fs) - index * fs
                    nblocks = (hi + bs - 1) // bs
                    folio = self._pinned_folio(m, index, pinned, nblocks)
                    if folio.locked or not self.cache.fit(folio, nblocks):
                        if index <= last:
                            await self.cache.wait_folio(folio)
                            waited = True
                            break
                        continue
                    want = mask_range(lo // bs, (hi + bs - 1) // bs - lo // bs)
                    missing = want & ~folio.uptodate & ~folio.dirty
                    if missing:
                        needs.append((folio, missing))
                if waited:
                    continue
                if not needs:
                    break
                await self.read_folios(inode, needs)
            end = min(end, inode.size)  # a truncate may have raced with the read
            if off >= end:
                return b""
            if (end - 1) // fs == first:
                return pinned[first].buf.view(off - first * fs, end - off)
            out = bytearray(end - off)
            pos = off
            while pos < end:
                index = pos // fs
                start = pos - index * fs
                n = min(end - pos, fs - start)
                copy_into(out, pos - off, pinned[index].buf, start, n)
                pos += n
            return out
        finally:
            self._unpin_all(pinned)

    async def read_uncached(self, inode: Inode, m: Mapping, off: int,
                            size: int) -> bytes | bytearray | memoryview:
        """Read up to size bytes at off without filling the cache (O_DIRECT, and large
        reads whose data the kernel caches anyway): blocks the cache holds are copied from
        it, the rest come from the device straight into the reply buffer (one read per
        extent, holes zeroed). Falls back to `read` when the file's mapping changed or a
        cached block went away while the device read was in flight, so no block read from
        a freed home is ever returned."""
        end = min(off + size, inode.size)
        if off >= end:
            return b""
        bs = self.bs
        b0, b1 = off // bs, (end + bs - 1) // bs
        n = b1 - b0
        held = self._held_blocks(m, b0, n)
        runs = list(extents_of(inode).runs(b0, n))
        buf, reply = self._replies.get(n * bs)
        ios: list[tuple[int, int, int]] = []  # device block, block in buf, count
        for f, d, k in runs:
            rel = f - b0
            for r, c in mask_runs(~held >> rel & mask_range(0, k)):
                if d is None:
                    buf.zero((rel + r) * bs, c * bs)
                elif ios and ios[-1][0] + ios[-1][2] == d + r and \
                        ios[-1][1] + ios[-1][2] == rel + r:
                    ios[-1] = (ios[-1][0], ios[-1][1], ios[-1][2] + c)
                else:
                    ios.append((d + r, rel + r, c))
        for dblock, at, c in ios:
            try:
                await self.dev.readv(dblock * bs, [(buf, at * bs, c * bs)])
            except DeviceError as exc:
                raise OSError(errno.EIO, f"read error: {exc}") from exc
        if ios:
            # From here to the return nothing awaits: the reply is this instant's data.
            now = self._held_blocks(m, b0, n)
            if held & ~now or list(extents_of(inode).runs(b0, n)) != runs:
                return await self.read(inode, m, off, size)
            held = now
            end = min(end, inode.size)  # a truncate may have raced with the read
            if off >= end:
                return b""
        self._copy_held(m, b0, held, buf)
        return reply[off - b0 * bs: end - b0 * bs]

    @staticmethod
    def _held_blocks(m: Mapping, b0: int, n: int) -> int:
        """Mask (bit i: file block b0+i) of the blocks the cache holds valid data for."""
        bpf = m.blocks_per_folio
        held = 0
        for index in range(b0 // bpf, (b0 + n - 1) // bpf + 1):
            folio = m.folios.get(index)
            if folio is None:
                continue
            valid = folio.uptodate | folio.dirty
            shift = index * bpf - b0
            held |= valid << shift if shift >= 0 else valid >> -shift
        return held & mask_range(0, n)

    def _copy_held(self, m: Mapping, b0: int, held: int, buf: Buffer) -> None:
        """Copy the held blocks (mask from `_held_blocks`) from their folios into buf."""
        bs = self.bs
        bpf = m.blocks_per_folio
        for r, c in mask_runs(held):
            b = b0 + r
            while c:
                folio = m.folios[b // bpf]
                i = b - folio.fblock
                k = min(c, bpf - i)
                buf.copy_from((b - b0) * bs, folio.buf, i * bs, k * bs)
                b += k
                c -= k

    @staticmethod
    def _readahead_end(m: Mapping, inode: Inode, off: int, end: int) -> int:
        """Sequential reads grow a readahead window (up to 1 MiB); others reset it."""
        if off == m.ra_next:
            m.ra_window = min(max(2 * m.ra_window, READAHEAD_MIN), READAHEAD_MAX)
        else:
            m.ra_window = 0
        m.ra_next = end
        return min(inode.size, end + m.ra_window)

    # -------------------------------------------------------------------- writes

    async def write(self, inode: Inode, m: Mapping, off: int, data: bytes,
                    writethrough: bool = False, strict: bool = False,
                    now: int | None = None, atomic: bool = False, durable: bool = True
                    ) -> int:
        """Copy data into the cache at off; the generic buffered write (or write-through,
        durable or not: see Writeback.write_through). atomic: the writer asked for this
        whole write to be untorn (RWF_ATOMIC). NoSpace when no space can be reserved
        (nothing has changed then)."""
        n = len(data)
        if n == 0:
            return 0
        fs = m.folio_size
        end = off + n
        if strict and m.atomic and (off % fs or end % fs):
            self.counters.atomic_strict_rejected += 1
            raise OSError(errno.EINVAL, "write not aligned to the atomic unit")
        # One whole unit is the folio's own atomic tag; several whole units, or an
        # announced atomic write of any shape, are a write group: at most what FUSE sends
        # in one request, so that a group always fits in one log batch.
        whole_units = m.atomic and off % fs == 0 and end % fs == 0
        grouped = ((atomic and not (whole_units and n == fs)) or (whole_units and n > fs)) \
            and n <= MAX_GROUP_BYTES
        await self.flusher.balance_dirty()
        pinned: dict[int, Folio] = {}
        if writethrough:
            m.writethrough_begin()
        try:
            items = await self.write_begin(inode, m, off, end, pinned, grouped)
            size_grew = self.write_end(inode, m, items, off, data, grouped, now)
            if writethrough:
                await self.wb.write_through(inode, m, items, size_grew, durable)
        finally:
            if writethrough:
                m.writethrough_end()
            self._unpin_all(pinned)
            self.cache.trim()
        return n

    async def write_begin(self, inode: Inode, m: Mapping, off: int, end: int,
                          pinned: dict[int, Folio], grouped: bool = False
                          ) -> list[tuple[Folio, int]]:
        """Get the folios of [off, end) ready for copying: wait for locks and stable
        writeback, send out pending write groups they belong to, read partial blocks, and
        reserve space for blocks that have none (NoSpace changes nothing). Returns
        (folio, mask of blocks written); nothing awaits after the last check, and the
        caller calls write_end without awaiting either (new folios it covers whole are
        not zeroed)."""
        fs = m.folio_size
        bs = self.bs
        cache = self.cache
        first, last = off // fs, (end - 1) // fs
        # New folios this write covers whole get a spare buffer as it is, not zeroed
        # first: write_end overwrites all of it. Until then nothing else may see the old
        # bytes: they are zeroed before any await and on any error.
        fresh: list[Folio] = []
        try:
            while True:
                items: list[tuple[Folio, int]] = []
                needs: list[tuple[Folio, int]] = []
                waited = False
                for index in range(first, last + 1):
                    base = index * fs
                    lo = max(off, base) - base
                    hi = min(end, base + fs) - base
                    b0, b1 = lo // bs, (hi + bs - 1) // bs
                    if lo == 0 and hi == fs and index not in pinned and \
                            index not in m.folios:
                        folio = self._pinned_folio(m, index, pinned, b1, zeroed=False)
                        fresh.append(folio)
                    else:
                        folio = self._pinned_folio(m, index, pinned, b1)
                    # A write that makes the folio atomic must not change it under a
                    # writeback that started before (an in-place one would send part of
                    # it out torn).
                    becomes_atomic = grouped or (m.atomic and off <= base and end >= base + fs)
                    if m.must_wait(folio) or (becomes_atomic and folio.writeback) or \
                            not cache.fit(folio, b1):
                        self._zero_fresh(fresh)
                        await cache.wait_folio(folio)
                        waited = True
                        break
                    if folio.group is not None:
                        # An earlier write group must not be torn by this write: it goes
                        # into the log first, whole, so no crash shows this write without
                        # it.
                        self._zero_fresh(fresh)
                        await self.wb.write_group(inode, m, folio.group)
                        waited = True
                        break
                    items.append((folio, mask_range(b0, b1 - b0)))
                    partial = (1 << b0 if lo % bs else 0) | (1 << (b1 - 1) if hi % bs else 0)
                    partial &= ~folio.uptodate & ~folio.dirty
                    for b, _ in mask_runs(partial):
                        if base + b * bs >= inode.size:
                            # nothing on the device beyond EOF: the (zeroed) block is valid
                            partial &= ~(1 << b)
                            cache.mark_uptodate(folio, 1 << b)
                    if partial:
                        needs.append((folio, partial))
                if waited:
                    continue
                if not needs:
                    break
                self._zero_fresh(fresh)
                await self.read_folios(inode, needs)
            self.delalloc.reserve_for_write(inode, items)
        except BaseException:
            self._zero_fresh(fresh)
            raise
        return items

    @staticmethod
    def _zero_fresh(fresh: list[Folio]) -> None:
        """The new folios of write_begin that are not zeroed yet will be seen (an await,
        an error) before write_end has overwritten them: zero them now."""
        for folio in fresh:
            folio.buf.zero()
        fresh.clear()

    def write_end(self, inode: Inode, m: Mapping, items: list[tuple[Folio, int]], off: int,
                  data: bytes, grouped: bool, now: int | None) -> bool:
        """Copy and mark; tag folios covered whole as atomic, clear the tag of others; make
        the folios one write group if asked; update size and times. Returns whether the
        file grew."""
        fs = m.folio_size
        end = off + len(data)
        cache = self.cache
        src = memoryview(data)
        for folio, mask in items:
            base = folio.index * fs
            lo = max(off, base)
            hi = min(end, base + fs)
            folio.buf.write(lo - base, src[lo - off: hi - off])
            cache.mark_uptodate(folio, mask)
            cache.mark_dirty(folio, mask)
            if m.atomic:
                if lo == base and hi == base + fs:
                    cache.set_atomic(folio)
                elif cache.clear_atomic(folio):
                    self.counters.atomic_cleared_partial += 1
        if grouped:
            cache.form_group([f for f, _ in items])
            self.counters.atomic_group_writes += 1
        size_grew = end > inode.size
        if size_grew:
            inode.size = end
        inode.mtime_ns = inode.ctime_ns = now if now is not None else time.time_ns()
        self.md.mark_dirty(inode, size_grew)  # logged with the next batch
        return size_grew

    # ------------------------------------------------------------------ truncate

    async def truncate(self, inode: Inode, m: Mapping, size: int) -> None:
        """Drop cached data beyond size (and its reservations) and zero the rest of the
        block holding the new EOF (in the cache, to be written back), so that a later
        extension reads zeros. The caller unmaps blocks and sets the size."""
        fs = m.folio_size
        bs = self.bs
        cache = self.cache
        while True:
            busy = [f for i, f in m.busy.items() if (i + 1) * fs > size]
            if not busy:
                break
            await cache.wait_folio(busy[0])
        full = mask_range(0, m.blocks_per_folio)
        for index, folio in sorted(m.folios.items()):
            if index * fs >= size:
                if folio.pins:  # a reader holds it: keep the object, drop its contents
                    cache.clear_logged(folio, folio.logged_seq)
                    self.delalloc.discard(folio, full)
                else:
                    self.delalloc.release(folio, folio.reserved)
                    cache.drop_folio(folio)
        if size % fs == 0:
            return
        index = size // fs
        start = size - index * fs
        first_gone = (start + bs - 1) // bs
        b = start // bs
        tail_mapped = start % bs and inode.extents is not None and \
            inode.extents.lookup(index * m.blocks_per_folio + b)[0] is not None
        last = m.folios.get(index)
        if last is None and not tail_mapped:
            return
        pinned: dict[int, Folio] = {}
        try:
            last = self._pinned_folio(m, index, pinned, first_gone)
            self.delalloc.discard(last, mask_range(first_gone, m.blocks_per_folio - first_gone))
            if not cache.fit(last, first_gone):  # it is idle: the wait above covered it
                raise InvalidTransition(f"cannot grow {last.state()}")
            if start % bs:
                if not (last.uptodate | last.dirty) >> b & 1:
                    await self.read_folios(inode, [(last, 1 << b)])
                while m.must_wait(last):
                    await cache.wait_folio(last)
                last.buf.zero(start, (b + 1) * bs - start)
                if tail_mapped or last.dirty >> b & 1:
                    cache.mark_dirty(last, 1 << b)  # the zeros must reach the device
        finally:
            self._unpin_all(pinned)
            cache.trim()

    async def drop_inode(self, inode: Inode) -> None:
        """The file is gone: wait for its I/O and requests, release its reservations,
        forget its folios."""
        m = self.cache.mappings.get(inode.ino)
        if m is None:
            return
        await self.cache.wait_unused(m)
        self.delalloc.release_mapping(m)
        self.cache.drop_mapping(inode.ino)
