"""The crash-consistency explorer: `atomicfs crashtest`.

Power-loss mode. For each round: make a fresh image (the base), mount a copy of it with
`-o record=`, run a workload on the mount (its history notes when each request was
answered), unmount. Then draw crash states from the recording (states), build each
as an image, recover it and read it back (check), and ask the workload's oracle
whether every atomic unit reads as one version, every write acknowledged durable before
the crash is there and the namespace is one the workload went through; fsck before and
after recovery must be clean. Most states are recovered in this process through a Volume;
every `mount_every`-th through a real mount of the device kind under test.

Kill mode (`--kills N`). No recording: mount, run the workload, SIGKILL the daemon at a
random moment, detach the dead mount, mount again (recovery), check the same oracles with
everything the workload was told as acknowledged, unmount, fsck.

The control (`--control`): mount option unsafe_atomic writes atomic folios in place as
ordinary writes (not flagged RWF_ATOMIC, so the generator may tear them). The explorer must
then report torn units, or it proves nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import threading
import time
import zlib
from dataclasses import dataclass, field

from atomicfs.crashtest.check import CheckResult, check_with_mount, check_with_volume, \
    fsck_problem, read_tree
from atomicfs.crashtest.env import DEVICES, Env, Mount, mounted
from atomicfs.crashtest.recording import Recording
from atomicfs.crashtest.states import CrashState, StateBuilder, choose_states, sparse_copy, \
    unlink_quietly
from atomicfs.crashtest.workloads import WORKLOADS, make_workload
from atomicfs.crashtest.workloads.base import History, Workload, WorkloadError
from atomicfs.crashtest.workloads.rwf import preload_active
from atomicfs.errors import UserError

log = logging.getLogger(__name__)

# Mount options of the recorded runs: background writeback and frequent commits, so that
# crash points fall inside flusher and checkpoint work too, not only inside fsyncs.
WORKLOAD_OPTIONS = {
    "units": ["dirty_expire=1"],
    "writethrough": ["dirty_expire=1"],
    "mixed": ["dirty_expire=1"],
    "namespace": ["dirty_expire=1", "commit_interval=0.2"],
    "logfill": ["dirty_expire=1"],
    "rwf": ["dirty_expire=1"],
}


SHOWN_FAILURES = 6


@dataclass
class CrashConfig:
    workloads: list[str]
    states: int = 200
    seed: int = 1
    tear: int = 512
    kills: int = 0
    device: str = "file"
    control: bool = False
    workdir: str | None = None
    unit: int = 16 << 10
    states_per_recording: int = 100
    mount_every: int = 25  # every n-th state of a recording goes through a real mount
    scale: float = 1.0  # multiplies the workload's operation count
    keep: bool = False


@dataclass
class Totals:
    states: int = 0
    unchecked_states: int = 0  # drawn from rounds whose recorded run failed
    mounted_states: int = 0
    recordings: int = 0
    events: int = 0
    device_writes: int = 0
    atomic_writes: int = 0  # recorded with RWF_ATOMIC (hardware path)
    applied_writes: int = 0
    torn_writes: int = 0
    kills: int = 0
    kills_mid_run: int = 0  # the workload was still issuing requests when the daemon died
    torn_units: int = 0
    torn_states: int = 0
    lost_writes: int = 0
    lost_states: int = 0
    namespace_errors: int = 0
    workload_failures: int = 0  # the live filesystem failed the workload (daemon died...)
    mount_failures: int = 0
    fsck_failures: int = 0
    seconds: float = 0.0
    atomic_paths: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.torn_units or self.lost_writes or self.namespace_errors
                    or self.workload_failures or self.mount_failures or self.fsck_failures)

    def add_result(self, res: CheckResult, label: str) -> None:
        v = res.verdict
        self.torn_units += v.torn_units
        self.torn_states += 1 if v.torn_units else 0
        self.lost_writes += v.lost_writes
        self.lost_states += 1 if v.lost_writes else 0
        self.namespace_errors += v.namespace_errors
        self.mount_failures += 1 if res.mount_failure else 0
        self.fsck_failures += 1 if res.fsck_failure else 0
        if not res.ok and len(self.failures) < 20:
            self.failures.append(f"{label}: " + "; ".join(res.problems()[:3]))

    def add_workload_failure(self, label: str, exc: BaseException) -> None:
        self.workload_failures += 1
        if len(self.failures) < 20:
            self.failures.insert(0,f"{label}: the workload failed on the live mount: "
                                 f"{type(exc).__name__}: {exc}")

    def merge(self, other: "Totals") -> None:
        for name, value in vars(other).items():
            if isinstance(value, (int, float)):
                setattr(self, name, getattr(self, name) + value)
        self.atomic_paths |= other.atomic_paths
        self.failures += other.failures[: max(0, 20 - len(self.failures))]

    def verdicts(self) -> str:
        if not self.failed:
            return "all clean"
        return (f"torn {self.torn_units}, lost {self.lost_writes}, namespace "
                f"{self.namespace_errors}, workload failures {self.workload_failures}, "
                f"mount failures {self.mount_failures}, fsck failures {self.fsck_failures}")

    def report(self) -> str:
        lines = [
            f"states checked: {self.states} ({self.mounted_states} through real mounts, "
            f"{self.states - self.mounted_states} through the Volume)"
            + (f"; {self.unchecked_states} not checked: their recorded run failed"
               if self.unchecked_states else ""),
            f"recordings: {self.recordings} ({self.events} events, {self.device_writes} "
            f"device writes, {self.atomic_writes} of them RWF_ATOMIC); in-flight writes "
            f"applied: {self.applied_writes}, torn by the generator: {self.torn_writes}",
            f"kills: {self.kills} ({self.kills_mid_run} while the workload ran)",
            f"torn units: {self.torn_units} (in {self.torn_states} states)",
            f"lost durable writes: {self.lost_writes} (in {self.lost_states} states)",
            f"namespace errors: {self.namespace_errors}",
            f"workload failures (live filesystem): {self.workload_failures}",
            f"mount failures: {self.mount_failures}",
            f"fsck failures: {self.fsck_failures}",
            f"atomic path: {', '.join(sorted(self.atomic_paths)) or '-'}",
            f"time: {self.seconds:.1f} s",
        ]
        for f in self.failures[:SHOWN_FAILURES]:
            lines.append(f"FAILED {f}")
        if len(self.failures) > SHOWN_FAILURES:
            lines.append(f"(and more failures; {SHOWN_FAILURES} shown)")
        return "\n".join(lines)


def _seed(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode())


def _share(total: int, parts: int, k: int) -> int:
    """The k-th of parts nearly equal shares of total."""
    return total // parts + (1 if k < total % parts else 0)


# ---------------------------------------------------------------------------- explore

def explore(cfg: CrashConfig) -> Totals:
    """Run the configured rounds on each device kind; cleans up every mount and device it
    made. States and kills are shared out evenly over devices and workloads."""
    validate(cfg)
    devices = cfg.device.split(",")
    totals = Totals()
    start = time.monotonic()
    parts = len(devices) * len(cfg.workloads)
    k = 0
    for device in devices:
        with Env(device, cfg.workdir, cfg.keep) as env:
            for name in cfg.workloads:
                wl = make_workload(name, cfg.unit, cfg.scale)
                totals.merge(explore_power_loss(env, cfg, wl, _share(cfg.states, parts, k)))
                totals.merge(explore_kills(env, cfg, wl, _share(cfg.kills, parts, k)))
                k += 1
    totals.seconds = time.monotonic() - start
    return totals


def validate(cfg: CrashConfig) -> None:
    """UserError for a configuration that cannot run, before anything is made."""
    if cfg.tear < 512 or cfg.tear % 512:
        raise UserError("--tear must be a multiple of 512 (the sector size)")
    if cfg.states < 0 or cfg.kills < 0 or cfg.states_per_recording < 1 or cfg.mount_every < 1:
        raise UserError("--states and --kills must not be negative, --per-recording and "
                        "--mount-every must be at least 1")
    for name in cfg.workloads:
        if name not in WORKLOADS:
            raise UserError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)}, all)")
    if "rwf" in cfg.workloads and not preload_active():
        raise UserError("the rwf workload issues RWF_ATOMIC through the preload library: "
                        "run under `atomicfs run --`")
    for device in cfg.device.split(","):
        if device not in DEVICES:
            raise UserError(f"unknown device {device!r} (one of {', '.join(DEVICES)}, all)")


def workload_options(cfg: CrashConfig, name: str) -> list[str]:
    opts = list(WORKLOAD_OPTIONS.get(name, []))
    if cfg.control:
        opts.append("unsafe_atomic")
    return opts


def explore_power_loss(env: Env, cfg: CrashConfig, wl: Workload, states: int) -> Totals:
    totals = Totals()
    rnd = 0
    while totals.states + totals.unchecked_states < states:
        n = min(cfg.states_per_recording, states - totals.states - totals.unchecked_states)
        t0 = time.monotonic()
        try:
            part = power_loss_round(env, cfg, wl, rnd, n)
        except (WorkloadError, OSError) as exc:
            # The states of this round are lost; count them so the run still ends.
            part = Totals(unchecked_states=n)
            part.add_workload_failure(f"{wl.name} on {env.device} seed {cfg.seed} round "
                                      f"{rnd}", exc)
        log.info("%s on %s, round %d: %d events, %d states (%d mounted): %s (%.1f s)",
                 wl.name, env.device, rnd, part.events, part.states, part.mounted_states,
                 part.verdicts(), time.monotonic() - t0)
        totals.merge(part)
        rnd += 1
    return totals


def power_loss_round(env: Env, cfg: CrashConfig, wl: Workload, rnd: int,
                     n_states: int) -> Totals:
    """One recording and n_states crash states drawn from it."""
    totals = Totals()
    seed = _seed(cfg.seed, wl.name, rnd)
    base = env.make_base(cfg.unit)
    rec_path = env.new_path(f"{wl.name}.rec", scratch=not cfg.keep)
    try:
        history, stats = record_workload(env, cfg, wl, base, rec_path, seed)
        totals.atomic_paths.add(stats["device"]["atomic_path"])
        with Recording(rec_path) as rec, StateBuilder(rec, base, env.scratch) as builder:
            summary = rec.summary()
            log.debug("%s round %d: %s; %s", wl.name, rnd, summary, history.summary())
            totals.recordings += 1
            totals.events += summary["events"]
            totals.device_writes += summary["writes"]
            totals.atomic_writes += summary["atomic_writes"]
            for st in choose_states(rec, n_states, seed, cfg.tear):
                real = st.index % cfg.mount_every == 0
                res = check_state(env, rec, builder, st, history, real)
                totals.states += 1
                totals.mounted_states += 1 if real else 0
                totals.applied_writes += len(st.applied)
                totals.torn_writes += st.torn_writes
                totals.add_result(res, f"{wl.name} on {env.device} seed {cfg.seed} round "
                                       f"{rnd} {st.describe()}")
    finally:
        if not cfg.keep:
            unlink_quietly(rec_path)
            unlink_quietly(base)
    return totals


def record_workload(env: Env, cfg: CrashConfig, wl: Workload, base: str, rec_path: str,
                    seed: int) -> tuple[History, dict]:
    """Run the workload on a copy of base, recording every device write and flush."""
    image = env.new_path("recorded.img")
    sparse_copy(base, image)
    options = workload_options(cfg, wl.name) + [f"record={rec_path}"]
    try:
        with env.target_for(image) as target, mounted(env, target, options) as mnt:
            history = wl.run(mnt.path, seed, threading.Event())
            stats = mnt.stat()
            if not mnt.umount():
                raise WorkloadError(f"unmount after the {wl.name} workload failed")
    finally:
        if not cfg.keep:
            unlink_quietly(image)
    return history, stats


def check_state(env: Env, rec: Recording, builder: StateBuilder, st: CrashState,
                history: History, real_mount: bool) -> CheckResult:
    image = builder.build(st, env.new_path("state.img", scratch=True))
    try:
        t_crash = rec.time_before(st.crash_point)
        if real_mount:
            return check_with_mount(env, image, history, t_crash)
        return check_with_volume(image, history, t_crash)
    finally:
        os.unlink(image)


# ------------------------------------------------------------------------------ kills

def explore_kills(env: Env, cfg: CrashConfig, wl: Workload, kills: int) -> Totals:
    totals = Totals()
    t0 = time.monotonic()
    for k in range(kills):
        label = f"{wl.name} on {env.device} seed {cfg.seed} kill {k}"
        totals.kills += 1
        try:
            res, path, running = kill_round(env, cfg, wl, k)
        except (WorkloadError, OSError) as exc:
            totals.add_workload_failure(label, exc)
            continue
        totals.kills_mid_run += 1 if running else 0
        totals.atomic_paths.add(path)
        totals.add_result(res, label)
    if kills:
        log.info("%s on %s: %d kills: %s (%.1f s)", wl.name, env.device, kills,
                 totals.verdicts(), time.monotonic() - t0)
    return totals


# A kill run's workload is long enough (tens of seconds) that the kill, at most
# KILL_WITHIN seconds in, always hits it while it runs.
KILL_SCALE = 100.0
KILL_WITHIN = 1.5


def kill_round(env: Env, cfg: CrashConfig, wl: Workload,
               k: int) -> tuple[CheckResult, str, bool]:
    """Run the workload, SIGKILL the daemon at a random moment, recover, check. Returns
    the result, the atomic path and whether the workload was still running."""
    seed = _seed(cfg.seed, wl.name, "kill", k)
    rng = random.Random(seed)
    long_run = make_workload(wl.name, cfg.unit, cfg.scale * KILL_SCALE)
    base = env.make_base(cfg.unit)
    try:
        with env.target_for(base) as target:
            with mounted(env, target, workload_options(cfg, wl.name)) as mnt:
                path = mnt.stat()["device"]["atomic_path"]
                history, running = run_until_killed(mnt, long_run, seed,
                                                    rng.uniform(0.05, KILL_WITHIN))
            t_crash = time.monotonic_ns()
            return check_after_kill(env, target, history, t_crash), path, running
    finally:
        os.unlink(base)


def run_until_killed(mnt: Mount, wl: Workload, seed: int,
                     delay: float) -> tuple[History, bool]:
    """The workload's history and whether it was still running when the daemon died."""
    stop = threading.Event()
    result: dict[str, object] = {}

    def body() -> None:
        try:
            result["history"] = wl.run(mnt.path, seed, stop)
        except BaseException as exc:
            result["error"] = exc
    t = threading.Thread(target=body, name=f"{wl.name}-workload", daemon=True)
    t.start()
    t.join(delay)
    running = t.is_alive()
    # Set before the kill: once the dead mount is detached, paths resolve to the empty
    # mountpoint (ENOENT), and such errors must count as the crash, not as failures.
    stop.set()
    mnt.kill()
    t.join(120)
    if t.is_alive():
        raise WorkloadError(f"the {wl.name} workload did not stop after the kill")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["history"], running  # type: ignore[return-value]


def check_after_kill(env: Env, target: str, history: History, t_crash: int) -> CheckResult:
    res = CheckResult()
    try:
        with mounted(env, target, []) as mnt:
            view = read_tree(mnt.path)
            if not mnt.umount():
                res.mount_failure = "umount reported errors"
    except (UserError, OSError) as exc:
        res.mount_failure = str(exc)
        return res
    res.verdict = history.check(view, t_crash)
    res.fsck_failure = fsck_problem(target)
    return res


# -------------------------------------------------------------------------------- CLI

def config_from_args(args: argparse.Namespace) -> CrashConfig:
    names = list(WORKLOADS) if args.workload == "all" else args.workload.split(",")
    device = "file,loop,xfs" if args.device == "all" else args.device
    return CrashConfig(workloads=names, states=args.states, seed=args.seed, tear=args.tear,
                       kills=args.kills, device=device, control=args.control,
                       workdir=args.workdir, unit=getattr(args, "unit", 16 << 10),
                       states_per_recording=getattr(args, "per_recording", 100),
                       mount_every=getattr(args, "mount_every", 25),
                       scale=getattr(args, "scale", 1.0), keep=getattr(args, "keep", False))


def run_crashtest(args: argparse.Namespace) -> int:
    """`atomicfs crashtest`: exit 0 only when nothing tore, got lost or failed (with
    --expect-torn, the control's verdict: 0 only if torn units were seen and nothing
    else failed)."""
    cfg = config_from_args(args)
    validate(cfg)
    log.setLevel(logging.INFO)  # a line per round
    print(f"atomicfs crashtest: workloads {','.join(cfg.workloads)}, device {cfg.device}, "
          f"seed {cfg.seed}, tear {cfg.tear}, unit {cfg.unit}, {cfg.states} states, "
          f"{cfg.kills} kills" + (", CONTROL (unsafe_atomic)" if cfg.control else ""),
          flush=True)
    totals = explore(cfg)
    print(totals.report(), flush=True)
    if getattr(args, "expect_torn", False):
        others = (totals.lost_writes or totals.namespace_errors or totals.mount_failures
                  or totals.fsck_failures)
        seen = totals.torn_units > 0 and not others
        print("control: torn units seen: the explorer detects tearing" if seen else
              "control FAILED: expected torn units and no other failure")
        return 0 if seen else 1
    return 1 if totals.failed else 0


__all__ = ["CrashConfig", "Totals", "explore", "run_crashtest"]
