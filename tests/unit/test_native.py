"""The C core: CRC32C, the free-space bitmap primitives and aligned buffers."""
from __future__ import annotations

import random

import pytest

from atomicfs import native
from atomicfs.native import Buffer, bitmap_count_set, bitmap_find, bitmap_set, crc32c

# ------------------------------------------------------------------------------ CRC32C


def _crc32c_reference(data: bytes, crc: int = 0) -> int:
    """Bitwise CRC32C (reflected polynomial 0x82F63B78), slow but obviously right."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("data, expected", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),  # the standard check value of CRC-32C
    (b"\x00" * 32, 0x8A9136AA),  # RFC 3720 (iSCSI) B.4 test vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
])
def test_crc32c_known_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


def test_crc32c_matches_reference_on_random_data() -> None:
    rng = random.Random(1)
    for n in (1, 7, 8, 63, 64, 65, 1000, 4096):
        data = rng.randbytes(n)
        assert crc32c(data) == _crc32c_reference(data)


def test_crc32c_chains() -> None:
    """crc32c(a + b) == crc32c(b, crc32c(a)) at every split point: the batch checksum is
    computed piecewise over header and payload buffers."""
    data = random.Random(2).randbytes(300)
    whole = crc32c(data)
    for cut in (0, 1, 5, 150, 299, 300):
        assert crc32c(data[cut:], crc32c(data[:cut])) == whole


def test_buffer_crc32c_matches_bytes_crc() -> None:
    buf = Buffer(8192)
    data = random.Random(3).randbytes(8192)
    buf.write(0, data)
    assert buf.crc32c() == crc32c(data)
    assert buf.crc32c(100, 1000) == crc32c(data[100:1100])
    assert buf.crc32c(1100, 7092, buf.crc32c(0, 1100)) == crc32c(data)


# ------------------------------------------------------------------------------ buffers


def test_buffer_is_aligned_and_zeroed() -> None:
    buf = Buffer(12288)
    assert int(native.ffi.cast("uintptr_t", buf.ptr)) % native.ALIGN == 0
    assert buf.is_zero()
    assert buf.bytes() == bytes(12288)


def test_buffer_write_copy_zero_is_zero() -> None:
    a = Buffer(4096)
    a.write(10, b"hello")
    assert a.bytes(8, 9) == b"\0\0hello\0\0"
    assert not a.is_zero()
    assert a.is_zero(0, 10) and a.is_zero(15)
    assert not a.is_zero(14, 1)

    b = Buffer(4096)
    b.copy_from(100, a, 10, 5)
    assert b.bytes(100, 5) == b"hello"
    assert b.is_zero(0, 100)

    a.zero(11, 2)
    assert a.bytes(10, 5) == b"h\0\0lo"
    a.zero()
    assert a.is_zero()


def test_buffer_is_zero_detects_every_single_byte() -> None:
    """is_zero compares the buffer with itself shifted; a non-zero byte anywhere (first,
    last, middle) must be seen."""
    buf = Buffer(1024)
    for pos in (0, 1, 511, 1022, 1023):
        buf.zero()
        buf.write(pos, b"\x01")
        assert not buf.is_zero(), pos
    buf.zero()
    assert buf.is_zero(0, 0)  # empty range
    assert buf.is_zero(0, 1)


def test_buffer_write_outside_raises() -> None:
    buf = Buffer(4096)
    with pytest.raises(ValueError):
        buf.write(4090, b"1234567")
    with pytest.raises(ValueError):
        buf.write(-1, b"x")
    assert buf.is_zero()


def test_copy_into_bytearray() -> None:
    src = Buffer(4096)
    src.write(0, b"abcdef")
    out = bytearray(10)
    native.copy_into(out, 2, src, 1, 4)
    assert bytes(out) == b"\0\0bcde\0\0\0\0"


def test_view_is_writable_window() -> None:
    buf = Buffer(4096)
    v = buf.view(4, 3)
    v[:] = b"xyz"
    assert buf.bytes(3, 5) == b"\0xyz\0"


# ----------------------------------------------------------------------------- bitmaps


def _bits(bm: bytearray, n: int) -> list[int]:
    return [(bm[i >> 3] >> (i & 7)) & 1 for i in range(n)]


def test_bitmap_set_and_count_across_byte_boundaries() -> None:
    rng = random.Random(4)
    n = 200
    for _ in range(300):
        bm = bytearray(n // 8 + 1)
        model = [0] * n
        for _ in range(6):
            start = rng.randrange(n)
            count = rng.randrange(n - start + 1)
            value = rng.random() < 0.6
            bitmap_set(bm, start, count, value)
            for i in range(start, start + count):
                model[i] = int(value)
        assert _bits(bm, n) == model
        start = rng.randrange(n)
        count = rng.randrange(n - start + 1)
        assert bitmap_count_set(bm, start, count) == sum(model[start:start + count])


def test_bitmap_set_zero_count_changes_nothing() -> None:
    bm = bytearray(4)
    bitmap_set(bm, 5, 0, True)
    assert bm == bytearray(4)


def _used(n: int, used: list[tuple[int, int]]) -> bytearray:
    bm = bytearray((n + 7) // 8)
    for s, c in used:
        bitmap_set(bm, s, c, True)
    return bm


def test_bitmap_find_first_fit_after_goal() -> None:
    bm = _used(64, [(0, 10), (12, 3), (20, 5)])
    assert bitmap_find(bm, 0, 64, 0, 2, 2, 1) == (10, 2)
    assert bitmap_find(bm, 0, 64, 0, 3, 3, 1) == (15, 3)  # 10..12 is too short
    assert bitmap_find(bm, 0, 64, 16, 3, 3, 1) == (16, 3)  # goal inside a free run
    assert bitmap_find(bm, 0, 64, 30, 4, 4, 1) == (30, 4)


def test_bitmap_find_wraps_around_to_lo() -> None:
    bm = _used(64, [(8, 56)])  # only 0..8 free
    assert bitmap_find(bm, 0, 64, 40, 4, 4, 1) == (0, 4)
    # with lo=2 the search never goes below lo
    assert bitmap_find(bm, 2, 64, 40, 4, 4, 1) == (2, 4)
    # a goal outside [lo, hi) starts at lo
    assert bitmap_find(bm, 2, 64, 100, 4, 4, 1) == (2, 4)


def test_bitmap_find_run_crossing_the_goal_on_the_second_pass() -> None:
    """A free run that starts before the goal and extends past it is found by the wrapped
    pass when nothing after the goal fits."""
    bm = _used(64, [(0, 4), (12, 52)])  # free: 4..12
    assert bitmap_find(bm, 0, 64, 10, 8, 8, 1) == (4, 8)


def test_bitmap_find_alignment() -> None:
    bm = _used(64, [(0, 5)])
    assert bitmap_find(bm, 0, 64, 0, 4, 4, 4) == (8, 4)
    assert bitmap_find(bm, 0, 64, 0, 8, 8, 8) == (8, 8)
    # the first free block is 5, but an aligned start must be free too: 4 is used
    bm = _used(64, [(0, 5), (9, 1)])
    assert bitmap_find(bm, 0, 64, 0, 4, 4, 4) == (12, 4)
    # alignment is absolute (device addresses), not relative to lo
    bm = bytearray(8)
    assert bitmap_find(bm, 3, 64, 0, 4, 4, 4) == (4, 4)


def test_bitmap_find_partial_longest_run_aligned_length() -> None:
    bm = _used(64, [(3, 1), (10, 1), (22, 42)])  # free: 0..3, 4..10, 11..22
    # no run of 16: the longest (11..22, 11 blocks) is returned
    assert bitmap_find(bm, 0, 64, 0, 16, 1, 1) == (11, 11)
    # aligned to 4: candidates start at 0 (3), 4 (6), 12 (10) -> 12, rounded down to 8
    assert bitmap_find(bm, 0, 64, 0, 16, 4, 4) == (12, 8)
    # nothing reaches min_len
    assert bitmap_find(bm, 0, 64, 0, 16, 12, 1) == (-1, 0)


def test_bitmap_find_full_and_edges() -> None:
    bm = _used(64, [(0, 64)])
    assert bitmap_find(bm, 0, 64, 0, 1, 1, 1) == (-1, 0)
    # the last block of the range, crossing no byte boundary
    bm = _used(64, [(0, 63)])
    assert bitmap_find(bm, 0, 64, 0, 1, 1, 1) == (63, 1)
    assert bitmap_find(bm, 0, 64, 0, 2, 2, 1) == (-1, 0)
    # bits past hi are clear but must never be handed out
    bm = _used(61, [(0, 58)])  # 61 blocks in 8 bytes: bits 61..63 exist and are clear
    assert bitmap_find(bm, 0, 61, 0, 4, 4, 1) == (-1, 0)
    assert bitmap_find(bm, 0, 61, 0, 4, 1, 1) == (58, 3)


def test_bitmap_find_random_against_model() -> None:
    """Check the documented contract on random bitmaps: a full-length answer is the first
    aligned position from the goal on (wrapping) where `want` free blocks start; otherwise
    the answer has the longest aligned run, rounded down to the alignment."""
    rng = random.Random(5)
    for _ in range(2000):
        n = rng.randrange(1, 150)
        lo = rng.randrange(n)
        hi = rng.randrange(lo + 1, n + 1)
        bm = bytearray((n + 7) // 8)
        free = [True] * n
        for i in range(n):
            if rng.random() < rng.choice((0.1, 0.5, 0.9)):
                bitmap_set(bm, i, 1, True)
                free[i] = False
        align = rng.choice((1, 1, 2, 4, 8))
        want = rng.randrange(1, 20)
        min_len = rng.choice((want, 1, align))
        min_len = min(min_len, want)
        goal = rng.randrange(0, n + 5)

        def run_at(p: int) -> int:
            k = 0
            while p + k < hi and free[p + k]:
                k += 1
            return k

        g = goal if lo <= goal < hi else lo
        order = list(range(g, hi)) + list(range(lo, g))
        aligned = [p for p in order if p % align == 0]
        full = [p for p in aligned if run_at(p) >= want]
        longest = max((run_at(p) for p in aligned), default=0)
        best = longest - longest % align
        start, count = bitmap_find(bm, lo, hi, goal, want, min_len, align)
        ctx = (n, lo, hi, goal, want, min_len, align, free)
        if full:
            assert (start, count) == (full[0], want), ctx
        elif best >= min_len and best > 0:
            assert start >= 0 and start % align == 0, ctx
            assert count == best and run_at(start) >= count, ctx
        else:
            assert (start, count) == (-1, 0), ctx
