"""The backing store: a block device or a regular image file, opened O_DIRECT and exclusively.

All I/O of the filesystem goes through a Device, and from here through the native core in
worker threads (cffi drops the GIL), so the trio loop keeps serving while I/O is in flight.

Every write carries a *kind* (super, log, snapshot, data) so that the test-only layers can
aim at it:

* fault injection (`inject=`): chosen writes, flushes or reads fail with EIO;
* a slow device (`delay=`): data writes take at least that long, so tests can hold a write
  in flight;
* recording (`record=`): every completed write (offset, flags, data) and every flush, in
  completion order, for the crash explorer (see atomicfs.crash).

Concurrent flush requests share device flushes (group flush): a flush that starts after a
caller asked covers it, however many asked.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import trio

from atomicfs import native
from atomicfs.errors import DeviceError, UserError
from atomicfs.native import Buffer, Segment

log = logging.getLogger(__name__)

KINDS = ("super", "log", "snapshot", "data")
INJECT_TARGETS = KINDS + ("write", "flush", "read")


@dataclass
class InjectRule:
    target: str
    remaining: int | None  # None: every matching request fails

    def __str__(self) -> str:
        return self.target if self.remaining is None else f"{self.target}:{self.remaining}"


def parse_inject(spec: str) -> list[InjectRule]:
    """`KIND[:COUNT][+KIND[:COUNT]...]`, KIND one of data, log, super, snapshot, write,
    flush, read; `off` (or empty) for none. COUNT limits how many requests fail."""
    spec = spec.strip()
    if spec in ("", "off", "none"):
        return []
    rules = []
    for part in spec.split("+"):
        target, _, count = part.partition(":")
        if target not in INJECT_TARGETS:
            raise ValueError(f"unknown inject target {target!r} "
                             f"(one of {', '.join(INJECT_TARGETS)}, or off)")
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"bad inject count {count!r}")
        rules.append(InjectRule(target, int(count) if count else None))
    return rules


@dataclass
class DeviceOptions:
    inject: list[InjectRule] = field(default_factory=list)
    delay_s: float = 0.0  # extra latency of each data write
    record: str | None = None  # path of a write recording


class Recorder:
    """Appends every completed write and every flush to a file (see atomicfs.crash)."""

    MAGIC = b"AFSREC01"
    EVENT = struct.Struct("<cQQIIQ")  # type, seq, offset, length, flags, time ns
    WRITE, FLUSH_START, FLUSH_END = b"W", b"S", b"F"
    FLAG_ATOMIC, FLAG_DSYNC = 1, 2
    KIND_FLAGS = {"super": 0x10, "log": 0x20, "snapshot": 0x40, "data": 0x80}

    def __init__(self, path: str) -> None:
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self._f = open(path, "ab", buffering=1 << 20)
        if new:
            self._f.write(self.MAGIC)
        self._lock = threading.Lock()
        self._seq = 0

    def write(self, offset: int, segments: Sequence[Segment], flags: int) -> None:
        length = sum(n for _, _, n in segments)
        with self._lock:
            self._seq += 1
            self._f.write(self.EVENT.pack(self.WRITE, self._seq, offset, length, flags,
                                          time.monotonic_ns()))
            for buf, off, n in segments:
                self._f.write(buf.view(off, n))

    def flush_event(self, kind: bytes) -> None:
        with self._lock:
            self._seq += 1
            self._f.write(self.EVENT.pack(kind, self._seq, 0, 0, 0, time.monotonic_ns()))
            if kind == self.FLUSH_END:
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


@dataclass
class Capabilities:
    size: int
    logical_block_size: int
    is_blockdev: bool
    dio_align: int
    atomic_unit_min: int
    atomic_unit_max: int


class Device:
    """One opened target."""

    def __init__(self, path: str, fd: int, caps: Capabilities, readonly: bool,
                 options: DeviceOptions | None = None) -> None:
        self.path = path
        self.fd = fd
        self.caps = caps
        self.readonly = readonly
        self.options = options or DeviceOptions()
        self._recorder = Recorder(self.options.record) if self.options.record else None
        self._inject_lock = threading.Lock()
        # group flush state
        self._flush_started = 0
        self._flush_done = 0
        self._flush_running = False
        self._flush_event = trio.Event()
        self.flushes = 0
        self.write_ios = 0
        self.write_bytes = 0
        self.read_ios = 0

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, path: str, *, readonly: bool = False,
             options: DeviceOptions | None = None) -> "Device":
        """Open exclusively with O_DIRECT; UserError with a one-line reason otherwise."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file or device") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UserError(f"{path}: not a block device or regular file")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC
        if stat.S_ISBLK(st.st_mode):
            flags |= os.O_EXCL  # fails with EBUSY if mounted or held by another opener
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UserError(f"{path}: device is in use (mounted or opened exclusively)")
            if exc.errno == errno.EINVAL:
                raise UserError(f"{path}: the filesystem holding it does not support O_DIRECT")
            raise UserError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            if stat.S_ISREG(st.st_mode):
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX)
                                | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UserError(f"{path}: image is in use (already mounted?)") from None
            p = native.probe(fd)
            caps = Capabilities(size=p.size, logical_block_size=p.logical_block_size,
                                is_blockdev=bool(p.is_blockdev),
                                dio_align=max(p.dio_offset_align, p.logical_block_size, 512),
                                atomic_unit_min=p.atomic_unit_min,
                                atomic_unit_max=p.atomic_unit_max)
        except BaseException:
            os.close(fd)
            raise
        log.info("opened %s: %d bytes, sector %d, atomic writes %d..%d", path, caps.size,
                 caps.logical_block_size, caps.atomic_unit_min, caps.atomic_unit_max)
        return cls(path, fd, caps, readonly, options)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None

    # ------------------------------------------------------------- runtime controls

    def set_inject(self, rules: list[InjectRule]) -> None:
        with self._inject_lock:
            self.options.inject = rules

    def set_delay(self, seconds: float) -> None:
        self.options.delay_s = seconds

    def _injected(self, target: str) -> bool:
        """Consume one matching injection rule; True if this request must fail."""
        if not self.options.inject:
            return False
        with self._inject_lock:
            for rule in self.options.inject:
                if rule.target == target or (rule.target == "write" and target in KINDS):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self.options.inject = [r for r in self.options.inject
                                                   if r is not rule]
                    return True
        return False

    # ----------------------------------------------------------- blocking primitives

    def read_sync(self, offset: int, length: int) -> Buffer:
        buf = Buffer(length)
        self.readv_sync(offset, [(buf, 0, length)])
        return buf

    def readv_sync(self, offset: int, segments: Sequence[Segment]) -> None:
        if self._injected("read"):
            raise DeviceError(errno.EIO, f"injected read error at {offset}")
        rc = native.preadv(self.fd, segments, offset)
        self.read_ios += 1
        if rc < 0:
            raise DeviceError(-rc, f"read at {offset} failed: {os.strerror(-rc)}")

    def writev_sync(self, offset: int, segments: Sequence[Segment], kind: str,
                    atomic: bool = False, dsync: bool = False) -> None:
        if self.readonly:
            raise DeviceError(errno.EROFS, "device opened read-only")
        if kind == "data" and self.options.delay_s:
            time.sleep(self.options.delay_s)
        if self._injected(kind):
            raise DeviceError(errno.EIO, f"injected {kind} write error at {offset}")
        flags = (native.RWF_ATOMIC if atomic else 0) | (native.RWF_DSYNC if dsync else 0)
        rc = native.pwritev(self.fd, segments, offset, flags)
        if rc < 0:
            raise DeviceError(-rc, f"{kind} write at {offset} failed: {os.strerror(-rc)}")
        self.write_ios += 1
        self.write_bytes += rc
        if self._recorder is not None:
            rflags = Recorder.KIND_FLAGS[kind]
            rflags |= Recorder.FLAG_ATOMIC if atomic else 0
            rflags |= Recorder.FLAG_DSYNC if dsync else 0
            self._recorder.write(offset, segments, rflags)

    def flush_sync(self) -> None:
        if self._recorder is not None:
            self._recorder.flush_event(Recorder.FLUSH_START)
        if self._injected("flush"):
            raise DeviceError(errno.EIO, "injected flush error")
        rc = native.fdatasync(self.fd)
        if rc < 0:
            raise DeviceError(-rc, f"flush failed: {os.strerror(-rc)}")
        self.flushes += 1
        if self._recorder is not None:
            self._recorder.flush_event(Recorder.FLUSH_END)

    # ------------------------------------------------------------------ async I/O

    async def read(self, offset: int, length: int) -> Buffer:
        buf = Buffer(length)
        await self.readv(offset, [(buf, 0, length)])
        return buf

    async def readv(self, offset: int, segments: Sequence[Segment]) -> None:
        await trio.to_thread.run_sync(self.readv_sync, offset, segments)

    async def writev(self, offset: int, segments: Sequence[Segment], kind: str,
                     atomic: bool = False, dsync: bool = False) -> None:
        await trio.to_thread.run_sync(self.writev_sync, offset, segments, kind, atomic, dsync)

    def write_gen(self) -> int:
        """Flush generation of a write that has completed by now: any flush numbered
        higher started after it and so covers it (see flush_covering)."""
        return self._flush_started

    async def flush_covering(self, gen: int) -> None:
        """Make durable the writes that completed at flush generation gen."""
        if gen >= 0 and self._flush_done <= gen:
            await self.flush()

    async def flush(self) -> None:
        """Make every write completed before this call durable. Callers that arrive while
        a flush runs share the next one (group flush)."""
        target = self._flush_started + 1  # a flush starting after now covers this caller
        while self._flush_done < target:
            if self._flush_running:
                await self._flush_event.wait()
                continue
            self._flush_running = True
            self._flush_started += 1
            gen = self._flush_started
            try:
                await trio.to_thread.run_sync(self.flush_sync)
                self._flush_done = gen
            finally:
                self._flush_running = False
                event, self._flush_event = self._flush_event, trio.Event()
                event.set()
