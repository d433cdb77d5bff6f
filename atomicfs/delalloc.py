"""Delayed allocation: space reserved for dirty blocks that have no device block yet, and
its conversion into extents when writeback gives them one.

A buffered write into a hole reserves one block of the allocator per new dirty block (and
marks the folio's `reserved` bit) before it copies anything, so that ENOSPC is reported by
write(2) and never by writeback. Writeback converts reservations when it allocates homes;
a failed write gives the blocks back and reserves them again; truncate, unlink and a
writeback given up release them. This module is the only one that changes either side,
and `check` holds the invariant between them:

    allocator's reserved blocks == reserved bits of all cached folios
"""
from __future__ import annotations

from atomicfs.alloc import Allocator
from atomicfs.errors import NoSpace
from atomicfs.metadata import ExtentMap, Inode, Metadata
from atomicfs.pagecache import Folio, Mapping, PageCache, mask_range, mask_runs, popcount

Home = tuple[int, int, int]  # file block, device block, count


def extents_of(inode: Inode) -> ExtentMap:
    """The extent map of a regular file (what every data path works on)."""
    if inode.extents is None:
        raise TypeError(f"inode {inode.ino} is not a regular file")
    return inode.extents


class Delalloc:
    """Reservations of dirty blocks and their conversion to extents."""

    def __init__(self, alloc: Allocator, md: Metadata, cache: PageCache,
                 debug: bool = False) -> None:
        self.alloc = alloc
        self.md = md
        self.cache = cache
        self.debug = debug  # check the invariant after every change (O(cached folios))

    # ------------------------------------------------------------- reservations

    def reserve_for_write(self, inode: Inode, items: list[tuple[Folio, int]]) -> None:
        """Reserve space for blocks about to become dirty that have no device block.
        NoSpace changes nothing."""
        need: list[tuple[Folio, int]] = []
        total = 0
        for folio, mask in items:
            new = mask & ~folio.reserved & ~folio.dirty
            if not new:
                continue
            unmapped = 0
            for b, n in mask_runs(new):
                for f, d, k in extents_of(inode).runs(folio.fblock + b, n):
                    if d is None:
                        unmapped |= mask_range(f - folio.fblock, k)
            if unmapped:
                need.append((folio, unmapped))
                total += popcount(unmapped)
        if total:
            # extents mapped by writeback since the last estimate have grown the snapshot
            self.alloc.set_snapshot_estimate(self.md.snapshot_bytes, self.md.block_size)
            self.alloc.reserve(total)  # NoSpace propagates: nothing has changed yet
            for folio, mask in need:
                self.cache.reserve_blocks(folio, mask)
        self._debug_check()

    def release(self, folio: Folio, mask: int) -> None:
        """The blocks' data is gone or given up: their reservations go back."""
        self.alloc.unreserve(self.cache.unreserve_blocks(folio, mask))
        self._debug_check()

    def discard(self, folio: Folio, mask: int) -> None:
        """Truncate: the blocks are discarded from the folio, their reservations released."""
        self.alloc.unreserve(self.cache.discard_blocks(folio, mask))
        self._debug_check()

    def release_mapping(self, m: Mapping) -> None:
        """The file is gone: every reservation of its folios goes back."""
        released = sum(self.cache.unreserve_blocks(f, f.reserved) for f in m.folios.values())
        self.alloc.unreserve(released)
        self._debug_check()

    def reserve_again(self, m: Mapping, fblock: int, count: int) -> None:
        """A write into fresh blocks failed: they are free again (the caller freed them),
        their data dirty and reserved again."""
        self.alloc.reserve_again(count)
        bpf = m.blocks_per_folio
        for fb in range(fblock, fblock + count):
            folio = m.folios.get(fb // bpf)
            if folio is not None:
                self.cache.reserve_blocks(folio, 1 << (fb % bpf))
        self._debug_check()

    # --------------------------------------------------------------- conversion

    def allocate_run(self, folio: Folio, fb: int, count: int, goal: int) -> tuple[int, int]:
        """Device blocks for a hole of the folio from block fb, up to count of them, as
        one extent (in-place writeback). Converts the reservations of what it got.
        Returns (device block, blocks got); NoSpace changes nothing."""
        part = mask_range(fb, count)
        start, got = self.alloc.allocate(count, goal=goal, min_len=1,
                                         reserved=popcount(folio.reserved & part))
        self.alloc.unreserve(self.cache.unreserve_blocks(folio, mask_range(fb, got)))
        self._debug_check()
        return start, got

    def allocate_units(self, members: list[Folio], nb: int, goal: int) -> int:
        """One extent of nb blocks aligned to nb for whole consecutive units (hardware
        path: a unit that has to move). Converts every reservation of the members; their
        bits are kept in `undo_units`' argument. NoSpace changes nothing."""
        reserved = sum(popcount(f.reserved) for f in members)
        dblock, _ = self.alloc.allocate(nb, goal=goal, align=nb, min_len=nb,
                                        reserved=reserved)
        self.alloc.unreserve(reserved)
        for f in members:
            self.cache.unreserve_blocks(f, f.reserved)
        self._debug_check()
        return dblock

    def undo_units(self, members: list[Folio], old_reserved: list[int], dblock: int,
                   nb: int) -> None:
        """The write of units to a new extent failed: free it, reserve the blocks again."""
        self.alloc.free_now(dblock, nb)
        self.alloc.reserve_again(sum(popcount(r) for r in old_reserved))
        for f, r in zip(members, old_reserved):
            self.cache.reserve_blocks(f, r)
        self._debug_check()

    def homes_for(self, inode: Inode, folio: Folio, mask: int) -> list[Home]:
        """Device blocks for the holes among the blocks about to be logged, all or none
        (NoSpace changes nothing). A whole unit gets a unit-aligned extent when there is
        one, for later hardware writes. Converts the reservations of the holes."""
        holes = [(f, k) for b, n in mask_runs(mask)
                 for f, d, k in extents_of(inode).runs(folio.fblock + b, n) if d is None]
        if not holes:
            return []
        nb = folio.mapping.blocks_per_folio
        aligned = folio.atomic and holes == [(folio.fblock, nb)]
        hole_mask = sum(mask_range(f - folio.fblock, k) for f, k in holes)
        reserved = popcount(folio.reserved & hole_mask)
        homes: list[Home] = []
        try:
            for fblock, count in holes:
                done = 0
                if aligned:
                    try:
                        start, _ = self.alloc.allocate(nb, align=nb, reserved=reserved)
                        homes.append((fblock, start, nb))
                        done = nb
                    except NoSpace:
                        pass
                while done < count:
                    start, got = self.alloc.allocate(count - done, min_len=1,
                                                     reserved=reserved)
                    homes.append((fblock + done, start, got))
                    done += got
        except NoSpace:
            for _, start, got in homes:
                self.alloc.free_now(start, got)
            raise
        self.alloc.unreserve(self.cache.unreserve_blocks(folio, hole_mask))
        self._debug_check()
        return homes

    def undo_homes(self, folio: Folio, homes: list[Home], old_reserved: int) -> None:
        """Homes from `homes_for` that will not be used: free them, and the folio's
        reservations as they were before."""
        for _, dblock, count in homes:
            self.alloc.free_now(dblock, count)
        again = old_reserved & ~folio.reserved
        self.alloc.reserve_again(popcount(again))
        self.cache.reserve_blocks(folio, again)
        self._debug_check()

    # ---------------------------------------------------------------- invariant

    @staticmethod
    def reserved_in(m: Mapping | None) -> int:
        """Blocks of one file's dirty data not yet allocated (the mapping's count)."""
        return m.reserved_blocks if m is not None else 0

    def reserved_bits(self) -> int:
        """Reserved bits of all cached folios, counted folio by folio."""
        return sum(popcount(f.reserved) for m in self.cache.mappings.values()
                   for f in m.folios.values())

    def check(self) -> None:
        """The allocator's reserved blocks are exactly the reserved bits of the cached
        folios (no reservation leaked or counted twice), and each mapping's count of them
        is right."""
        held = self.alloc.reserved_data_blocks
        bits = self.reserved_bits()
        if held != bits:
            raise AssertionError(f"delalloc: allocator holds {held} reserved blocks, "
                                 f"folios {bits}")
        for m in self.cache.mappings.values():
            counted = sum(popcount(f.reserved) for f in m.folios.values())
            if m.reserved_blocks != counted:
                raise AssertionError(f"delalloc: inode {m.ino} counts {m.reserved_blocks} "
                                     f"reserved blocks, its folios hold {counted}")

    def _debug_check(self) -> None:
        if self.debug:
            self.check()
