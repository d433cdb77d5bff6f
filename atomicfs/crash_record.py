"""Recordings and the crash states built from them.

A recording (device.Recorder, mount option `record=`) lists, in the order they happened,
each device write's submission and completion (with its data) and each flush's start and
end. It starts at mount time on a copy of a freshly made image, the *base*: the base plus
every completed write, in completion order, is the image at unmount.

A crash at point c (the first c events happened, the rest did not) leaves on the device:

* every write that completed before the start of the last flush that ended before c
  (the device promised those);
* of the other writes that were submitted before c (completed or still in flight), any
  subset, each absent, whole, or torn: some of its `tear`-byte chunks written and the
  others not. Writes submitted with RWF_ATOMIC are whole or absent, never torn.

`CrashState` is one such choice, drawn deterministically from a seed; `StateBuilder` turns
it into an image file quickly (see its docstring for the method and why).
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import struct
from dataclasses import dataclass, field
from typing import Iterable

from atomicfs.device import Recorder

log = logging.getLogger(__name__)


class RecordingError(Exception):
    """The recording file is not one the Recorder wrote, or is truncated."""


@dataclass
class Event:
    kind: bytes  # Recorder.WRITE_SUBMIT, WRITE, FLUSH_START or FLUSH_END
    seq: int
    time_ns: int


@dataclass
class DeviceWrite:
    """One completed device write."""

    event: int  # index of its completion event
    submit: int  # index of its submit event
    offset: int
    length: int
    flags: int
    data_pos: int  # where its data sits in the recording file

    @property
    def atomic(self) -> bool:
        return bool(self.flags & Recorder.FLAG_ATOMIC)

    @property
    def kind(self) -> str:
        for name, bit in Recorder.KIND_FLAGS.items():
            if self.flags & bit:
                return name
        return "?"


class Recording:
    """A parsed recording; the write data stays in the file (memory-mapped)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.events: list[Event] = []
        self.writes: list[DeviceWrite] = []
        self.flush_pairs: list[tuple[int, int]] = []  # (start index, end index)
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), size, prot=mmap.PROT_READ) if size else None
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise
        self._durable_from = self._compute_durable_points()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- parsing

    def _parse(self, size: int) -> None:
        raw = self._map
        magic = Recorder.MAGIC
        if raw is None or size < len(magic) or raw[: len(magic)] != magic:
            raise RecordingError(f"{self.path}: not a recording (expected {magic!r})")
        ev = struct.Struct(Recorder.EVENT_FORMAT)
        pos = len(magic)
        index_of: dict[int, int] = {}  # event seq -> index
        while pos < size:
            if pos + ev.size > size:
                raise RecordingError(f"{self.path}: truncated event at byte {pos}")
            kind, seq, offset, length, flags, time_ns, ref = ev.unpack_from(raw, pos)
            pos += ev.size
            index = len(self.events)
            index_of[seq] = index
            self.events.append(Event(kind, seq, time_ns))
            if kind == Recorder.WRITE:
                if pos + length > size:
                    raise RecordingError(f"{self.path}: truncated data of write {seq}")
                submit = index_of.get(ref, index)  # a v1-style write without submit
                self.writes.append(DeviceWrite(index, submit, offset, length, flags, pos))
                pos += length
            elif kind == Recorder.FLUSH_END:
                if ref not in index_of:
                    raise RecordingError(f"{self.path}: flush end {seq} without a start")
                self.flush_pairs.append((index_of[ref], index))
            elif kind not in (Recorder.WRITE_SUBMIT, Recorder.FLUSH_START):
                raise RecordingError(f"{self.path}: unknown event type {kind!r}")

    def _compute_durable_points(self) -> list[int]:
        """For each crash point c (0..n): the index of the start of the last flush that
        ended before c (-1 if none): writes completed before it are on the device."""
        n = len(self.events)
        start_of_end = {end: start for start, end in self.flush_pairs}
        out = [-1] * (n + 1)
        best = -1
        for c in range(1, n + 1):
            start = start_of_end.get(c - 1)
            if start is not None:
                best = max(best, start)
            out[c] = best
        return out

    # ------------------------------------------------------------------- queries

    @property
    def n_events(self) -> int:
        return len(self.events)

    def time_before(self, c: int) -> int:
        """Monotonic time of the last event before crash point c (0 for c == 0)."""
        return self.events[c - 1].time_ns if c > 0 else 0

    def durable_start(self, c: int) -> int:
        return self._durable_from[c]

    def durable_writes(self, c: int) -> list[int]:
        """Indexes (into writes) of the writes a crash at c must keep."""
        s = self._durable_from[c]
        return [i for i, w in enumerate(self.writes) if w.event < s]

    def in_flight_writes(self, c: int) -> list[int]:
        """Indexes of the writes that may or may not (or partly) be on the device."""
        s = self._durable_from[c]
        return [i for i, w in enumerate(self.writes)
                if w.submit < c and w.event > s]

    def data(self, w: DeviceWrite) -> memoryview:
        assert self._map is not None
        return memoryview(self._map)[w.data_pos: w.data_pos + w.length]

    def summary(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for w in self.writes:
            kinds[w.kind] = kinds.get(w.kind, 0) + 1
        return {"events": self.n_events, "writes": len(self.writes),
                "flushes": len(self.flush_pairs),
                "atomic_writes": sum(1 for w in self.writes if w.atomic),
                "bytes": sum(w.length for w in self.writes), **kinds}


# --------------------------------------------------------------------------- crash states

WHOLE, TORN = "whole", "torn"


@dataclass
class Applied:
    """One in-flight write put into a crash state: whole, or only some chunks."""

    write: int  # index into Recording.writes
    mode: str
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (offset in write, length)


@dataclass
class CrashState:
    index: int
    crash_point: int  # events [0, crash_point) happened
    durable_start: int  # writes completed before this event index are all there
    applied: list[Applied]
    in_flight: int  # how many writes were candidates

    @property
    def torn_writes(self) -> int:
        return sum(1 for a in self.applied if a.mode == TORN)

    def describe(self) -> str:
        parts = [f"{a.write}{'' if a.mode == WHOLE else '~'}" for a in self.applied]
        return (f"state {self.index}: crash at event {self.crash_point}, durable before "
                f"event {self.durable_start}, {self.in_flight} in flight, applied "
                f"[{' '.join(parts)}]")


def choose_states(rec: Recording, count: int, seed: int, tear: int,
                  first_index: int = 0) -> list[CrashState]:
    """count crash states, deterministic from seed, sorted by crash point."""
    if rec.n_events == 0:
        return []
    rng = random.Random(seed)
    points = sorted(rng.randint(1, rec.n_events) for _ in range(count))
    states = []
    for k, c in enumerate(points):
        srng = random.Random(f"{seed}:{k}:{c}")
        states.append(_choose_state(rec, first_index + k, c, tear, srng))
    return states


def _choose_state(rec: Recording, index: int, c: int, tear: int,
                  rng: random.Random) -> CrashState:
    candidates = rec.in_flight_writes(c)
    # Vary how much of the window survives, so that both nearly-empty and nearly-full
    # windows occur, not only the 50/50 mixes.
    keep = rng.choice((0.1, 0.5, 0.9, rng.random()))
    torn_share = rng.choice((0.0, 0.3, 0.7))
    applied = []
    for i in candidates:
        if rng.random() >= keep:
            continue
        w = rec.writes[i]
        if not w.atomic and w.length > tear and rng.random() < torn_share:
            applied.append(Applied(i, TORN, torn_chunks(w.length, tear, rng)))
        else:
            applied.append(Applied(i, WHOLE))
    return CrashState(index, c, rec.durable_start(c), applied, len(candidates))


def torn_chunks(length: int, tear: int, rng: random.Random) -> list[tuple[int, int]]:
    """The tear-sized chunks of a torn write that reached the device: a prefix, a
    suffix, or a random subset (devices persist sectors in no particular order)."""
    n = (length + tear - 1) // tear
    shape = rng.randrange(3)
    kept: Iterable[int]
    if shape == 0:
        kept = range(0, rng.randrange(1, n))
    elif shape == 1:
        kept = range(rng.randrange(1, n), n)
    else:
        kept = [k for k in range(n) if rng.random() < 0.5]
    runs: list[tuple[int, int]] = []
    for k in kept:
        off = k * tear
        ln = min(tear, length - off)
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + ln)
        else:
            runs.append((off, ln))
    return runs


# ---------------------------------------------------------------------- building images

def sparse_copy(src: str, dst: str) -> None:
    """Copy src to dst keeping holes: only the data extents are copied (in the kernel)."""
    size = os.path.getsize(src)
    sfd = os.open(src, os.O_RDONLY)
    try:
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # only a hole remains
                        break
                    raise
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                _copy_range(sfd, dfd, start, end - start)
                pos = end
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _copy_range(sfd: int, dfd: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(sfd, dfd, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = _copy_chunk(sfd, dfd, offset + done, min(length - done, 1 << 20))
        if n <= 0:
            raise OSError(errno.EIO, "copy made no progress")
        done += n


def _copy_chunk(sfd: int, dfd: int, offset: int, length: int) -> int:
    """Fallback for copies between filesystems that copy_file_range refuses."""
    data = os.pread(sfd, length, offset)
    return os.pwrite(dfd, data, offset)


class StateBuilder:
    """Builds crash-state images from one recording.

    Method (chosen by measurement, see the report in README): a *prefix image* holds the
    base plus the durable writes of the current crash point and only ever moves forward,
    because states are built in crash-point order; each state is a sparse copy of the
    prefix image (copy_file_range of its data extents only: a few MiB) plus its in-flight
    choices. Applying every durable write to a fresh copy per state would cost the whole
    recording each time; undoing changes on a single image would save the copy but makes
    every checker write something to undo.
    """

    def __init__(self, rec: Recording, base: str, scratch: str) -> None:
        self.rec = rec
        self.scratch = scratch
        self.prefix = os.path.join(scratch, "prefix.img")
        sparse_copy(base, self.prefix)
        self._prefix_fd = os.open(self.prefix, os.O_WRONLY)
        self._applied_upto = 0  # writes[0:_applied_upto] are in the prefix image

    def close(self) -> None:
        if self._prefix_fd >= 0:
            os.close(self._prefix_fd)
            self._prefix_fd = -1
        _unlink_quietly(self.prefix)

    def __enter__(self) -> "StateBuilder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _advance_prefix(self, durable_start: int) -> None:
        """Apply every write that completed before event durable_start."""
        writes = self.rec.writes
        i = self._applied_upto
        if i < len(writes) and writes[i].event < durable_start:
            while i < len(writes) and writes[i].event < durable_start:
                os.pwrite(self._prefix_fd, self.rec.data(writes[i]), writes[i].offset)
                i += 1
            self._applied_upto = i
        elif i > 0 and writes[i - 1].event >= durable_start:
            raise ValueError("crash states must be built in crash-point order")

    def build(self, state: CrashState, path: str) -> str:
        """Write the image of state to path."""
        self._advance_prefix(state.durable_start)
        sparse_copy(self.prefix, path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for a in state.applied:
                w = self.rec.writes[a.write]
                data = self.rec.data(w)
                if a.mode == WHOLE:
                    os.pwrite(fd, data, w.offset)
                else:
                    for off, ln in a.chunks:
                        os.pwrite(fd, data[off: off + ln], w.offset + off)
        finally:
            os.close(fd)
        return path

    def build_final(self, path: str) -> str:
        """The image with every completed write (what the device held at the end)."""
        sparse_copy(self.prefix, path)
        fd = os.open(path, os.O_WRONLY)
        try:
            for w in self.rec.writes[self._applied_upto:]:
                os.pwrite(fd, self.rec.data(w), w.offset)
        finally:
            os.close(fd)
        return path


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

