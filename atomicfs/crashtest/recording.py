"""The one reader of device recordings (`-o record=PATH`, and the recording block device).

The format is described once, in native/atomicfs_native.h (AFS_REC_*); its constants reach
Python through atomicfs.device.Recorder, the writer's side. A recording lists, in the order
they happened, each device write's submission and completion (with its data) and each
flush's start and end.

A torn last record is what a crash (or a reader racing a live recorder) leaves: the
recording then ends at the last whole record, and `torn_tail` says how many bytes were
left over. Anything else that does not parse (an unknown record type, a seq out of order,
a completion or a flush end without its start) is damage in the middle, which a crash
cannot cause: RecordingError.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass

from atomicfs.device import Recorder

log = logging.getLogger(__name__)

_KIND_OF_FLAG = {bit: name for name, bit in Recorder.KIND_FLAGS.items()}
_KIND_MASK = sum(Recorder.KIND_FLAGS.values())


class RecordingError(Exception):
    """The file is not a recording, or is damaged before its last record."""


@dataclass
class Event:
    """One record: a write's submission or completion, a flush's start or end."""

    type: bytes  # Recorder.WRITE_SUBMIT, WRITE, FLUSH_START or FLUSH_END
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
    def dsync(self) -> bool:
        return bool(self.flags & Recorder.FLAG_DSYNC)

    @property
    def kind(self) -> str:
        """super, log, snapshot or data; ? when the writer did not say."""
        return _KIND_OF_FLAG.get(self.flags & _KIND_MASK, "?")


class Recording:
    """A parsed recording; the write data stays in the file (memory-mapped)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.events: list[Event] = []
        self.writes: list[DeviceWrite] = []
        self.flush_pairs: list[tuple[int, int]] = []  # (start index, end index)
        self.torn_tail = 0  # bytes of a last record cut short, ignored
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
        ev = Recorder.EVENT
        pos = len(magic)
        index_of: dict[int, int] = {}  # seq -> event index, since the recorder's opening
        last_seq = 0
        while pos < size:
            if pos + ev.size > size:
                self._torn(pos, size, "record header")
                return
            rtype, seq, offset, length, flags, time_ns, ref = ev.unpack_from(raw, pos)
            if rtype not in (Recorder.WRITE_SUBMIT, Recorder.WRITE, Recorder.FLUSH_START,
                             Recorder.FLUSH_END):
                raise RecordingError(f"{self.path}: unknown record type {rtype!r} at byte "
                                     f"{pos}")
            if seq == 1:  # the file was opened again: a new recorder appends
                index_of.clear()
            elif seq != last_seq + 1:
                raise RecordingError(f"{self.path}: record {seq} follows {last_seq} at byte "
                                     f"{pos}: a record before it is damaged")
            if rtype == Recorder.WRITE and pos + ev.size + length > size:
                self._torn(pos, size, f"data of write {seq}")
                return
            pos += ev.size
            last_seq = seq
            index = len(self.events)
            index_of[seq] = index
            self.events.append(Event(rtype, seq, time_ns))
            if rtype == Recorder.WRITE:
                if ref not in index_of:
                    raise RecordingError(f"{self.path}: write {seq} without its submission")
                self.writes.append(DeviceWrite(index, index_of[ref], offset, length, flags,
                                               pos))
                pos += length
            elif rtype == Recorder.FLUSH_END:
                if ref not in index_of:
                    raise RecordingError(f"{self.path}: flush end {seq} without a start")
                self.flush_pairs.append((index_of[ref], index))

    def _torn(self, pos: int, size: int, what: str) -> None:
        self.torn_tail = size - pos
        log.warning("%s: the last record (%s) is cut short; the recording ends at byte %d "
                    "(%d bytes after it ignored)", self.path, what, pos, self.torn_tail)

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


def read_writes(path: str) -> list[tuple[DeviceWrite, bytes]]:
    """Every completed write of a recording with its data, for a quick look (tests)."""
    with Recording(path) as rec:
        return [(w, bytes(rec.data(w))) for w in rec.writes]
