"""Crash-test workloads and their oracles, by family: base (what they share), data
(`units`, `writethrough`, `mixed`, `logfill`), rwf (RWF_ATOMIC through the preload
library), namespace. This module is their registry."""
from __future__ import annotations

from atomicfs.crashtest.workloads.base import Workload
from atomicfs.crashtest.workloads.data import DataWorkload
from atomicfs.crashtest.workloads.namespace import NamespaceWorkload
from atomicfs.crashtest.workloads.rwf import RwfWorkload


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
