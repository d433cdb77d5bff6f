"""bench/report.py's issue 14 goals and their ceilings from synthetic figures (the bench
itself is never run by the tests)."""
from __future__ import annotations

from typing import Any

import pytest

from bench import report


def _fig(**medians: float) -> dict[str, Any]:
    return {t.replace("_", "-"): {"median": v, "runs": {"0": v}} for t, v in medians.items()}


def _data() -> dict[str, Any]:
    return {"figures": {
        "atomic16k_j1": _fig(atomicfs_sw=1500, xfs=1000, nullfs_xattr=6000),
        "dsync16k_direct_j1": _fig(xfs=3000),
        "meta_unlink": _fig(atomicfs_sw=900, nullfs=1000),
        "seq1m_write": _fig(atomicfs_sw=200, xfs=400, nullfs_xattr=500),
        "seq1m_write_direct": _fig(xfs=1500)}}


def test_a_serial_ceiling_adds_the_transport_and_the_device() -> None:
    g = report.issue14_goal(_data(), "durable", "atomic16k_j1", "atomic16k_j1", "xfs", 2.0,
                            ("serial", "atomic16k_j1", "nullfs-xattr",
                             "dsync16k_direct_j1", "xfs"))
    assert g["ratio"]["ratio"] == pytest.approx(1.5)
    # 1/6000 + 1/3000 s per write: 2000 IOPS at best, 2x XFS
    assert g["ceiling"] == pytest.approx(2.0)
    assert g["share_of_ceiling"] == pytest.approx(0.75)


def test_an_overlapped_ceiling_is_the_slower_of_the_two() -> None:
    g = report.issue14_goal(_data(), "seq", "seq1m_write", "seq1m_write", "xfs", 0.8,
                            ("overlap", "seq1m_write", "nullfs-xattr",
                             "seq1m_write_direct", "xfs"))
    assert g["ceiling"] == pytest.approx(500 / 400)
    assert g["ratio"]["ratio"] == pytest.approx(0.5)


def test_a_null_filesystem_reference_is_its_own_ceiling_and_the_table_says_so() -> None:
    data = _data()
    data["issue14_goals"] = [report.issue14_goal(data, "unlink ÷ null FS", "meta_unlink",
                                                 "meta_unlink", "nullfs", 0.8, None),
                             report.issue14_goal(data, "missing", "rand4k_read_cold",
                                                 "rand4k_read_cold", "xfs", 0.6, None)]
    g = data["issue14_goals"][0]
    assert g["ceiling"] == 1.0 and g["share_of_ceiling"] == pytest.approx(0.9)
    table = report.issue14_table(data)
    assert "| unlink ÷ null FS | 0.90x met | 0.8x | 1.00x | 90% |" in table
    assert "missing" not in table  # no figures, no row


def test_the_goals_plot_takes_pgbench_goals_as_written() -> None:
    data = _data()
    data["issue14_goals"] = [report.issue14_goal(data, "unlink ÷ null FS", "meta_unlink",
                                                 "meta_unlink", "nullfs", 0.8, None)]
    data["pgbench"] = {"ratios": [
        {"subject": "atomicfs-sw/off", "reference": "xfs/on", "goal": ">= 0.8", "ratio": 0.5},
        {"subject": "xfs/off", "reference": "xfs/on", "goal": "", "ratio": 1.1}]}
    rows = report.goal_rows(data)
    assert rows == [("unlink ÷ null FS", pytest.approx(0.9), 0.8, 1.0),
                    ("pgbench atomicfs-sw/off ÷ xfs/on", 0.5, 0.8, None)]
    assert report._goal_of(">= 1.2") == 1.2 and report._goal_of("") is None


def test_nullfs_caches_what_atomicfs_lets_the_kernel_cache() -> None:
    """The null filesystem is the transport's ceiling only if the kernel sends it the same
    requests: the same entry and attribute timeouts as atomicfs."""
    import importlib.util
    from pathlib import Path

    from atomicfs import fs
    path = Path(report.__file__).with_name("nullfs.py")
    spec = importlib.util.spec_from_file_location("bench_nullfs", path)
    assert spec is not None and spec.loader is not None
    nullfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nullfs)
    assert (nullfs.ENTRY_TIMEOUT, nullfs.ATTR_TIMEOUT) == (fs.ENTRY_TIMEOUT, fs.ATTR_TIMEOUT)


def test_nullfs_perm_runs_only_the_metadata_rows() -> None:
    from bench.targets import stub
    from bench.workloads import WORKLOADS
    ran = {w.key for w in WORKLOADS if w.spec_for(stub("nullfs-perm")) is not None}
    assert ran == {"meta_create", "meta_stat", "meta_unlink"}


def test_the_metadata_ceiling_is_nullfs_with_default_permissions() -> None:
    data = _data()
    data["figures"]["meta_unlink"].update(_fig(nullfs_perm=600))
    g = report.issue14_goal(data, "unlink ÷ null FS", "meta_unlink", "meta_unlink", "nullfs",
                            0.8, ("transport", "meta_unlink", "nullfs-perm", None, None))
    assert g["ceiling"] == pytest.approx(0.6) and g["share_of_ceiling"] == pytest.approx(1.5)
    assert g["ceiling_how"] == "transport: nullfs-perm meta_unlink"


def test_the_profile_counts_only_the_trio_loops_thread(tmp_path: Any) -> None:
    from bench import profile
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "main (atomicfs/cli.py:1);unrolled_run (trio/_core/_run.py:2);"
        "write (atomicfs/fs.py:3) 5\n"
        "Thread._bootstrap (threading.py:1002);WorkerThread._work "
        "(trio/_core/_thread_cache.py:211);0x7f18310a3f16 (libc.so.6) 7\n")
    stacks = profile.read_collapsed(raw)
    assert [n for _, n in stacks] == [5]


def test_every_target_has_a_colour_in_the_plots() -> None:
    from bench.targets import ALL_TARGETS
    assert set(report.COLORS) == set(report.ORDER) == set(ALL_TARGETS)


def test_the_machine_line_says_how_idle_cpus_wait() -> None:
    assert report.idle_text({}) == ""
    assert report.idle_text({"driver": "intel_idle"}) == "; cpuidle intel_idle"
    assert "halts at once" in report.idle_text({"driver": "haltpoll", "guest_halt_poll_ns": 0})
    assert "guest halt polling 200 µs" in report.idle_text(
        {"driver": "haltpoll", "guest_halt_poll_ns": 200000})
