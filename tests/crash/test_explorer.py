"""The crash explorer on real mounts: recordings, power-loss states and kills, on the
software path (image file, loop device) and the hardware path (image on XFS), and the
control run that must see torn units.

CI budget: together these check 240 power-loss states and 11 kills in a few minutes.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from atomicfs.crashtest.env import Env, mounted
from atomicfs.crashtest.explorer import CrashConfig, Totals, explore
from atomicfs.crashtest.recording import Recording
from atomicfs.crashtest.states import StateBuilder, sparse_copy
from atomicfs.crashtest.workloads import make_workload
from atomicfs.errors import UserError
from tests.conftest import cli

pytestmark = pytest.mark.mount


def _explore(tmp: Path, **kw: object) -> Totals:
    cfg = CrashConfig(**{"workloads": ["units", "writethrough", "namespace", "mixed"],
                         "workdir": str(tmp), **kw})  # type: ignore[arg-type]
    totals = explore(cfg)
    print(totals.report())
    return totals


def _assert_clean(t: Totals, states: int, kills: int) -> None:
    assert t.states == states and t.kills == kills
    assert t.kills_mid_run == kills  # every kill hit the workload while it ran
    assert t.torn_units == 0, t.failures
    assert t.lost_writes == 0, t.failures
    assert t.namespace_errors == 0, t.failures
    assert t.mount_failures == 0, t.failures
    assert t.fsck_failures == 0, t.failures
    assert not t.failed


def _no_leftovers(tmp: Path) -> None:
    with open("/proc/mounts") as f:
        assert str(tmp) not in f.read()
    loops = os.popen("losetup -a").read()
    assert str(tmp) not in loops


def test_recording_replays_to_the_unmounted_image(mount_env: None, tmp_path: Path) -> None:
    """Base plus every recorded write, in completion order, is the image at unmount: the
    recording misses nothing (checked on a loop device, where writes go through the
    block layer)."""
    with Env("loop", str(tmp_path)) as env:
        base = env.make_base(16 << 10)
        image = env.new_path("rec.img")
        sparse_copy(base, image)
        rec_path = env.new_path("r.rec")
        with env.target_for(image) as target, \
                mounted(env, target, [f"record={rec_path}"]) as mnt:
            make_workload("mixed", 16 << 10, scale=0.3).run(mnt.path, 5, threading.Event())
            assert mnt.umount()
        with Recording(rec_path) as rec, StateBuilder(rec, base, env.scratch) as b:
            assert rec.summary()["log"] > 0 and rec.summary()["data"] > 0
            final = b.build_final(env.new_path("final.img", scratch=True))
            with open(final, "rb") as f1, open(image, "rb") as f2:
                while True:
                    a, c = f1.read(1 << 22), f2.read(1 << 22)
                    assert a == c
                    if not a:
                        break
    _no_leftovers(tmp_path)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_software_path_image_file(mount_env: None, tmp_path: Path) -> None:
    t = _explore(tmp_path, states=100, kills=4, device="file", seed=11, mount_every=20)
    _assert_clean(t, 100, 4)
    assert t.atomic_paths == {"software"}
    assert t.torn_writes > 0  # the generator really tore writes
    assert t.mounted_states >= 4
    _no_leftovers(tmp_path)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_software_path_loop_device(mount_env: None, tmp_path: Path) -> None:
    t = _explore(tmp_path, states=60, kills=3, device="loop", seed=12, mount_every=15)
    _assert_clean(t, 60, 3)
    assert t.atomic_paths == {"software"}
    _no_leftovers(tmp_path)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_hardware_path_on_xfs(xfs_dir: str) -> None:
    """Images on XFS report atomic limits: units go out as RWF_ATOMIC writes, recorded
    with the atomic flag, which the generator never tears."""
    workdir = os.path.join(xfs_dir, "crash-hw")
    os.makedirs(workdir, exist_ok=True)
    t = _explore(Path(workdir), states=80, kills=4, device="xfs", seed=13, mount_every=20)
    _assert_clean(t, 80, 4)
    assert t.atomic_paths == {"hardware"}
    assert t.atomic_writes > 0
    _no_leftovers(Path(workdir))


def test_control_without_protection_shows_torn_units(mount_env: None,
                                                    tmp_path: Path) -> None:
    """unsafe_atomic writes atomic folios in place as ordinary writes: a crash tears them,
    and the explorer must say so, or it proves nothing."""
    t = _explore(tmp_path, workloads=["units"], states=60, device="file", seed=14,
                 control=True)
    assert t.torn_units > 0
    assert t.failed
    # switching the protection off must tear units, not lose durable writes or break
    # recovery: those would point at the explorer or the control, not at atomicity
    assert t.lost_writes == 0 and t.mount_failures == 0 and t.fsck_failures == 0, t.failures


def test_control_on_the_hardware_path_shows_torn_units(xfs_dir: str) -> None:
    workdir = os.path.join(xfs_dir, "crash-control")
    os.makedirs(workdir, exist_ok=True)
    t = _explore(Path(workdir), workloads=["units"], states=40, device="xfs", seed=15,
                 control=True)
    assert t.atomic_paths == {"hardware"}
    assert t.atomic_writes == 0  # the unprotected writes are not flagged RWF_ATOMIC
    assert t.torn_units > 0
    assert t.lost_writes == 0 and t.mount_failures == 0 and t.fsck_failures == 0, t.failures


def test_cli_reports_and_exits_non_zero_on_torn_units(mount_env: None,
                                                      tmp_path: Path) -> None:
    res = cli("crashtest", "--workload", "units", "--states", "30", "--seed", "16",
              "--control", "--workdir", str(tmp_path), check=False, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    torn = int(re.search(r"torn units: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]
    assert torn > 0
    for line in ("states checked: 30", "lost durable writes: 0", "mount failures: 0",
                 "fsck failures: 0"):
        assert line in res.stdout
    _no_leftovers(tmp_path)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_log_filled_again_and_again(mount_env: None, tmp_path: Path) -> None:
    """Issue 17: crash states while a 16 MiB log fills and is checkpointed repeatedly."""
    t = _explore(tmp_path, workloads=["logfill"], states=40, kills=2, device="file",
                 seed=17, mount_every=20)
    _assert_clean(t, 40, 2)


def test_rwf_atomic_writes_through_the_preload_library(mount_env: None,
                                                       tmp_path: Path) -> None:
    """The rwf workload: pwritev2(RWF_ATOMIC) of 1..64 units (some RWF_DSYNC) through the
    preload library (the command starts itself again under it): no write torn as a whole,
    no unit torn, no durable write lost; then the control, which must see tearing."""
    res = cli("crashtest", "--workload", "rwf", "--states", "60", "--seed", "21",
              "--workdir", str(tmp_path), check=False, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    for line in ("states checked: 60", "torn units: 0", "lost durable writes: 0",
                 "workload failures (live filesystem): 0", "mount failures: 0",
                 "fsck failures: 0"):
        assert line in res.stdout, res.stdout
    res = cli("crashtest", "--workload", "rwf", "--states", "40", "--seed", "22", "--control",
              "--expect-torn", "--workdir", str(tmp_path), check=False, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "torn as a whole" in res.stdout
    _no_leftovers(tmp_path)


def test_rwf_workload_needs_the_preload_library(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="preload library"):
        explore(CrashConfig(workloads=["rwf"], workdir=str(tmp_path), states=1))
