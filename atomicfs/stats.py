"""Mount-wide counters reported by `atomicfs stat MOUNTPOINT`."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    atomic_writebacks_hardware: int = 0
    atomic_writebacks_software: int = 0
    atomic_cleared_partial: int = 0
    atomic_strict_rejected: int = 0
    writethrough_writes: int = 0
    stable_waits: int = 0
    stable_wait_ns: int = 0
    writeback_errors: int = 0
    writeback_ios: int = 0
    writeback_bytes: int = 0
    log_batches: int = 0
    log_bytes: int = 0
    checkpoints: int = 0
    checkpoint_absorbed: int = 0  # log batches a checkpoint wrote home for want of log space
    throttle_waits: int = 0
    cache_evictions: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
