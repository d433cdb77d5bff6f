"""The backing store: a block device or a regular image file, opened O_DIRECT and exclusively.

All I/O of the filesystem goes through a Device, and from here through the native I/O queue
(native/atomicfs_native.c): C worker threads run the system calls with no Python involved
and signal completions on an eventfd that one trio task (`run_reaper`) waits on, so the trio
loop keeps serving while I/O is in flight and no request waits for the GIL. Requests made
before trio runs (mkfs, recovery, fsck) execute the same C code in the calling thread.
(io_uring was measured in its place, 2026-12-05: a write linked to an fdatasync on the loop
device, completion on an eventfd, took as long as this queue's hand-off, p50 110-140 µs
both; the flush dominates, and the kernel runs fsync in an io-wq worker anyway.)

Every request carries a *kind* (super, log, snapshot, data; flush; read) so that the
test-only layers, also in C, can aim at it:

* fault injection (`inject=`): chosen writes, flushes or reads fail with EIO;
* a slow device (`delay=`): every write takes at least that long, so tests can hold a
  write in flight;
* recording (`record=`): every write's submission and completion (offset, flags, data)
  and every flush start and end, in the order they happen, for the crash explorer (see
  Recorder and atomicfs.crashtest.recording).

Concurrent flush requests share device flushes (group flush): a flush that starts after a
caller asked covers it, however many asked.

Every request is timed into a latency histogram of its request kind (`latency`, see
request_kind): from submission until the reaper hands its completion over, plus
`completion_wakeup`, from then until the waiting task runs again (a trio hop).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import trio

from atomicfs import locks, native
from atomicfs.errors import DeviceError, InUse, UserError
from atomicfs.locks import HostLock
from atomicfs.native import Buffer, Segment, ffi, lib
from atomicfs.stats import Histograms
from atomicfs.watchdog import current_kind, waiting


class Claim(Protocol):
    """What the device keeps of the owner claim (atomicfs.owner.Owner): released at close,
    before the descriptor goes, since releasing writes the record."""

    def release(self) -> None: ...

log = logging.getLogger(__name__)

KIND_BITS = {"super": lib.AFS_KIND_SUPER, "log": lib.AFS_KIND_LOG,
             "snapshot": lib.AFS_KIND_SNAPSHOT, "data": lib.AFS_KIND_DATA,
             "flush": lib.AFS_KIND_FLUSH, "read": lib.AFS_KIND_READ}
KINDS = ("super", "log", "snapshot", "data")
INJECT_TARGETS = KINDS + ("write", "flush", "read")
IO_THREADS = 4
MAX_IO_BYTES = 4 << 20  # the largest data write merged into one request (writeback, home copies)
INLINE_READ_MAX = 64 << 10  # the largest read run inline when the device is idle (readv)
_KIND_NAMES = {bit: name for name, bit in KIND_BITS.items()}
_request_kinds: dict[tuple[int, int, int], str] = {}


def request_kind(io: Any) -> str:
    """The latency histogram of a request: read, flush, or KIND[_atomic]_write[_dsync] or
    KIND[_atomic]_write_flush (a write with its flush in one request); a data write of the
    checkpoint (a logged unit copied home) is home_write."""
    key = (int(io.op), int(io.kind), int(io.flags))
    name = _request_kinds.get(key)
    if name is None:
        op, kind, flags = key
        if op == lib.AFS_OP_READ:
            name = "read"
        elif op == lib.AFS_OP_FLUSH:
            name = "flush"
        else:
            name = _KIND_NAMES.get(kind, str(kind)) + (
                "_atomic" if flags & native.RWF_ATOMIC else "") + "_write" + (
                "_flush" if op == lib.AFS_OP_WRITE_FLUSH else
                "_dsync" if flags & native.RWF_DSYNC else "")
        _request_kinds[key] = name
    if name == "data_write" and current_kind() == "checkpoint":
        return "home_write"
    return name


@dataclass
class InjectSpec:
    """Requests of the kinds in mask fail with EIO; count of them (None: all)."""

    targets: tuple[str, ...] = ()
    count: int | None = None

    @property
    def mask(self) -> int:
        bits = 0
        for t in self.targets:
            kinds = KINDS if t == "write" else (t,)
            for k in kinds:
                bits |= 1 << KIND_BITS[k]
        return bits

    def __str__(self) -> str:
        if not self.targets:
            return "off"
        return "+".join(self.targets) + (f":{self.count}" if self.count is not None else "")


def parse_inject(spec: str) -> InjectSpec:
    """`TARGET[+TARGET...][:COUNT]`, TARGET one of data, log, super, snapshot, write (all
    writes), flush, read; `off` for none. COUNT limits how many requests fail."""
    spec = spec.strip()
    if spec in ("", "off", "none"):
        return InjectSpec()
    targets_part, _, count = spec.partition(":")
    targets = tuple(t for t in targets_part.split("+") if t)
    for t in targets:
        if t not in INJECT_TARGETS:
            raise ValueError(f"unknown inject target {t!r} "
                             f"(one of {', '.join(INJECT_TARGETS)}, or off)")
    if not targets:
        raise ValueError("inject needs a target")
    if count and (not count.isdigit() or not 1 <= int(count) < 1 << 31):
        raise ValueError(f"bad inject count {count!r}")
    return InjectSpec(targets, int(count) if count else None)


@dataclass
class DeviceOptions:
    inject: InjectSpec = field(default_factory=InjectSpec)
    delay_s: float = 0.0  # extra latency of each write
    record: str | None = None  # path of a write recording


class Recorder:
    """The writer's side of the recording format (`record=`), whose one description is
    native/atomicfs_native.h (AFS_REC_*): the constants below come from there. The native
    I/O queue writes the records of this filesystem's requests; `open` gives it the file,
    and `pack` makes records for writers in Python (the crash explorer's recording block
    device, tests). The reader is atomicfs.crashtest.recording."""

    MAGIC = struct.pack("<Q", lib.AFS_REC_MAGIC)
    # type, seq, offset, length, flags, time ns, ref: little-endian, packed
    EVENT = struct.Struct("<cQqIIqQ")
    WRITE_SUBMIT = bytes([lib.AFS_REC_WRITE_SUBMIT])
    WRITE = bytes([lib.AFS_REC_WRITE])
    FLUSH_START = bytes([lib.AFS_REC_FLUSH_START])
    FLUSH_END = bytes([lib.AFS_REC_FLUSH_END])
    FLAG_ATOMIC, FLAG_DSYNC = lib.AFS_REC_FLAG_ATOMIC, lib.AFS_REC_FLAG_DSYNC
    KIND_FLAGS = {"super": lib.AFS_REC_FLAG_SUPER, "log": lib.AFS_REC_FLAG_LOG,
                  "snapshot": lib.AFS_REC_FLAG_SNAPSHOT, "data": lib.AFS_REC_FLAG_DATA}

    @classmethod
    def open(cls, path: str) -> int:
        """An append descriptor for the C recorder, with the magic written if new."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o644)
        if os.fstat(fd).st_size == 0:
            os.write(fd, cls.MAGIC)
        return fd

    @classmethod
    def pack(cls, rtype: bytes, seq: int, offset: int = 0, length: int = 0, flags: int = 0,
             time_ns: int = 0, ref: int = 0) -> bytes:
        """One record's header (a completed write's data follows it)."""
        return cls.EVENT.pack(rtype, seq, offset, length, flags, time_ns, ref)


def _never_abort(_: Any) -> trio.lowlevel.Abort:
    """A device wait that a cancellation does not end (Device._submit, uncancellable)."""
    return trio.lowlevel.Abort.FAILED


def _field_offsets(fmt: str) -> list[int]:
    """Where each field of a packed little-endian struct format starts."""
    return [struct.calcsize(fmt[: i + 1]) for i in range(len(fmt) - 1)]


# The header's layout is the C header's: fail at import, not in a recording, if they part.
if _field_offsets(Recorder.EVENT.format) + [Recorder.EVENT.size, len(Recorder.MAGIC)] != [
        lib.AFS_REC_OFF_TYPE, lib.AFS_REC_OFF_SEQ, lib.AFS_REC_OFF_OFFSET,
        lib.AFS_REC_OFF_LENGTH, lib.AFS_REC_OFF_FLAGS, lib.AFS_REC_OFF_TIME, lib.AFS_REC_OFF_REF,
        lib.AFS_REC_HEADER_SIZE, lib.AFS_REC_MAGIC_SIZE]:
    raise ImportError("device.Recorder.EVENT does not match AFS_REC_* of atomicfs_native.h")


def _in_use(path: str, detail: str) -> InUse:
    """The one-line refusal (owner.open_device names the holder its record names)."""
    return InUse(f"{path}: in use ({detail})", path, detail)


@dataclass
class Capabilities:
    size: int
    logical_block_size: int
    is_blockdev: bool
    dio_align: int
    atomic_unit_min: int
    atomic_unit_max: int
    # Memory alignment O_DIRECT needs (statx STATX_DIOALIGN); page-cache buffers use it
    # rather than 4096, which costs up to a page of heap per small folio.
    dio_mem_align: int = 4096


class Device:
    """One opened target."""

    def __init__(self, path: str, fd: int, caps: Capabilities, readonly: bool,
                 options: DeviceOptions | None = None) -> None:
        self.path = path
        self.fd = fd
        self.caps = caps
        self.readonly = readonly
        self.options = options or DeviceOptions()
        self.host_lock = HostLock()  # what Device.open holds besides fd
        self.owner: Claim | None = None  # the on-disk owner claim, released at close
        q = lib.afs_ioq_new(IO_THREADS)
        if q == ffi.NULL:
            raise OSError(errno.ENOMEM, "cannot start the I/O threads")
        self._q = q
        self._record_fd = -1
        if self.options.record:
            self._record_fd = Recorder.open(self.options.record)
            lib.afs_ioq_set_record(q, self._record_fd)
        self.set_inject(self.options.inject)
        self.set_delay(self.options.delay_s)
        # id -> [io, bufs, lens, waiting task (None once it gave up), kind, submitted ns,
        # reaped ns]
        self._pending: dict[int, list[Any]] = {}
        self.latency = Histograms()  # by request kind, see request_kind
        self._next_id = 1
        self._reaper_running = False
        # group flush state
        self._flush_started = 0
        self._flush_done = 0
        self._flush_running = False
        self._flush_event = trio.Event()
        self.flushes = 0
        self.write_ios = 0
        self.write_bytes = 0
        self.read_ios = 0
        self.inline_reads = 0  # reads run in the caller's thread (see readv)

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, path: str, *, readonly: bool = False,
             options: DeviceOptions | None = None, exclusive: bool = True) -> "Device":
        """Open with O_DIRECT, exclusively on this host (see atomicfs.locks) unless told
        not to (only to read who holds it); UserError with a one-line reason otherwise."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file or device") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UserError(f"{path}: not a block device or regular file")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_DIRECT | os.O_CLOEXEC
        if stat.S_ISBLK(st.st_mode) and exclusive:
            flags |= os.O_EXCL  # fails with EBUSY if mounted or held by another opener
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise _in_use(path, locks.kernel_user(st.st_rdev)
                              or "opened exclusively by another program") from None
            if exc.errno == errno.EINVAL:
                raise UserError(f"{path}: the filesystem holding it does not support "
                                "O_DIRECT") from None
            raise UserError(f"{path}: cannot open: {exc.strerror}") from None
        hold = HostLock()
        try:
            if exclusive:
                try:
                    hold = locks.take(path, fd, os.fstat(fd), readonly)
                except locks.Busy as exc:
                    raise _in_use(path, str(exc)) from None
            p = native.probe(fd)
            caps = Capabilities(size=p.size, logical_block_size=p.logical_block_size,
                                is_blockdev=bool(p.is_blockdev),
                                dio_align=max(p.dio_offset_align, p.logical_block_size, 512),
                                atomic_unit_min=p.atomic_unit_min,
                                atomic_unit_max=p.atomic_unit_max,
                                dio_mem_align=max(p.dio_mem_align or p.logical_block_size,
                                                  512))
        except BaseException:
            hold.release()
            os.close(fd)
            raise
        log.info("opened %s: %d bytes, sector %d, atomic writes %d..%d", path, caps.size,
                 caps.logical_block_size, caps.atomic_unit_min, caps.atomic_unit_max)
        dev = cls(path, fd, caps, readonly, options)
        dev.host_lock = hold
        return dev

    def close(self) -> None:
        if self.owner is not None:  # before the descriptor goes: it writes the record
            self.owner.release()
            self.owner = None
        if self._q is not None:
            lib.afs_ioq_free(self._q)
            self._q = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.host_lock.release()
        if self._record_fd >= 0:
            os.close(self._record_fd)
            self._record_fd = -1

    # ------------------------------------------------------------- runtime controls

    def set_inject(self, spec: InjectSpec) -> None:
        self.options.inject = spec
        lib.afs_ioq_set_inject(self._q, spec.mask, -1 if spec.count is None else spec.count)

    def set_delay(self, seconds: float) -> None:
        self.options.delay_s = seconds
        lib.afs_ioq_set_delay(self._q, int(seconds * 1_000_000))

    # ----------------------------------------------------------------- requests

    def _request(self, op: int, kind: str, offset: int = 0,
                 segments: Sequence[Segment] = (), flags: int = 0) -> tuple[Any, Any, Any]:
        io = ffi.new("struct afs_io *")
        io.op = op
        io.kind = KIND_BITS[kind]
        io.fd = self.fd
        io.offset = offset
        io.flags = flags
        bufs = lens = ffi.NULL
        n = len(segments)
        if n:
            if n > native.MAX_IOV:
                raise ValueError(f"too many segments ({n})")
            bufs = ffi.new("void *[]", n)
            lens = ffi.new("size_t[]", n)
            for i, (buf, off, length) in enumerate(segments):
                bufs[i] = buf.ptr + off
                lens[i] = length
        io.niov = n
        io.bufs = bufs
        io.lens = lens
        return io, bufs, lens

    def _check(self, io: Any, what: str) -> int:
        rc = int(io.result)
        if rc < 0:
            raise DeviceError(-rc, f"{what} failed: {os.strerror(-rc)}")
        if io.op in (lib.AFS_OP_WRITE, lib.AFS_OP_WRITE_FLUSH):
            self.write_ios += 1
            self.write_bytes += rc
            if io.op == lib.AFS_OP_WRITE_FLUSH:
                self.flushes += 1
        elif io.op == lib.AFS_OP_READ:
            self.read_ios += 1
        else:
            self.flushes += 1
        return rc

    def _execute(self, io: Any, what: str) -> int:
        t0 = time.perf_counter_ns()
        lib.afs_ioq_execute(self._q, io)
        self.latency.add(request_kind(io), time.perf_counter_ns() - t0)
        return self._check(io, what)

    async def _submit(self, req: tuple[Any, Any, Any], what: str,
                      uncancellable: bool = False) -> int:
        """Hand the request to the C threads and wait for the reaper to wake this task (a
        bare task wake-up, no Event: this runs for every device request). uncancellable:
        a cancellation waits for the outcome, as a shielded cancel scope would, without
        the cost of one (the caller must learn what happened to its write)."""
        io = req[0]
        if not self._reaper_running:  # before trio runs the reaper: run it here
            return await trio.to_thread.run_sync(self._execute, io, what)
        ident = self._next_id
        self._next_id += 1
        io.id = ident
        entry = [*req, trio.lowlevel.current_task(), request_kind(io), time.perf_counter_ns(),
                 0]
        self._pending[ident] = entry
        lib.afs_ioq_submit(self._q, io)
        if uncancellable:
            abort = _never_abort
        else:
            def abort(_: Any) -> trio.lowlevel.Abort:
                # The request is in a C thread and will complete: its entry (and so its
                # memory) stays in _pending until the reaper takes it; nobody is woken.
                entry[3] = None
                return trio.lowlevel.Abort.SUCCEEDED
        with waiting(f"device {what}"):
            await trio.lowlevel.wait_task_rescheduled(abort)
        self.latency.add("completion_wakeup", time.perf_counter_ns() - entry[6])
        return self._check(io, what)

    def completion_fd(self) -> int:
        """The eventfd the I/O threads signal completions on (readable: the reaper has work);
        -1 once closed. For the request loop's spin (atomicfs/fuseloop.py), which stops
        when it becomes readable."""
        return lib.afs_ioq_eventfd(self._q) if self._q is not None else -1

    async def run_reaper(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        """Hand completions from the C threads to the tasks waiting for them."""
        efd = lib.afs_ioq_eventfd(self._q)
        out = ffi.new("struct afs_io *[]", 256)
        self._reaper_running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(efd)
                n = lib.afs_ioq_reap(self._q, out, 256)
                now = time.perf_counter_ns()
                for i in range(n):
                    entry = self._pending.pop(int(out[i].id), None)
                    if entry is not None:
                        entry[6] = now
                        self.latency.add(entry[4], now - entry[5])
                        if entry[3] is not None:
                            trio.lowlevel.reschedule(entry[3])
        finally:
            self._reaper_running = False

    # ----------------------------------------------------------- blocking primitives

    def read_sync(self, offset: int, length: int) -> Buffer:
        buf = Buffer(length)
        self.readv_sync(offset, [(buf, 0, length)])
        return buf

    def readv_sync(self, offset: int, segments: Sequence[Segment]) -> None:
        self._execute(self._request(lib.AFS_OP_READ, "read", offset, segments)[0],
                      f"read at {offset}")

    def writev_sync(self, offset: int, segments: Sequence[Segment], kind: str,
                    atomic: bool = False, dsync: bool = False) -> None:
        if self.readonly:
            raise DeviceError(errno.EROFS, "device opened read-only")
        flags = (native.RWF_ATOMIC if atomic else 0) | (native.RWF_DSYNC if dsync else 0)
        req = self._request(lib.AFS_OP_WRITE, kind, offset, segments, flags)
        self._execute(req[0], f"{kind} write at {offset}")

    def flush_sync(self) -> None:
        self._execute(self._request(lib.AFS_OP_FLUSH, "flush")[0], "flush")

    # ------------------------------------------------------------------ async I/O

    async def read(self, offset: int, length: int) -> Buffer:
        buf = Buffer(length)
        await self.readv(offset, [(buf, 0, length)])
        return buf

    async def readv(self, offset: int, segments: Sequence[Segment]) -> None:
        """Read into the segments. A small read while nothing else of this device is in
        flight runs inline, in the caller's thread with the GIL released: handing it to an
        I/O thread and waking the loop again costs more than the read itself (a cold 4 KiB
        read: about 170 µs through the queue against 70 µs of pread on the bench's device),
        and with nothing in flight nobody waits for the loop meanwhile but requests that
        arrive during those microseconds."""
        req = self._request(lib.AFS_OP_READ, "read", offset, segments)
        if self._reaper_running and not self._pending and \
                sum(s[2] for s in segments) <= INLINE_READ_MAX:
            self.inline_reads += 1
            self._execute(req[0], f"read at {offset}")
            return
        await self._submit(req, f"read at {offset}")

    async def writev(self, offset: int, segments: Sequence[Segment], kind: str,
                     atomic: bool = False, dsync: bool = False,
                     uncancellable: bool = False) -> None:
        """uncancellable: see _submit."""
        if self.readonly:
            raise DeviceError(errno.EROFS, "device opened read-only")
        flags = (native.RWF_ATOMIC if atomic else 0) | (native.RWF_DSYNC if dsync else 0)
        await self._submit(self._request(lib.AFS_OP_WRITE, kind, offset, segments, flags),
                           f"{kind} write at {offset}", uncancellable)

    async def writev_flush(self, offset: int, segments: Sequence[Segment], kind: str,
                           atomic: bool = False, uncancellable: bool = False) -> None:
        """A write, then a device flush, in one request: durable when it returns. For the
        group flush it counts as a flush that started when it was submitted.
        uncancellable: see _submit."""
        if self.readonly:
            raise DeviceError(errno.EROFS, "device opened read-only")
        flags = native.RWF_ATOMIC if atomic else 0
        self._flush_started += 1
        gen = self._flush_started
        await self._submit(self._request(lib.AFS_OP_WRITE_FLUSH, kind, offset, segments,
                                         flags), f"{kind} write at {offset}", uncancellable)
        # A flush covers what completed before it started, so also what earlier flushes
        # covered: completing number gen completes every lower number.
        self._flush_done = max(self._flush_done, gen)

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
                with waiting("a device flush"):
                    await self._flush_event.wait()
                continue
            self._flush_running = True
            self._flush_started += 1
            gen = self._flush_started
            try:
                await self._submit(self._request(lib.AFS_OP_FLUSH, "flush"), "flush")
                self._flush_done = gen
            finally:
                self._flush_running = False
                event, self._flush_event = self._flush_event, trio.Event()
                event.set()
