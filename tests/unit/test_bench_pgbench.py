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
    if target == "atomicfs-sw":
        n = run["transactions"]
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
    text = pgbench.markdown(data)
    assert "| atomicfs-sw/off ÷ xfs/on | 0.85 | 0.80–0.90 | >= 0.8 |" in text
    assert "full_page_writes=on" in text and "FAILED: boom" in text


def test_configs_follow_targets() -> None:
    assert pgbench.configs_for([]) == list(pgbench.CONFIGS)
    assert pgbench.configs_for(["xfs"]) == [("xfs", "on"), ("xfs", "off")]
