"""Typed Python face of the C core (native/atomicfs_native.c, built by cffi).

Buffers are aligned native memory usable for O_DIRECT. cffi releases the GIL for every call
into the core; the I/O calls are meant to be run from worker threads.
"""
from __future__ import annotations

from typing import Any

try:
    from atomicfs._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "the atomicfs native core is not built; run `make setup` (or python native/build.py)"
    ) from exc

RWF_DSYNC = 0x2
RWF_ATOMIC: int = lib.afs_rwf_atomic()
MAX_IOV: int = lib.AFS_MAX_IOV
ALIGN = 4096


class Buffer:
    """Aligned, zero-initialised native memory of a fixed size."""

    __slots__ = ("ptr", "size", "_mem")

    def __init__(self, size: int, align: int = ALIGN) -> None:
        ptr = lib.afs_alloc(size, align)
        if ptr == ffi.NULL:
            raise MemoryError(f"cannot allocate {size} aligned bytes")
        self._mem = ffi.gc(ptr, lib.afs_free, size=size)
        self.ptr = ffi.cast("char *", self._mem)
        self.size = size

    def view(self, off: int = 0, length: int | None = None) -> memoryview:
        """A writable memoryview of [off, off+length), valid while the Buffer lives."""
        if length is None:
            length = self.size - off
        return memoryview(ffi.buffer(self.ptr + off, length))

    def bytes(self, off: int = 0, length: int | None = None) -> bytes:
        if length is None:
            length = self.size - off
        return ffi.buffer(self.ptr + off, length)[:]

    def write(self, off: int, data: Any) -> None:
        """Copy a bytes-like object into the buffer at off (native memcpy)."""
        n = len(data)
        if off < 0 or off + n > self.size:
            raise ValueError("copy outside buffer")
        lib.afs_copy(self.ptr + off, ffi.from_buffer(data), n)

    def copy_from(self, off: int, src: "Buffer", src_off: int, n: int) -> None:
        lib.afs_copy(self.ptr + off, src.ptr + src_off, n)

    def zero(self, off: int = 0, length: int | None = None) -> None:
        if length is None:
            length = self.size - off
        lib.afs_zero(self.ptr + off, length)

    def is_zero(self, off: int = 0, length: int | None = None) -> bool:
        if length is None:
            length = self.size - off
        return bool(lib.afs_is_zero(self.ptr + off, length))

    def crc32c(self, off: int = 0, length: int | None = None, crc: int = 0) -> int:
        if length is None:
            length = self.size - off
        return int(lib.afs_crc32c(crc, self.ptr + off, length))


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of a bytes-like object, chainable through crc."""
    return int(lib.afs_crc32c(crc, ffi.from_buffer(data), len(data)))


def copy_into(dst: Any, dst_off: int, src: Buffer, src_off: int, n: int) -> None:
    """Copy n bytes from a native Buffer into a writable bytes-like object."""
    lib.afs_copy(ffi.from_buffer(dst, require_writable=True) + dst_off, src.ptr + src_off, n)


Segment = tuple[Buffer, int, int]  # buffer, offset in it, length


class ProbeResult:
    __slots__ = ("size", "logical_block_size", "is_blockdev", "dio_mem_align",
                 "dio_offset_align", "atomic_unit_min", "atomic_unit_max", "atomic_segments_max")
    size: int
    logical_block_size: int
    is_blockdev: int
    dio_mem_align: int
    dio_offset_align: int
    atomic_unit_min: int
    atomic_unit_max: int
    atomic_segments_max: int

    def __init__(self, raw: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, int(getattr(raw, name)))


def probe(fd: int) -> ProbeResult:
    """Size, sector size, O_DIRECT alignment and statx atomic-write limits of fd."""
    out = ffi.new("struct afs_probe_result *")
    rc = lib.afs_probe(fd, out)
    if rc < 0:
        raise OSError(-rc, "cannot probe the target")
    return ProbeResult(out)


def bitmap_set(bm: bytearray, start: int, count: int, value: bool) -> None:
    lib.afs_bitmap_set(ffi.from_buffer(bm), start, count, 1 if value else 0)


def bitmap_count_set(bm: bytearray, start: int, count: int) -> int:
    return int(lib.afs_bitmap_count_set(ffi.from_buffer(bm), start, count))


def bitmap_find(bm: bytearray, lo: int, hi: int, goal: int, want: int, min_len: int,
                align: int) -> tuple[int, int]:
    """First aligned free run of `want` blocks at or after goal (wrapping), else the longest
    of at least min_len; returns (start, length) or (-1, 0)."""
    found = ffi.new("int64_t *")
    start = int(lib.afs_bitmap_find(ffi.from_buffer(bm), lo, hi, goal, want, min_len, align,
                                    found))
    return (start, int(found[0])) if start >= 0 else (-1, 0)
