"""bench/pgbench.py's figures, ratios and commit breakdown from synthetic runs (the bench
itself is never run by the tests)."""
from __future__ import annotations

from typing import Any

from bench import pgbench


def _h(count: int, mean_us: float) -> dict[str, Any]:
    return {"count": count, "sum_us": count * mean_us, "mean_us": mean_us,
            "p50_us": mean_us, "p99_us": 2 * mean_us, "buckets_ns": {}}


def _run(rnd: int, target: str, fpw: str, tps: float) -> dict[str, Any]:
    run: dict[str, Any] = {"round": rnd, "target": target, "full_page_writes": fpw,
                           "tps": tps, "transactions": int(tps * 5), "latency_ms": 2.0,
                           "wal_bytes": int(tps * 5) * 1000, "wall_s": 7.0}
    n = run["transactions"]
    run["wal_io"] = {"writes": n, "write_ms": n * 0.25, "syncs": n / 2, "sync_ms": n * 0.45}
    if target in ("atomicfs-sw", "passthrough"):
        run["fuse_rtt"] = {"write": _h(2 * n, 70), "fsync": _h(n, 600)}
    if target == "atomicfs-sw":
        run["latency"] = {"fuse": {"write": _h(2 * n, 50), "fsync": _h(n, 400),
                                   "getxattr": _h(2 * n, 10)},
                          "device": {"log_write_flush": _h(n, 300),
                                     "completion_wakeup": _h(n, 20)},
                          "jobs": {}}
    return run


def test_figures_ratios_and_breakdown() -> None:
    data: dict[str, Any] = {"settings": pgbench.Settings().__dict__, "rounds": 2,
                            "setup_s": {"atomicfs-sw": 30.0}, "runs": []}
    for rnd in range(2):
        data["runs"] += [_run(rnd, "atomicfs-sw", "off", 800 + rnd * 100),
                         _run(rnd, "atomicfs-sw", "on", 600), _run(rnd, "xfs", "on", 1000),
                         _run(rnd, "xfs", "off", 1100), _run(rnd, "passthrough", "on", 500)]
    data["runs"].append({"target": "xfs", "error": "boom"})
    pgbench.aggregate(data)
    assert data["figures"]["atomicfs-sw/off"]["median"] == 850
    first = data["ratios"][0]
    assert (first["subject"], first["reference"]) == ("atomicfs-sw/off", "xfs/on")
    assert first["ratio"] == 0.85 and (first["round_min"], first["round_max"]) == (0.8, 0.9)
    rows = {r["what"].split(" (")[0]: r for r in data["breakdown"]["off"]}
    assert rows["fsync / fdatasync"]["per_txn"] == 1.0
    assert rows["fsync / fdatasync"]["us_per_txn"] == 400
    assert rows["write"]["per_txn"] == 2.0 and rows["log batch write"]["mean_us"] == 300
    assert "device flush" not in rows  # none in these runs
    assert rows["all FUSE requests"]["us_per_txn"] == 2 * 50 + 400 + 2 * 10
    # the chain: PostgreSQL's own timings, then the kernel's round trips, then the daemon
    assert [r["what"].split(",")[0].split(" (")[0] for r in data["breakdown"]["off"][:4]] == [
        "WAL write", "WAL sync", "FUSE write round trip in the kernel",
        "FUSE fsync round trip in the kernel"]
    wal = data["figures"]["xfs/on"]["wal_io"]
    assert (wal["writes_per_txn"], wal["write_us"]) == (1.0, 250.0)
    assert (wal["syncs_per_txn"], wal["sync_us"]) == (0.5, 900.0)
    assert data["figures"]["xfs/on"]["fuse_rtt"] == {}
    assert data["figures"]["passthrough/on"]["fuse_rtt"]["fsync"]["mean_us"] == 600
    text = pgbench.markdown(data)
    assert "| xfs | on | 1.00 | 250 | 0.50 | 900 |  |  |" in text
    assert "| atomicfs-sw | off | 1.00 | 250 | 0.50 | 900 | 70 / 70 | 600 / 600 |" in text
    assert "| atomicfs-sw/off ÷ xfs/on | 0.85 | 0.80–0.90 | >= 0.8 |" in text
    assert "full_page_writes=on" in text and "FAILED: boom" in text


def test_wal_stats_row() -> None:
    assert pgbench.wal_stats("120|30.5|60|54.25") == {"writes": 120, "write_ms": 30.5,
                                                     "syncs": 60, "sync_ms": 54.25}


def test_configs_follow_targets() -> None:
    assert pgbench.configs_for([]) == list(pgbench.CONFIGS)
    assert pgbench.configs_for(["xfs"]) == [("xfs", "on"), ("xfs", "off")]
