"""The latency histograms of atomicfs.stats and their views in atomicfs.statview, on
synthetic samples (the mount tests check them on real requests)."""
from __future__ import annotations

from atomicfs.stats import Histograms, delta, quantile
from atomicfs.statview import prometheus, text_view


def test_buckets_have_exact_upper_bounds() -> None:
    h = Histograms()
    for ns in (1, 2, 3, 4, 1024, 1025, 2048):
        h.add("op", ns)
    d = h["op"].as_dict()
    # bucket 2**b holds 2**(b-1) < ns <= 2**b
    assert d["buckets_ns"] == {"1": 1, "2": 1, "4": 2, "1024": 1, "2048": 2}
    assert d["count"] == 7 and d["max_us"] == 2.0
    assert d["p50_us"] <= d["p99_us"] <= d["max_us"]


def test_quantiles_interpolate_inside_a_bucket() -> None:
    buckets = {"1024": 50, "2048": 50}
    assert quantile(buckets, 100, 0.5) == 1024
    assert 1024 < quantile(buckets, 100, 0.75) < 2048
    assert quantile(buckets, 100, 1.0) == 2048
    assert quantile({}, 0, 0.5) == 0


def test_delta_is_what_an_interval_added() -> None:
    h = Histograms()
    for _ in range(10):
        h.add("w", 1000)
    before = h["w"].as_dict()
    for _ in range(5):
        h.add("w", 100_000)
    d = delta(h["w"].as_dict(), before)
    assert d["count"] == 5 and d["buckets_ns"] == {"131072": 5}
    assert 65.5 < d["p50_us"] <= 131.1 and abs(d["sum_us"] - 500) < 0.2


def _data(h: Histograms) -> dict:
    return {"pid": 1, "device": {"path": "/dev/x", "atomic_path": "software"},
            "counters": {}, "cache": {"bytes": 0, "limit": 1, "dirty_bytes": 0,
                                      "writeback_bytes": 0},
            "latency": {"fuse": h.as_dict(), "device": {}, "jobs": {}}}


def test_prometheus_histogram_is_cumulative() -> None:
    h = Histograms()
    for ns in (500, 5000, 50_000, 10**12):
        h.add("write", ns)
    text = prometheus("/m", _data(h))
    lines = [ln for ln in text.splitlines() if "fuse_request_duration_seconds" in ln]
    assert lines[1] == "# TYPE atomicfs_fuse_request_duration_seconds histogram"
    buckets = [ln for ln in lines if "_bucket{" in ln]
    counts = [int(ln.rsplit(" ", 1)[1]) for ln in buckets]
    assert counts == sorted(counts) and counts[0] == 1  # le=1.024e-06 holds the 500 ns
    assert buckets[-1].endswith('le="+Inf"} 4') and counts[-2] == 3  # 1000 s is above 69 s
    assert 'atomicfs_fuse_request_duration_seconds_count{mountpoint="/m",op="write"} 4' in lines
    assert "device_request_duration_seconds" not in text  # no samples: no family


def test_text_view_lists_operations() -> None:
    h = Histograms()
    h.add("getxattr", 3000)
    text = text_view("/m", {**_data(h), "device": {"path": "/dev/x", "atomic_path": "sw",
                                                    "atomic_unit_min": 0,
                                                    "atomic_unit_max": 0}})
    assert "latency since mount" in text and "FUSE operation:" in text
    assert "device request:" not in text
    assert [ln.split()[:2] for ln in text.splitlines() if "getxattr" in ln] == \
        [["getxattr", "1"]]
