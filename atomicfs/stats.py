"""Mount-wide counters and latency histograms reported by `atomicfs stat MOUNTPOINT`."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


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


# ------------------------------------------------------------------ latency histograms

# Bucket b holds durations d with (d - 1).bit_length() == b, i.e. 2**(b-1) < d <= 2**b ns:
# one int operation per sample, and the upper bound of each bucket is exact for the
# Prometheus `le` label. 64 buckets reach 2**63 ns, so no sample needs clamping.
NBUCKETS = 64


class Histogram:
    """Durations of one kind of request in log2 buckets of nanoseconds."""

    __slots__ = ("count", "sum_ns", "max_ns", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.sum_ns = 0
        self.max_ns = 0
        self.buckets = [0] * NBUCKETS

    def add(self, ns: int) -> None:
        self.count += 1
        self.sum_ns += ns
        self.buckets[(ns - 1).bit_length()] += 1
        if ns > self.max_ns:
            self.max_ns = ns

    def as_dict(self) -> dict[str, Any]:
        """count, sum, mean, p50/p90/p99, max in microseconds and the non-empty buckets
        (upper bound in ns -> count) from which later readers derive interval figures."""
        sparse = {str(1 << b): n for b, n in enumerate(self.buckets) if n}
        out = summary(self.count, self.sum_ns, sparse)
        out["max_us"] = round(self.max_ns / 1000, 1)
        for q in ("p50_us", "p90_us", "p99_us"):  # an estimate never above what was seen
            out[q] = min(out[q], out["max_us"])
        return out


class Histograms(dict[str, Histogram]):
    """Histograms by request name, created on first use."""

    def add(self, name: str, ns: int) -> None:
        h = self.get(name)
        if h is None:
            h = self[name] = Histogram()
        # Histogram.add inlined: this runs for every request
        h.count += 1
        h.sum_ns += ns
        h.buckets[(ns - 1).bit_length()] += 1
        if ns > h.max_ns:
            h.max_ns = ns

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: h.as_dict() for name, h in sorted(self.items()) if h.count}


def quantile(buckets: dict[str, int], count: int, q: float) -> float:
    """The q-quantile in ns of sparse buckets (upper bound in ns -> count), interpolated
    linearly inside its bucket; 0 when empty."""
    if count <= 0:
        return 0.0
    rank = q * count
    seen = 0
    for upper, n in sorted((int(k), v) for k, v in buckets.items()):
        if n <= 0:
            continue
        if seen + n >= rank:
            lower = upper // 2 if upper > 1 else 0
            return lower + (upper - lower) * max(0.0, rank - seen) / n
        seen += n
    return float(max((int(k) for k in buckets), default=0))


def summary(count: int, sum_ns: int, buckets: dict[str, int]) -> dict[str, Any]:
    """The JSON form of a histogram (also of a difference of two, see delta)."""
    return {"count": count, "sum_us": round(sum_ns / 1000, 1),
            "mean_us": round(sum_ns / count / 1000, 1) if count else 0.0,
            "p50_us": round(quantile(buckets, count, 0.50) / 1000, 1),
            "p90_us": round(quantile(buckets, count, 0.90) / 1000, 1),
            "p99_us": round(quantile(buckets, count, 0.99) / 1000, 1),
            "buckets_ns": buckets}


def delta(after: dict[str, Any], before: dict[str, Any] | None) -> dict[str, Any]:
    """What a histogram of the JSON form gained between two stats, with its quantiles."""
    if not before:
        return after
    old = before.get("buckets_ns", {})
    buckets = {k: v - old.get(k, 0) for k, v in after.get("buckets_ns", {}).items()
               if v - old.get(k, 0) > 0}
    return summary(after["count"] - before.get("count", 0),
                   round((after["sum_us"] - before.get("sum_us", 0.0)) * 1000), buckets)
