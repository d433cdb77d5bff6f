"""Kernel ext4 and atomicfs under the same power cuts (what `make demo` shows).

Both filesystems run the same workload of 16 KiB page writes on the same kind of device: a
loop device over the recording device of crashtest.blockdev, which records every
write and flush whatever the filesystem. The crash explorer's generator then draws the
same kind of crash states from each recording (a write not covered by a completed flush
may be missing, whole or torn at `tear` bytes), to which come the worst cuts just before
flushes (flush_cut_states: no randomness), and the same oracle (self-identifying sectors:
is each 16 KiB page one version? is every fsynced write there?) judges what each
filesystem recovers:

* ext4: the state image is repaired by `e2fsck -fy` (journal replay, then a forced
  check), mounted read-only through a loop device (`mount -o ro,loop`), and read through
  the kernel;
* atomicfs: the state is recovered and read in this process through its Volume, as the
  crash explorer does (check.check_with_volume), fsck before and after.

ext4 is mounted with its defaults (data=ordered, delayed allocation, 4 KiB blocks);
atomicfs with its defaults, its root's atomic unit 16 KiB.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from atomicfs.crashtest.blockdev import recording_device
from atomicfs.crashtest.check import CheckResult, check_with_volume, read_tree
from atomicfs.crashtest.env import Env, atomicfs_cli, mounted_fstype, run
from atomicfs.crashtest.recording import Recording
from atomicfs.crashtest.states import TORN, WHOLE, Applied, CrashState, StateBuilder, \
    choose_states, sparse_copy
from atomicfs.crashtest.workloads.base import Verdict, WorkloadError
from atomicfs.crashtest.workloads.data import DataHistory, DataWorkload, SyncRequest
from atomicfs.errors import UserError


PAGE = 16 << 10
IMAGE_SIZE = 64 << 20
# e2fsck exit status bits that mean the filesystem is still damaged or fsck failed.
E2FSCK_FAILED = ~3


@dataclass
class PageWorkload(DataWorkload):
    """The crash explorer's `units` workload (writers of random runs of whole 16 KiB pages,
    fsync now and then) without its atomicfs controls, so that it runs on any filesystem.
    Kernel filesystems have no control xattr, and syncfs(2) does not reach a FUSE daemon."""

    name: str = "pages"

    def _background(self, root: str, rng: object, syncs: list[SyncRequest]) -> None:
        return None


@dataclass
class Tally:
    """The verdicts on a set of crash states."""

    states: int = 0
    torn_pages: int = 0
    torn_states: int = 0
    lost_writes: int = 0
    lost_states: int = 0
    failures: int = 0  # the state could not be recovered or read (mount, fsck, Volume)
    rows: list[Verdict] = field(default_factory=list)  # one per state, by crash point
    problems: list[str] = field(default_factory=list)

    def add(self, res: CheckResult) -> None:
        v = res.verdict
        self.states += 1
        self.torn_pages += v.torn_units
        self.torn_states += 1 if v.torn_units else 0
        self.lost_writes += v.lost_writes
        self.lost_states += 1 if v.lost_writes else 0
        if res.mount_failure or res.fsck_failure:
            self.failures += 1
        self.rows.append(v)
        if not res.ok and len(self.problems) < 5:
            self.problems.extend(res.problems()[:1])


@dataclass
class FsResult(Tally):
    """What one filesystem went through: the random crash states (and, for each, the
    pages it tore), the worst cuts before flushes, and the run itself."""

    name: str = ""
    flush_cuts: Tally = field(default_factory=Tally)
    repaired_states: int = 0  # ext4: e2fsck corrected something beyond the journal
    device_writes: int = 0
    flushes: int = 0
    torn_writes: int = 0  # writes the generator tore in the random states
    seconds: float = 0.0
    pages: list[tuple[str, int]] = field(default_factory=list)  # the grid's columns

    @property
    def failed(self) -> bool:
        """Torn, lost or unrecoverable in any state."""
        return any(t.torn_pages or t.lost_writes or t.failures
                   for t in (self, self.flush_cuts))


class Filesystem:
    """How to make, mount and recover one filesystem kind."""

    name = ""

    def make(self, image: str) -> None:
        raise NotImplementedError

    def mount(self, dev: str, mnt: str) -> None:
        raise NotImplementedError

    def umount(self, mnt: str) -> None:
        raise NotImplementedError

    def check(self, env: Env, image: str, history: DataHistory, t_crash: int
              ) -> tuple[CheckResult, bool]:
        """The verdict on a crash state, and whether fsck had to repair it."""
        raise NotImplementedError


class Ext4(Filesystem):
    name = "ext4"

    def make(self, image: str) -> None:
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        # Inode tables and journal written now, so that no lazy init writes after mount.
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
             "lazy_itable_init=0,lazy_journal_init=0", image])

    def mount(self, dev: str, mnt: str) -> None:
        run(["mount", "-t", "ext4", dev, mnt])

    def umount(self, mnt: str) -> None:
        run(["umount", mnt])

    def check(self, env: Env, image: str, history: DataHistory, t_crash: int
              ) -> tuple[CheckResult, bool]:
        res = CheckResult()
        fsck = run(["e2fsck", "-fy", image], check=False)
        if fsck.returncode & E2FSCK_FAILED:
            res.fsck_failure = f"e2fsck -fy exited {fsck.returncode}"
            return res, True
        repaired = _e2fsck_repaired(fsck.stdout)
        mnt = env.new_path("ext4-state", scratch=True)
        os.makedirs(mnt)
        try:
            # mount(8) attaches a read-only loop device and detaches it at umount.
            run(["mount", "-t", "ext4", "-o", "ro,loop", image, mnt])
            try:
                view = read_tree(mnt)
            finally:
                if run(["umount", mnt], check=False).returncode != 0:
                    run(["umount", "-l", mnt], check=False)
        except (OSError, UserError) as exc:
            res.mount_failure = str(exc)
            return res, repaired
        finally:
            if mounted_fstype(mnt) is None:
                os.rmdir(mnt)
        res.verdict = history.check(view, t_crash)
        return res, repaired


def _e2fsck_repaired(output: str) -> bool:
    """Whether e2fsck fixed anything beyond replaying the journal. Each repair is a
    question answered "yes"; the superblock's free block and inode totals are left out:
    ext4 does not journal them (the kernel recounts at mount), so they differ after
    every crash; nor "Optimize?", which is not damage."""
    questions = re.findall(r"^(.*?)\n?Fix\? yes|^(.*?)\? yes", output, re.M)
    return any(not re.match(r"Free (blocks|inodes) count wrong \(", a or b)
               and "Optimize" not in (a or b) for a, b in questions)


class AtomicFs(Filesystem):
    name = "atomicfs"

    def make(self, image: str) -> None:
        atomicfs_cli("mkfs", image, "--size", str(IMAGE_SIZE), "--atomic-unit", str(PAGE))

    def mount(self, dev: str, mnt: str) -> None:
        atomicfs_cli("mount", dev, mnt)

    def umount(self, mnt: str) -> None:
        atomicfs_cli("umount", mnt, timeout=600)

    def check(self, env: Env, image: str, history: DataHistory, t_crash: int
              ) -> tuple[CheckResult, bool]:
        return check_with_volume(image, history, t_crash), False


FILESYSTEMS: dict[str, Callable[[], Filesystem]] = {"ext4": Ext4, "atomicfs": AtomicFs}


def page_workload(scale: float = 1.0) -> PageWorkload:
    return PageWorkload(ops=max(1, int(120 * scale)), unit=PAGE)


def record(env: Env, fs: Filesystem, seed: int, scale: float = 1.0
           ) -> tuple[str, str, DataHistory]:
    """Make fs on a base image, run the page workload on a copy of it through the
    recording device; the base, the recording and the workload's history."""
    base = env.new_path(f"{fs.name}-base.img")
    fs.make(base)
    disk = env.new_path(f"{fs.name}-disk.img")
    sparse_copy(base, disk)
    rec_path = env.new_path(f"{fs.name}.rec")
    mnt = env.new_path(f"{fs.name}-mnt")
    os.makedirs(mnt)
    with recording_device(disk, rec_path, env.workdir) as dev:
        fs.mount(dev, mnt)
        try:
            history = page_workload(scale).run(mnt, seed, threading.Event())
        except (WorkloadError, OSError) as exc:
            raise WorkloadError(f"the workload failed on {fs.name}: {exc}") from exc
        finally:
            _umount(fs, mnt)
    os.unlink(disk)
    return base, rec_path, history


def flush_cut_states(rec: Recording, tear: int, limit: int) -> list[CrashState]:
    """The worst cut at up to `limit` flushes (spread over the run) that have a write
    longer than `tear` to cover: just before the flush starts, every write it would have
    covered reached the device, the long ones torn (only their first tear-sized piece).
    No randomness: if a filesystem tears pages whenever a flush comes too late, these
    states show it."""
    starts = sorted(start for start, _ in rec.flush_pairs
                    if any(rec.writes[i].length > tear for i in rec.in_flight_writes(start)))
    if len(starts) > limit:
        starts = [starts[k * len(starts) // limit] for k in range(limit)]
    states = []
    for k, c in enumerate(starts):
        applied = [Applied(i, WHOLE) if rec.writes[i].atomic or rec.writes[i].length <= tear
                   else Applied(i, TORN, [(0, tear)]) for i in rec.in_flight_writes(c)]
        states.append(CrashState(k, c, rec.durable_start(c), applied, len(applied)))
    return states


def run_filesystem(env: Env, fs: Filesystem, states: int, seed: int, tear: int,
                   scale: float = 1.0, flush_cuts: int = 0,
                   progress: Callable[[str], None] | None = None) -> FsResult:
    """Record the page workload on fs over the recording device, then check `states`
    random crash states drawn from the recording and up to `flush_cuts` worst cuts."""
    out = FsResult(name=fs.name)
    t0 = time.monotonic()
    base, rec_path, history = record(env, fs, seed, scale)
    out.pages = sorted({(history.files[f], u) for f, u in history.units},
                       key=lambda p: (p[0], p[1]))
    with Recording(rec_path) as rec:
        out.device_writes = len(rec.writes)
        out.flushes = len(rec.flush_pairs)
        chosen = choose_states(rec, states, seed, tear)
        for st, res, repaired in _check_states(env, fs, rec, base, history, chosen):
            out.torn_writes += st.torn_writes
            out.repaired_states += 1 if repaired else 0
            out.add(res)
            if progress and (out.states % 100 == 0 or out.states == states):
                progress(f"{fs.name}: {out.states}/{states} crash states checked")
        cuts = flush_cut_states(rec, tear, flush_cuts) if flush_cuts else []
        for _, res, repaired in _check_states(env, fs, rec, base, history, cuts):
            out.repaired_states += 1 if repaired else 0
            out.flush_cuts.add(res)
    os.unlink(rec_path)
    os.unlink(base)
    out.seconds = time.monotonic() - t0
    return out


def _check_states(env: Env, fs: Filesystem, rec: Recording, base: str,
                  history: DataHistory, states: list[CrashState]
                  ) -> Iterator[tuple[CrashState, CheckResult, bool]]:
    """Build each state (in crash-point order) and check it."""
    with StateBuilder(rec, base, env.scratch) as builder:
        for st in states:
            image = builder.build(st, env.new_path("state.img", scratch=True))
            try:
                res, repaired = fs.check(env, image, history, rec.time_before(st.crash_point))
            finally:
                os.unlink(image)
            yield st, res, repaired


def _umount(fs: Filesystem, mnt: str) -> None:
    """Unmount; if that fails, detach lazily (so that the loop and recording devices can
    go) and report the failure."""
    try:
        fs.umount(mnt)
    except UserError:
        if mounted_fstype(mnt) is not None:
            run(["umount", "-l", mnt], check=False)
        raise


def compare(states: int, seed: int = 1, tear: int = 4096, scale: float = 1.0,
            flush_cuts: int = 30, workdir: str | None = None,
            names: tuple[str, ...] = ("ext4", "atomicfs"),
            progress: Callable[[str], None] | None = None) -> list[FsResult]:
    """The same workload and crash model on each filesystem, in one working directory
    (removed at the end, with every mount and device made)."""
    results = []
    with Env("file", workdir) as env:
        for name in names:
            results.append(run_filesystem(env, FILESYSTEMS[name](), states, seed, tear,
                                          scale, flush_cuts, progress))
    return results


def table(results: list[FsResult]) -> str:
    """The side-by-side summary."""
    def torn(t: Tally) -> str:
        return f"{t.torn_pages} (in {t.torn_states} states)"

    def lost(t: Tally) -> str:
        return f"{t.lost_writes} (in {t.lost_states} states)"
    rows: list[tuple[str, Callable[[FsResult], object]]] = [
        ("random cuts: crash states", lambda r: r.states),
        ("  torn 16 KiB pages", torn),
        ("  lost fsynced writes", lost),
        ("cuts just before a flush", lambda r: r.flush_cuts.states),
        ("  torn 16 KiB pages", lambda r: torn(r.flush_cuts)),
        ("  lost fsynced writes", lambda r: lost(r.flush_cuts)),
        ("states fsck had to repair", lambda r: r.repaired_states),
        ("states not recoverable", lambda r: r.failures + r.flush_cuts.failures),
        ("device writes / flushes", lambda r: f"{r.device_writes} / {r.flushes}"),
        ("writes torn by random cuts", lambda r: r.torn_writes),
        ("time", lambda r: f"{r.seconds:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(r.name), *(len(str(f(r))) for _, f in rows)) + 3 for r in results]
    lines = [" " * width + "".join(r.name.rjust(c) for r, c in zip(results, cols))]
    for label, f in rows:
        lines.append(label.ljust(width) + "".join(str(f(r)).rjust(c)
                                                  for r, c in zip(results, cols)))
    return "\n".join(lines)
