"""Reading device recordings (`-o record=PATH`; the writer is the native I/O queue).

A recording is MAGIC followed by events in the order they happened: a write's submission,
its completion with offset, flags and data; the start and the end of each flush (see
atomicfs.device.Recorder; the crash explorer's reader is atomicfs.crash_record).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from atomicfs.device import Recorder

_EVENT = struct.Struct(Recorder.EVENT_FORMAT)
KIND_OF_FLAG = {v: k for k, v in Recorder.KIND_FLAGS.items()}


@dataclass
class Event:
    type: bytes  # Recorder.WRITE_SUBMIT, WRITE, FLUSH_START or FLUSH_END
    seq: int
    offset: int
    length: int
    flags: int
    time_ns: int
    data_pos: int  # where the write's data starts in the recording file
    ref: int = 0  # a completion's submit, a flush end's start (their seq)

    @property
    def atomic(self) -> bool:
        return bool(self.flags & Recorder.FLAG_ATOMIC)

    @property
    def dsync(self) -> bool:
        return bool(self.flags & Recorder.FLAG_DSYNC)

    @property
    def kind(self) -> str:
        return KIND_OF_FLAG.get(self.flags & 0xF0, "?")


def read_events(path: str) -> Iterator[Event]:
    """The events of a recording; a truncated last event (recorder killed) ends it."""
    with open(path, "rb") as f:
        if f.read(len(Recorder.MAGIC)) != Recorder.MAGIC:
            raise ValueError(f"{path} is not an atomicfs device recording")
        while True:
            head = f.read(_EVENT.size)
            if len(head) < _EVENT.size:
                return
            etype, seq, offset, length, flags, t, ref = _EVENT.unpack(head)
            pos = f.tell()
            if etype == Recorder.WRITE:
                if len(f.read(length)) < length:
                    return  # cut short by a crash of the recorder
            yield Event(etype, seq, offset, length, flags, t, pos, ref)


def read_data(path: str, event: Event) -> bytes:
    with open(path, "rb") as f:
        f.seek(event.data_pos)
        return f.read(event.length)
