"""Crash-test workloads and their oracles.

A workload runs against a real mount and keeps a *history*: what it asked for, when each
request started and when it was answered, on the monotonic clock that the device recorder
also uses. After a crash at time t the history says what the filesystem may hold:

* data workloads (`units`, `writethrough`, `mixed`) write self-identifying 512-byte sectors
  (file, sector number, version, CRC32), so every sector read back names the write it came
  from, and a sector mixed from two writes fails its checksum. A unit whose newest write
  present covered it whole, and which no partial write touched after that, held an atomic
  folio from then on: it must read entirely as that one version (or entirely as an older
  one). A sector must never be older than the newest write acknowledged durable (fsync
  returned, O_DSYNC write returned, sync) before t;
* the `namespace` workload is one thread of single-request operations, so the namespace
  after a crash must be the model's state after some prefix of them: not before the last
  operation made durable by an fsync before t, not after the last one started before t.

Each workload thread records a request before issuing it and its answer after, so in kill
mode (no recording) a request the crash interrupted counts as possibly done.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import logging
import os
import random
import stat
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

log = logging.getLogger(__name__)

SECTOR = 512
GARBAGE = -1
_MAGIC = b"AFSc"
_HDR = struct.Struct("<4sIQQ")  # magic, file id, sector number in the file, version
_CRC = struct.Struct("<I")
_FILL = SECTOR - _HDR.size - _CRC.size
_ZERO_SECTOR = bytes(SECTOR)
XATTR_CONTROL = "user.atomicfs.control"
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


# ------------------------------------------------------------------- data workloads

@dataclass
class DataWrite:
    version: int
    file_id: int
    first: int  # first sector
    count: int  # sectors
    t_start: int
    t_end: int = NEVER  # NEVER: no answer came (killed)
    dsync: bool = False


@dataclass
class SyncRequest:
    file_id: int | None  # None: the whole filesystem
    t_start: int
    t_end: int = NEVER


@dataclass
class _UnitWrite:
    k: int  # position in the unit's history
    version: int
    lo: int  # first sector within the unit
    hi: int  # end sector within the unit
    whole: bool
    t_start: int
    ack: int  # time the write was known durable (NEVER if it never was)


class DataHistory:
    """The data writes and syncs of a run, and the untorn/durable oracle over them."""

    def __init__(self, files: dict[int, str], unit: int, writes: list[DataWrite],
                 syncs: list[SyncRequest]) -> None:
        self.files = files
        self.unit = unit
        self.spu = unit // SECTOR  # sectors per unit
        self.writes = sorted(writes, key=lambda w: w.t_start)
        self.syncs = syncs
        self.units: dict[tuple[int, int], list[_UnitWrite]] = {}
        self._index_units()

    def _ack_times(self) -> dict[int, int]:
        """When each write was known durable: its own return for O_DSYNC, else the end of
        the earliest-ending sync of its file (or of everything) that started after it
        returned."""
        by_file: dict[int | None, list[SyncRequest]] = {}
        for s in self.syncs:
            if s.t_end != NEVER:
                by_file.setdefault(s.file_id, []).append(s)
        acks = {}
        for w in self.writes:
            best = w.t_end if w.dsync else NEVER
            if w.t_end != NEVER:
                for s in by_file.get(w.file_id, []) + by_file.get(None, []):
                    if s.t_start > w.t_end and s.t_end < best:
                        best = s.t_end
            acks[w.version] = best
        return acks

    def _index_units(self) -> None:
        acks = self._ack_times()
        for w in self.writes:
            end = w.first + w.count
            u = w.first // self.spu
            while u * self.spu < end:
                lo = max(w.first, u * self.spu) - u * self.spu
                hi = min(end, (u + 1) * self.spu) - u * self.spu
                lst = self.units.setdefault((w.file_id, u), [])
                lst.append(_UnitWrite(len(lst), w.version, lo, hi,
                                      lo == 0 and hi == self.spu, w.t_start,
                                      acks[w.version]))
                u += 1

    def summary(self) -> str:
        acked = sum(1 for u in self.units.values() for w in u if w.ack != NEVER)
        return (f"{len(self.writes)} writes, {len(self.syncs)} syncs, {len(self.units)} "
                f"units, {acked} unit writes acknowledged durable")

    def check(self, view: FsView, t_crash: int) -> Verdict:
        v = Verdict()
        lost: set[int] = set()
        for file_id, name in self.files.items():
            fv = view.get(name)
            data = (fv.data or b"") if fv is not None and fv.kind == "f" else b""
            nunits = max([u + 1 for (f, u) in self.units if f == file_id] +
                         [(len(data) + self.unit - 1) // self.unit])
            for u in range(nunits):
                raw = data[u * self.unit: (u + 1) * self.unit]
                self._check_unit(file_id, name, u, raw, t_crash, v, lost)
        v.lost_writes = len(lost)
        return v

    def _check_unit(self, file_id: int, name: str, u: int, raw: bytes, t: int,
                    v: Verdict, lost: set[int]) -> None:
        history = self.units.get((file_id, u), [])
        pos = {w.version: w for w in history}
        ks: list[int] = []
        bad = None
        for j in range(self.spu):
            sector = u * self.spu + j
            ver = decode_sector(file_id, sector, raw[j * SECTOR: (j + 1) * SECTOR])
            if ver == GARBAGE:
                bad = f"sector {j} is garbage"
                break
            if ver == 0:
                ks.append(-1)
                continue
            w = pos.get(ver)
            if w is None or not w.lo <= j < w.hi or w.t_start >= t:
                bad = f"sector {j} holds version {ver}, never written there before the crash"
                break
            ks.append(w.k)
        where = f"{name} unit {u}"
        if bad is not None:
            v.torn_units += 1
            v.torn_at.append((name, u))
            v.note(f"{where}: torn: {bad}")
            return
        kmax = max(ks)
        if kmax >= 0 and history[kmax].whole and \
                not any(not w.whole and w.t_start < t for w in history[kmax + 1:]) and \
                any(k != kmax for k in ks):
            v.torn_units += 1
            v.torn_at.append((name, u))
            versions = sorted({history[k].version if k >= 0 else 0 for k in ks})
            v.note(f"{where}: torn: mixes versions {versions} of an atomic unit")
            return
        required = [-1] * self.spu  # per sector: the newest write durable before t
        for w in history:
            if w.ack < t:
                required[w.lo: w.hi] = [w.k] * (w.hi - w.lo)
        for j, need in enumerate(required):
            if ks[j] < need:
                w = history[need]
                lost.add(w.version)
                v.lost_at.add((name, u))
                have = history[ks[j]].version if ks[j] >= 0 else 0
                v.note(f"{where}: lost: version {w.version} was durable, sector {j} "
                       f"holds {have}")


def _now() -> int:
    return time.monotonic_ns()


class _Threads:
    """Run workload threads; collect their first exception."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def start(self, fn: Callable[[], None], name: str) -> None:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by join
                self.errors.append(exc)
        t = threading.Thread(target=body, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join()


def _control(root: str, command: str) -> None:
    os.setxattr(root, XATTR_CONTROL, command.encode())


def _stopped_by_crash(exc: OSError, stop: threading.Event) -> bool:
    """In kill mode the daemon dies under the workload: its errors end the thread."""
    return stop.is_set() or exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)


@dataclass
class DataWorkload:
    """Writers on shared files of atomic units; each writer owns a contiguous region of
    every file, so that the writes to one unit are ordered."""

    name: str
    ops: int = 120  # per writer
    writers: int = 4
    files: int = 3
    units_per_writer: int = 12
    unit: int = 16 << 10
    dsync: bool = False  # write-through: every write acknowledged on return
    partial_share: float = 0.0  # share of writes not aligned to units (mixed)
    sync_share: float = 0.08
    max_units: int = 3

    def file_names(self) -> dict[int, str]:
        return {i + 1: f"{self.name}{i}.dat" for i in range(self.files)}

    def run(self, root: str, seed: int, stop: threading.Event) -> DataHistory:
        names = self.file_names()
        writes: list[DataWrite] = []
        syncs: list[SyncRequest] = []
        try:
            self._create_files(root, names)
        except OSError as exc:
            if not _stopped_by_crash(exc, stop):
                raise
            return self.history(names, self.unit, writes, syncs)  # killed at the start
        versions = itertools.count(1)
        threads = _Threads()
        for w in range(self.writers):
            rng = random.Random(f"{seed}:{self.name}:{w}")
            threads.start(functools.partial(self._writer, root, names, w, rng, versions,
                                            writes, syncs, stop), f"writer{w}")
        threads.join()
        _raise_unless_crashed(threads.errors, stop)
        return self.history(names, self.unit, writes, syncs)

    @staticmethod
    def history(files: dict[int, str], unit: int, writes: list[DataWrite],
                syncs: list[SyncRequest]) -> "DataHistory":
        return DataHistory(files, unit, writes, syncs)

    def _create_files(self, root: str, names: dict[int, str]) -> None:
        for i, name in names.items():
            path = os.path.join(root, name)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
            if self.dsync and i == 1:  # one file is write-through by attribute, not flag
                os.setxattr(path, "user.atomicfs.writethrough", b"1")

    def _open(self, root: str, names: dict[int, str]) -> dict[int, int]:
        flags = os.O_RDWR | (os.O_DSYNC if self.dsync else 0)
        fds = {}
        for i, name in names.items():
            fl = os.O_RDWR if self.dsync and i == 1 else flags
            fds[i] = os.open(os.path.join(root, name), fl)
        return fds

    def _writer(self, root: str, names: dict[int, str], w: int, rng: random.Random,
                versions: Iterator[int], writes: list[DataWrite],
                syncs: list[SyncRequest], stop: threading.Event) -> None:
        fds = self._open(root, names)
        spu = self.unit // SECTOR
        region = (w * self.units_per_writer * spu, (w + 1) * self.units_per_writer * spu)
        try:
            for op in range(self.ops):
                if stop.is_set():
                    return
                try:
                    self._one_op(root, fds, w, op, rng, versions, writes, syncs, region)
                except OSError as exc:
                    if _stopped_by_crash(exc, stop):
                        return
                    raise WorkloadError(f"writer {w}: {exc}") from exc
        finally:
            for fd in fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _one_op(self, root: str, fds: dict[int, int], w: int, op: int, rng: random.Random,
                versions: Iterator[int], writes: list[DataWrite], syncs: list[SyncRequest],
                region: tuple[int, int]) -> None:
        file_id = rng.choice(sorted(fds))
        r = rng.random()
        if r < self.sync_share:
            req = SyncRequest(file_id, _now())
            syncs.append(req)
            os.fsync(fds[file_id])
            req.t_end = _now()
            return
        if w == 0 and r < self.sync_share + 0.03:
            self._background(root, rng, syncs)
            return
        first, count = self._pick_range(rng, region)
        version = next(versions)
        data = encode_sectors(file_id, first, count, version)
        dsync = self._dsync(rng)
        write = DataWrite(version, file_id, first, count, _now(), dsync=dsync)
        writes.append(write)
        n = self._write(fds[file_id], data, first * SECTOR, dsync)
        if n != len(data):
            # The kernel splits a write into requests; when the daemon dies between them
            # it returns what the first ones wrote. Only those sectors may be there.
            write.count = n // SECTOR
            raise OSError(errno.EIO, f"short write {n} of {len(data)}")
        write.t_end = _now()

    def _dsync(self, rng: random.Random) -> bool:
        """Whether the next write is acknowledged durable on return."""
        return self.dsync

    def _write(self, fd: int, data: bytes, off: int, dsync: bool) -> int:
        return os.pwrite(fd, data, off)

    def _background(self, root: str, rng: random.Random, syncs: list[SyncRequest]) -> None:
        """Stir the machinery: checkpoints move logged units home, flush starts background
        writeback, sync writes everything (and acknowledges it)."""
        command = rng.choice(("checkpoint", "flush", "sync"))
        if command == "sync":
            req = SyncRequest(None, _now())
            syncs.append(req)
            _control(root, "sync")
            req.t_end = _now()
        else:
            _control(root, command)

    def _pick_range(self, rng: random.Random, region: tuple[int, int]) -> tuple[int, int]:
        """A unit-aligned run of whole units, or (mixed) any sector-aligned range."""
        spu = self.unit // SECTOR
        lo, hi = region
        if rng.random() < self.partial_share:
            first = rng.randrange(lo, hi - 1)
            count = rng.randint(1, min(hi - first, 3 * spu))
            return first, count
        n = rng.randint(1, self.max_units)
        units = (hi - lo) // spu
        start = rng.randrange(0, units - n + 1)
        return lo + start * spu, n * spu


# ------------------------------------------------ RWF_ATOMIC through the preload library

RWF_DSYNC = 0x2
RWF_ATOMIC = 0x40
PRELOAD_NAME = "libatomicfs-preload.so"


def preload_active() -> bool:
    """Is the preload library loaded in this process (`atomicfs run`)?"""
    try:
        with open("/proc/self/maps") as f:
            return PRELOAD_NAME in f.read()
    except OSError:
        return False


class WholeWriteHistory(DataHistory):
    """The data oracle plus whole-write untornness: a write of k units issued as one
    RWF_ATOMIC write is all there or not at all, so if any sector holds it, every sector
    of its range holds it or a later write of that sector."""

    def check(self, view: FsView, t_crash: int) -> Verdict:
        v = super().check(view, t_crash)
        by_version = {w.version: w for w in self.writes}
        for file_id, name in self.files.items():
            fv = view.get(name)
            data = (fv.data or b"") if fv is not None and fv.kind == "f" else b""
            for w in self.writes:
                if w.file_id != file_id or w.t_start >= t_crash or w.count <= self.spu:
                    continue  # one unit: the per-unit check covers it
                held = [decode_sector(file_id, s, data[s * SECTOR: (s + 1) * SECTOR])
                        for s in range(w.first, w.first + w.count)]
                if w.version not in held:
                    continue
                older = [ver for ver in held if ver != w.version and
                         (ver not in by_version or by_version[ver].t_start < w.t_start)]
                if older:
                    v.torn_units += 1
                    v.note(f"{name}: write {w.version} of {w.count // self.spu} units at "
                           f"sector {w.first} torn as a whole: also holds "
                           f"{sorted(set(older))[:4]}")
        return v


@dataclass
class RwfWorkload(DataWorkload):
    """Writers issuing pwritev2(RWF_ATOMIC) of 1..64 units (powers of two, aligned to
    their length, as the kernel requires), some with RWF_DSYNC, through the preload
    library; one file has the atomic unit, the other none (the announcement alone makes
    its writes atomic)."""

    writers: int = 2
    files: int = 2
    units_per_writer: int = 64
    max_units: int = 64
    dsync_share: float = 0.15

    def _create_files(self, root: str, names: dict[int, str]) -> None:
        if not preload_active():
            raise WorkloadError(f"the {self.name} workload needs the preload library "
                                "(run the explorer under `atomicfs run --`)")
        super()._create_files(root, names)
        os.setxattr(os.path.join(root, names[2]), "user.atomicfs.atomic_unit", b"0")

    def _dsync(self, rng: random.Random) -> bool:
        return rng.random() < self.dsync_share

    def _write(self, fd: int, data: bytes, off: int, dsync: bool) -> int:
        return os.pwritev(fd, [data], off, RWF_ATOMIC | (RWF_DSYNC if dsync else 0))

    def _pick_range(self, rng: random.Random, region: tuple[int, int]) -> tuple[int, int]:
        """k = 2^e units (small ones more often), at a unit offset aligned to k."""
        spu = self.unit // SECTOR
        lo, hi = region
        units = (hi - lo) // spu
        e = min(rng.choice((0, 0, 1, 1, 2, 3, 4, 5, 6)), (self.max_units.bit_length() - 1))
        k = 1 << e
        start = rng.randrange(0, units // k) * k
        return lo + start * spu, k * spu

    @staticmethod
    def history(files: dict[int, str], unit: int, writes: list[DataWrite],
                syncs: list[SyncRequest]) -> DataHistory:
        return WholeWriteHistory(files, unit, writes, syncs)


def _raise_unless_crashed(errors: list[BaseException], stop: threading.Event) -> None:
    for exc in errors:
        if isinstance(exc, OSError) and _stopped_by_crash(exc, stop):
            continue
        raise exc


# ------------------------------------------------------------------ namespace workload

@dataclass
class _Node:
    kind: str  # "f", "d", "l"
    size: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    target: str = ""


class NamespaceModel:
    """What the namespace should look like: paths to node ids, nodes to attributes."""

    def __init__(self) -> None:
        self.paths: dict[str, int] = {}
        self.nodes: dict[int, _Node] = {}
        self._next_id = 1

    def peek_id(self) -> int:
        """The id the next add will use."""
        return self._next_id

    def add(self, path: str, node: _Node) -> int:
        nid = self._next_id
        self._next_id += 1
        self.nodes[nid] = node
        self.paths[path] = nid
        return nid

    def files(self) -> list[str]:
        return [p for p, n in self.paths.items() if self.nodes[n].kind == "f"]

    def dirs(self) -> list[str]:
        return [""] + [p for p, n in self.paths.items() if self.nodes[n].kind == "d"]

    def children(self, d: str) -> list[str]:
        prefix = d + "/" if d else ""
        return [p for p in self.paths if p.startswith(prefix) and "/" not in p[len(prefix):]]

    def remove_path(self, path: str) -> None:
        nid = self.paths.pop(path)
        if nid not in self.paths.values():
            del self.nodes[nid]

    def rename(self, src: str, dst: str) -> None:
        if dst in self.paths:
            self.remove_path(dst)
        moved = {p: n for p, n in self.paths.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.paths[p]
        for p, n in moved.items():
            self.paths[dst + p[len(src):]] = n

    def canonical(self) -> NsState:
        """The state as the oracle compares it: the shape of the tree (names, kinds, links,
        xattrs, targets) as one digest, and each file's id and size beside it, because a
        crash may legitimately recover a file shorter than it was (see NamespaceHistory)."""
        digest = canonical_digest(
            (p, n.kind, 0, n.xattrs, n.target, nid)
            for p, nid in self.paths.items() for n in [self.nodes[nid]])
        files = {p: (nid, self.nodes[nid].size) for p, nid in self.paths.items()
                 if self.nodes[nid].kind == "f"}
        return NsState(digest, files)


@dataclass
class NsState:
    digest: str
    files: dict[str, tuple[int, int]]  # path -> (node id, size)


def canonical_digest(entries: Iterable[tuple[str, str, int, dict[str, bytes], str, int]]
                     ) -> str:
    """A digest of a namespace that ignores inode numbers but keeps which names share an
    inode. Only the workload's own xattrs (user.t.*) count."""
    groups: dict[int, list[tuple[str, str, int, dict[str, bytes], str]]] = {}
    for path, kind, size, xattrs, target, ident in entries:
        mine = {k: v for k, v in xattrs.items() if k.startswith("user.t.")}
        groups.setdefault(ident, []).append((path, kind, size if kind == "f" else 0, mine,
                                             target))
    items = []
    for members in groups.values():
        paths = tuple(sorted(m[0] for m in members))
        _, kind, size, xattrs, target = members[0]
        items.append((paths, kind, size, tuple(sorted(xattrs.items())), target))
    return hashlib.sha1(repr(sorted(items)).encode()).hexdigest()


@dataclass
class NsOp:
    what: str
    t_start: int
    t_end: int = NEVER
    touched: frozenset[int] = frozenset()  # node ids (0: the root directory)
    fsync_of: int | None = None  # node id made durable (-1: everything)


class NamespaceHistory:
    """The states a namespace workload went through, and which of them a crash may leave.

    The tree's shape must be exactly one state between the last durable one and the last
    operation started. A file's size may be shorter than that state's: like ext4's
    i_disksize, the recorded size grows only as data reaches the device, so a write not
    made durable may be lost from the end of the file (never read back as zeros). It
    may not be shorter than the smallest size the file had since its last fsync."""

    def __init__(self, ops: list[NsOp], states: list[NsState]) -> None:
        self.ops = ops  # op i leads from state i to state i + 1
        self.states = states  # states[i]: the state after i operations
        self.by_digest: dict[str, list[int]] = {}
        for i, st in enumerate(states):
            self.by_digest.setdefault(st.digest, []).append(i)
        self._required = self._durable_requirements()
        self._sizes = [{nid: size for nid, size in st.files.values()} for st in states]

    def _durable_requirements(self) -> list[tuple[int, int, int]]:
        """(ack time, minimum state index, node id or -1) for each fsync: the state must
        include every earlier operation that touched what the fsync made durable."""
        out = []
        last_touch: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            if op.fsync_of is not None and op.t_end != NEVER:
                if op.fsync_of == -1:
                    need = i
                else:
                    need = last_touch.get(op.fsync_of, 0)
                out.append((op.t_end, need, op.fsync_of))
            for nid in op.touched:
                last_touch[nid] = i + 1
        return out

    def _size_problem(self, view: FsView, k: int, t_crash: int) -> tuple[str, bool] | None:
        """Why the files' sizes cannot be those of state k after a crash at t_crash (and
        whether that loses durable data), or None when they can."""
        for path, (nid, size) in self.states[k].files.items():
            got = view[path].size
            if got > size:
                return f"{path} has {got} bytes, more than the {size} of state {k}", False
            if got == size:
                continue
            durable = max((need for t, need, of in self._required
                           if t < t_crash and of in (nid, -1)), default=0)
            floor = min((self._sizes[s].get(nid, size) for s in range(durable, k + 1)),
                        default=0) if durable else 0
            if got < floor:
                return (f"{path} has {got} bytes, fewer than the {floor} made durable by "
                        f"fsync"), True
        return None

    def summary(self) -> str:
        return f"{len(self.ops)} namespace operations, {len(self._required)} fsyncs"

    def check(self, view: FsView, t_crash: int) -> Verdict:
        v = Verdict()
        digest = view_digest(view)
        started = sum(1 for op in self.ops if op.t_start < t_crash)
        need = max([n for t, n, _ in self._required if t < t_crash], default=0)
        matches = self.by_digest.get(digest, [])
        problems = [self._size_problem(view, k, t_crash) for k in matches
                    if need <= k <= started]
        if problems and None in problems:
            return v
        if problems:
            note, lost = problems[-1]  # type: ignore[misc]
            if lost:
                v.lost_writes = 1
            else:
                v.namespace_errors = 1
            v.note(f"namespace: {note}")
            return v
        if any(k < need for k in matches):
            v.lost_writes = 1
            v.note(f"namespace is the state after {max(matches)} operations, but "
                   f"{need} were durable")
        else:
            v.namespace_errors = 1
            where = (f"matches only states {matches}" if matches else
                     "matches no state the workload went through")
            v.note(f"namespace {where} (allowed {need}..{started} of {len(self.ops)})")
        return v


def view_digest(view: FsView) -> str:
    return canonical_digest((fv.path, fv.kind, 0, fv.xattrs, fv.target or "", fv.ino)
                            for fv in view.values())


@dataclass
class _Step:
    """What one namespace operation needs: where, the model, the choices it draws from."""

    root: str
    model: NamespaceModel
    rng: random.Random
    ops: list[NsOp]
    files: list[str]
    dirs: list[str]


@dataclass
class NamespaceWorkload:
    name: str = "namespace"
    ops: int = 300

    def run(self, root: str, seed: int, stop: threading.Event) -> NamespaceHistory:
        rng = random.Random(f"{seed}:namespace")
        model = NamespaceModel()
        ops: list[NsOp] = []
        states = [model.canonical()]
        for _ in range(self.ops):
            if stop.is_set():
                break
            before = len(ops)
            try:
                self._one_op(root, model, rng, ops)
            except OSError as exc:
                if not _stopped_by_crash(exc, stop):
                    raise WorkloadError(f"namespace op {ops[-1].what if ops else '?'}: "
                                        f"{exc}") from exc
                if len(ops) > before:  # the interrupted operation may have happened
                    states.append(model.canonical())
                break
            states.append(model.canonical())
        return NamespaceHistory(ops, states)

    def _one_op(self, root: str, model: NamespaceModel, rng: random.Random,
                ops: list[NsOp]) -> bool:
        """Pick a valid operation, do it, apply it to the model; False if none fits."""
        files, dirs = model.files(), model.dirs()
        choices = ["create", "mkdir", "symlink"]
        if files:
            choices += ["write", "write", "truncate", "link", "rename", "unlink", "setxattr",
                        "removexattr", "fsync", "fsync"]
        if len(dirs) > 1:
            choices += ["rmdir", "rename_dir", "fsyncdir"]
        what = rng.choice(choices)
        step: Callable[[_Step], bool] = getattr(self, f"_op_{what}")
        return step(_Step(root, model, rng, ops, files, dirs))

    @staticmethod
    def _abs(root: str, rel: str) -> str:
        return os.path.join(root, rel) if rel else root

    @staticmethod
    def _new_name(model: NamespaceModel, rng: random.Random, d: str, prefix: str) -> str:
        while True:
            name = f"{prefix}{rng.randrange(1000)}"
            path = f"{d}/{name}" if d else name
            if path not in model.paths:
                return path

    @staticmethod
    def _parent_id(model: NamespaceModel, path: str) -> int:
        parent = path.rpartition("/")[0]
        return model.paths[parent] if parent else 0

    def _do(self, ops: list[NsOp], what: str, touched: Iterable[int],
            change: Callable[[], object], call: Callable[[], object],
            fsync_of: int | None = None) -> bool:
        """Record the operation, apply it to the model, then issue it: if a crash cuts
        the call short, the model already holds the state it may have produced."""
        op = NsOp(what, _now(), touched=frozenset(touched), fsync_of=fsync_of)
        ops.append(op)
        change()
        call()
        op.t_end = _now()
        return True

    def _op_create(self, c: _Step) -> bool:
        path = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "f")
        parent = self._parent_id(c.model, path)
        return self._do(c.ops, f"create {path}", [parent, c.model.peek_id()],
                        lambda: c.model.add(path, _Node("f")),
                        lambda: os.close(os.open(self._abs(c.root, path),
                                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                                 0o644)))

    def _op_mkdir(self, c: _Step) -> bool:
        path = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "d")
        parent = self._parent_id(c.model, path)
        return self._do(c.ops, f"mkdir {path}", [parent, c.model.peek_id()],
                        lambda: c.model.add(path, _Node("d")),
                        lambda: os.mkdir(self._abs(c.root, path)))

    def _op_symlink(self, c: _Step) -> bool:
        path = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "l")
        target = f"target{c.rng.randrange(100)}"
        parent = self._parent_id(c.model, path)
        return self._do(c.ops, f"symlink {path}", [parent, c.model.peek_id()],
                        lambda: c.model.add(path, _Node("l", target=target)),
                        lambda: os.symlink(target, self._abs(c.root, path)))

    def _op_write(self, c: _Step) -> bool:
        path = c.rng.choice(c.files)
        nid = c.model.paths[path]
        node = c.model.nodes[nid]
        off = c.rng.choice((node.size, c.rng.randrange(node.size + 1), 0))
        data = c.rng.randbytes(c.rng.choice((100, 4096, 20000, 70000)))
        fd = os.open(self._abs(c.root, path), os.O_WRONLY)
        try:
            def grow() -> None:
                node.size = max(node.size, off + len(data))
            return self._do(c.ops, f"write {path} {off}+{len(data)}", [nid], grow,
                            lambda: os.pwrite(fd, data, off))
        finally:
            os.close(fd)

    def _op_truncate(self, c: _Step) -> bool:
        path = c.rng.choice(c.files)
        nid = c.model.paths[path]
        node = c.model.nodes[nid]
        size = c.rng.choice((0, c.rng.randrange(100000), node.size // 2))

        def resize() -> None:
            node.size = size
        return self._do(c.ops, f"truncate {path} {size}", [nid], resize,
                        lambda: os.truncate(self._abs(c.root, path), size))

    def _op_link(self, c: _Step) -> bool:
        src = c.rng.choice(c.files)
        dst = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "h")
        nid = c.model.paths[src]

        def add_name() -> None:
            c.model.paths[dst] = nid
        return self._do(c.ops, f"link {src} {dst}", [nid, self._parent_id(c.model, dst)],
                        add_name, lambda: os.link(self._abs(c.root, src), self._abs(c.root, dst)))

    def _op_rename(self, c: _Step) -> bool:
        src = c.rng.choice(c.files)
        if c.rng.random() < 0.4 and len(c.files) > 1:
            dst = c.rng.choice([f for f in c.files if f != src])
        else:
            dst = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "r")
        touched = {c.model.paths[src], self._parent_id(c.model, src), self._parent_id(c.model, dst)}
        if dst in c.model.paths:
            touched.add(c.model.paths[dst])

        def move() -> None:
            if c.model.paths.get(dst) != c.model.paths[src]:  # links of one inode: no-op
                c.model.rename(src, dst)
        return self._do(c.ops, f"rename {src} {dst}", touched, move,
                        lambda: os.rename(self._abs(c.root, src), self._abs(c.root, dst)))

    def _op_rename_dir(self, c: _Step) -> bool:
        src = c.rng.choice(c.dirs[1:])
        parents = [d for d in c.dirs if d != src and not d.startswith(src + "/")]
        dst = self._new_name(c.model, c.rng, c.rng.choice(parents), "m")
        touched = {c.model.paths[src], self._parent_id(c.model, src), self._parent_id(c.model, dst)}
        return self._do(c.ops, f"rename {src} {dst}", touched, lambda: c.model.rename(src, dst),
                        lambda: os.rename(self._abs(c.root, src), self._abs(c.root, dst)))

    def _op_unlink(self, c: _Step) -> bool:
        path = c.rng.choice(c.files + [p for p, n in c.model.paths.items()
                                   if c.model.nodes[n].kind == "l"])
        touched = [c.model.paths[path], self._parent_id(c.model, path)]
        return self._do(c.ops, f"unlink {path}", touched, lambda: c.model.remove_path(path),
                        lambda: os.unlink(self._abs(c.root, path)))

    def _op_rmdir(self, c: _Step) -> bool:
        empty = [d for d in c.dirs[1:] if not c.model.children(d)]
        if not empty:
            return self._op_mkdir(c)
        path = c.rng.choice(empty)
        touched = [c.model.paths[path], self._parent_id(c.model, path)]
        return self._do(c.ops, f"rmdir {path}", touched, lambda: c.model.remove_path(path),
                        lambda: os.rmdir(self._abs(c.root, path)))

    def _op_setxattr(self, c: _Step) -> bool:
        path = c.rng.choice(c.files + c.dirs[1:])
        nid = c.model.paths[path]
        name = f"user.t.{c.rng.randrange(4)}"
        value = c.rng.randbytes(c.rng.randrange(1, 60))

        def put() -> None:
            c.model.nodes[nid].xattrs[name] = value
        return self._do(c.ops, f"setxattr {path} {name}", [nid], put,
                        lambda: os.setxattr(self._abs(c.root, path), name, value))

    def _op_removexattr(self, c: _Step) -> bool:
        have = [(p, k) for p in c.files + c.dirs[1:]
                for k in c.model.nodes[c.model.paths[p]].xattrs]
        if not have:
            return self._op_setxattr(c)
        path, name = c.rng.choice(have)
        nid = c.model.paths[path]
        return self._do(c.ops, f"removexattr {path} {name}", [nid],
                        lambda: c.model.nodes[nid].xattrs.pop(name),
                        lambda: os.removexattr(self._abs(c.root, path), name))

    def _op_fsync(self, c: _Step) -> bool:
        path = c.rng.choice(c.files)
        fd = os.open(self._abs(c.root, path), os.O_RDONLY)
        try:
            return self._do(c.ops, f"fsync {path}", [], lambda: None, lambda: os.fsync(fd),
                            fsync_of=c.model.paths[path])
        finally:
            os.close(fd)

    def _op_fsyncdir(self, c: _Step) -> bool:
        path = c.rng.choice(c.dirs)
        fd = os.open(self._abs(c.root, path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._do(c.ops, f"fsyncdir {path or '/'}", [], lambda: None,
                            lambda: os.fsync(fd), fsync_of=c.model.paths[path] if path else 0)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- registry

def make_workload(name: str, unit: int, scale: float = 1.0) -> Workload:
    """The workloads by name; scale multiplies the number of operations."""
    def n(ops: int) -> int:
        return max(1, int(ops * scale))
    if name == "units":
        return DataWorkload("units", ops=n(120), unit=unit)
    if name == "writethrough":
        return DataWorkload("writethrough", ops=n(60), unit=unit, dsync=True,
                            sync_share=0.0)
    if name == "mixed":
        return DataWorkload("mixed", ops=n(120), unit=unit, partial_share=0.4,
                            writers=3)
    if name == "namespace":
        return NamespaceWorkload(ops=n(300))
    if name == "logfill":
        # Writes of up to 8 units, many fsyncs: about twice the 16 MiB log of the 256 MiB
        # image goes through the log, so it fills and is checkpointed again and again
        # while the crash points fall (issue 17).
        return DataWorkload("logfill", ops=n(200), unit=unit, max_units=8,
                            units_per_writer=24, files=2, sync_share=0.2)
    if name == "rwf":
        return RwfWorkload("rwf", ops=n(80), unit=unit)
    raise ValueError(f"unknown workload {name!r} ({', '.join(WORKLOADS)})")


WORKLOADS = ("units", "writethrough", "namespace", "mixed", "logfill", "rwf")


def file_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "f"
    if stat.S_ISDIR(mode):
        return "d"
    if stat.S_ISLNK(mode):
        return "l"
    return "o"
