"""The `rwf` workload: RWF_ATOMIC writes of whole groups of units through the preload
library (`atomicfs run`), and the oracle that a group is all there or not at all."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

from atomicfs.crashtest.workloads.base import SECTOR, FsView, Verdict, WorkloadError, \
    decode_sector
from atomicfs.crashtest.workloads.data import DataHistory, DataWorkload, DataWrite, \
    SyncRequest


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
