"""What every crash-test workload shares: the history/oracle protocol, the view of a
recovered filesystem, the verdict, and the self-identifying sector format.

A workload runs against a real mount and keeps a *history*: what it asked for, when each
request started and when it was answered, on the monotonic clock that the device recorder
also uses. After a crash at time t the history says what the filesystem may hold (see each
workload family: data.py, rwf.py, namespace.py). Each workload thread records a request
before issuing it and its answer after, so in kill mode (no recording) a request the crash
interrupted counts as possibly done.
"""
from __future__ import annotations

import errno
import stat
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Protocol

SECTOR = 512
GARBAGE = -1
_MAGIC = b"AFSc"
_HDR = struct.Struct("<4sIQQ")  # magic, file id, sector number in the file, version
_CRC = struct.Struct("<I")
_FILL = SECTOR - _HDR.size - _CRC.size
_ZERO_SECTOR = bytes(SECTOR)
NEVER = 1 << 62  # an answer time for requests that got none


class WorkloadError(Exception):
    """The workload itself failed on a live mount (not a crash-consistency finding)."""


# ----------------------------------------------------------------------- sector format

def encode_sectors(file_id: int, first: int, count: int, version: int) -> bytes:
    """count sectors of version, starting at sector first of the file."""
    fill = (version.to_bytes(8, "little") * (_FILL // 8 + 1))[:_FILL]
    out = bytearray(count * SECTOR)
    for k in range(count):
        hdr = _HDR.pack(_MAGIC, file_id, first + k, version)
        crc = zlib.crc32(fill, zlib.crc32(hdr))
        base = k * SECTOR
        out[base: base + _HDR.size] = hdr
        out[base + _HDR.size: base + _HDR.size + _CRC.size] = _CRC.pack(crc)
        out[base + _HDR.size + _CRC.size: base + SECTOR] = fill
    return bytes(out)


def decode_sector(file_id: int, sector: int, raw: bytes) -> int:
    """The version a sector holds: 0 for zeros, GARBAGE for anything not written whole."""
    if raw == _ZERO_SECTOR:
        return 0
    if len(raw) < SECTOR:
        raw = raw + bytes(SECTOR - len(raw))
        if raw == _ZERO_SECTOR:
            return 0
    magic, fid, num, version = _HDR.unpack_from(raw)
    if magic != _MAGIC or fid != file_id or num != sector or version <= 0:
        return GARBAGE
    (crc,) = _CRC.unpack_from(raw, _HDR.size)
    body = raw[_HDR.size + _CRC.size:]
    if zlib.crc32(body, zlib.crc32(raw[: _HDR.size])) != crc:
        return GARBAGE
    return version


# ----------------------------------------------------------------------- what was read

@dataclass
class FileView:
    """One name in a recovered filesystem."""

    path: str
    kind: str  # "f", "d", "l" or "o" (other)
    ino: int
    size: int
    xattrs: dict[str, bytes]
    data: bytes | None = None
    target: str | None = None


FsView = dict[str, FileView]


@dataclass
class Verdict:
    torn_units: int = 0
    lost_writes: int = 0
    namespace_errors: int = 0
    problems: list[str] = field(default_factory=list)
    # Where (file name, unit) data units were torn or lost a durable write: for pictures.
    torn_at: list[tuple[str, int]] = field(default_factory=list)
    lost_at: set[tuple[str, int]] = field(default_factory=set)

    def note(self, text: str) -> None:
        if len(self.problems) < 8:
            self.problems.append(text)

    @property
    def ok(self) -> bool:
        return not (self.torn_units or self.lost_writes or self.namespace_errors)


class History(Protocol):
    def check(self, view: FsView, t_crash: int) -> Verdict: ...

    def summary(self) -> str: ...


class Workload(Protocol):
    name: str
    ops: int

    def run(self, root: str, seed: int, stop: threading.Event) -> History: ...


def now() -> int:
    return time.monotonic_ns()


def stopped_by_crash(exc: OSError, stop: threading.Event) -> bool:
    """In kill mode the daemon dies under the workload: its errors end the thread."""
    return stop.is_set() or exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def raise_unless_crashed(errors: list[BaseException], stop: threading.Event) -> None:
    for exc in errors:
        if isinstance(exc, OSError) and stopped_by_crash(exc, stop):
            continue
        raise exc


def file_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "o"
