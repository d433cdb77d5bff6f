"""The `latency` key of `atomicfs stat MOUNTPOINT`: per FUSE operation, per device request
kind and per internal job, in the JSON, the text view (also over a --watch interval) and
the Prometheus histograms, with real counts after real operations."""
from __future__ import annotations

import os
import re

from atomicfs.statview import text_view
from tests.conftest import Mount, cli
from tests.mount.test_stat_views import parse_exposition

WRITES = 20
FSYNCS = 3
CONTROL = "user.atomicfs.control"


def _work(mnt: Mount) -> None:
    """WRITES writes of 4 KiB (one FUSE write each), FSYNCS fsyncs, a checkpoint."""
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(WRITES):
            os.pwrite(fd, b"w" * 4096, i * 4096)
            if i % (WRITES // FSYNCS) == 0 and i // (WRITES // FSYNCS) < FSYNCS:
                os.fsync(fd)
    finally:
        os.close(fd)
    os.setxattr(mnt.path, CONTROL, b"checkpoint")


def _check_histogram(h: dict) -> None:
    assert h["count"] > 0 and h["sum_us"] > 0
    assert 0 < h["p50_us"] <= h["p90_us"] <= h["p99_us"] <= h["max_us"]
    assert sum(h["buckets_ns"].values()) == h["count"]
    assert abs(h["mean_us"] - h["sum_us"] / h["count"]) < 0.2


def test_latency_json(mnt: Mount) -> None:
    _work(mnt)
    data = mnt.stat()
    lat = data["latency"]
    assert set(lat) == {"fuse", "device", "jobs"}
    fuse, device = lat["fuse"], lat["device"]
    assert fuse["write"]["count"] >= WRITES
    assert fuse["fsync"]["count"] >= FSYNCS
    assert fuse["create"]["count"] >= 1 and fuse["setxattr"]["count"] >= 1
    assert lat["jobs"]["checkpoint"]["count"] >= 1
    for h in [*fuse.values(), *device.values(), *lat["jobs"].values()]:
        _check_histogram(h)
    # every device request is timed: at least as many as the device counters saw
    writes = sum(h["count"] for k, h in device.items() if "_write" in k)
    flushes = sum(h["count"] for k, h in device.items() if k == "flush" or
                  k.endswith("_write_flush"))
    assert writes >= data["device"]["write_ios"] > 0
    assert flushes >= data["device"]["flushes"] >= FSYNCS
    assert device["completion_wakeup"]["count"] > 0
    # the existing keys are all still there
    assert {"cache", "device", "counters", "requests", "folio_states"} <= set(data)


def test_latency_text_and_interval(mnt: Mount) -> None:
    before = mnt.stat()
    _work(mnt)
    after = mnt.stat()
    text = cli("stat", mnt.path).stdout
    assert "latency since mount, in microseconds:" in text
    assert re.search(r"^ +write +\d+ ", text, re.M), text
    assert "FUSE operation:" in text and "device request:" in text
    # over an interval: exactly the writes made in it (nothing else writes to the mount)
    view = text_view(mnt.path, after, before, 2.0)
    assert "latency over the last 2.0 s" in view
    m = re.search(r"^ +write +(\d+) ", view, re.M)
    assert m and int(m.group(1)) == WRITES, view
    m = re.search(r"^ +fsync +(\d+) ", view, re.M)
    assert m and int(m.group(1)) == FSYNCS, view


def test_latency_prometheus(mnt: Mount) -> None:
    _work(mnt)
    fam = parse_exposition(cli("stat", mnt.path, "--prometheus").stdout)
    data = mnt.stat()
    name = "atomicfs_fuse_request_duration_seconds"
    assert fam[name]["type"] == "histogram"
    assert fam["atomicfs_device_request_duration_seconds"]["type"] == "histogram"
    assert fam["atomicfs_job_duration_seconds"]["type"] == "histogram"
    samples = [(lab, v) for lab, v in fam[name]["samples"] if lab.get("op") == "write"]
    buckets = [(lab["le"], v) for lab, v in samples if "le" in lab]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == "+Inf"
    les = [float(le) for le, _ in buckets[:-1]]
    assert les == sorted(les) and les[0] < 2e-6 and les[-1] > 60
    total = [v for lab, v in samples if "le" not in lab]
    # _sum and _count, in that order; the count is the +Inf bucket
    assert len(total) == 2 and total[1] == counts[-1] >= WRITES
    assert 0 < total[0] and total[1] <= data["latency"]["fuse"]["write"]["count"]
