"""The data workloads (`units`, `writethrough`, `mixed`, `logfill`) and their oracle.

They write self-identifying 512-byte sectors (file, sector number, version, CRC32), so
every sector read back names the write it came from, and a sector mixed from two writes
fails its checksum. A unit whose newest write present covered it whole, and which no
partial write touched after that, held an atomic folio from then on: it must read entirely
as that one version (or entirely as an older one). A sector must never be older than the
newest write acknowledged durable (fsync returned, O_DSYNC write returned, sync) before t.
"""
from __future__ import annotations

import errno
import functools
import itertools
import os
import random
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from atomicfs.crashtest.workloads.base import GARBAGE, NEVER, SECTOR, FsView, Verdict, \
    WorkloadError, decode_sector, encode_sectors, now, raise_unless_crashed, \
    stopped_by_crash

XATTR_CONTROL = "user.atomicfs.control"


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
            if not stopped_by_crash(exc, stop):
                raise
            return self.history(names, self.unit, writes, syncs)  # killed at the start
        versions = itertools.count(1)
        threads = _Threads()
        for w in range(self.writers):
            rng = random.Random(f"{seed}:{self.name}:{w}")
            threads.start(functools.partial(self._writer, root, names, w, rng, versions,
                                            writes, syncs, stop), f"writer{w}")
        threads.join()
        raise_unless_crashed(threads.errors, stop)
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
                    if stopped_by_crash(exc, stop):
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
            req = SyncRequest(file_id, now())
            syncs.append(req)
            os.fsync(fds[file_id])
            req.t_end = now()
            return
        if w == 0 and r < self.sync_share + 0.03:
            self._background(root, rng, syncs)
            return
        first, count = self._pick_range(rng, region)
        version = next(versions)
        data = encode_sectors(file_id, first, count, version)
        dsync = self._dsync(rng)
        write = DataWrite(version, file_id, first, count, now(), dsync=dsync)
        writes.append(write)
        n = self._write(fds[file_id], data, first * SECTOR, dsync)
        if n != len(data):
            # The kernel splits a write into requests; when the daemon dies between them
            # it returns what the first ones wrote. Only those sectors may be there.
            write.count = n // SECTOR
            raise OSError(errno.EIO, f"short write {n} of {len(data)}")
        write.t_end = now()

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
            req = SyncRequest(None, now())
            syncs.append(req)
            _control(root, "sync")
            req.t_end = now()
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
