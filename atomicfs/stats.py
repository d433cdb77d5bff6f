"""Mount-wide counters reported by `atomicfs stat MOUNTPOINT`."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    atomic_writebacks_hardware: int = 0
    atomic_writebacks_software: int = 0
    atomic_cleared_partial: int = 0
    atomic_strict_rejected: int = 0
    atomic_group_writes: int = 0  # write requests made one write group (whole-write atomic)
    atomic_groups_logged: int = 0  # write groups that went into the log, each in one batch
    atomic_groups_hardware: int = 0  # write groups that went out as one RWF_ATOMIC write
    atomic_writes_announced: int = 0  # RWF_ATOMIC writes announced by the preload library
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
