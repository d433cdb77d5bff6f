"""Kernel ext4 and atomicfs under the same power cuts (what `make demo` shows).

Both filesystems run the same workload of 16 KiB page writes on the same kind of device: a
loop device over the recording device of atomicfs.crash_blockdev, which records every
write and flush whatever the filesystem. The crash explorer's generator then draws the
same kind of crash states from each recording (a write not covered by a completed flush
may be missing, whole or torn at `tear` bytes), and the same oracle (self-identifying
sectors: is each 16 KiB page one version? is every fsynced write there?) judges what each
filesystem recovers:

* ext4: the state image is repaired by `e2fsck -fy` (journal replay, then a forced
  check), mounted read-only through a loop device (`mount -o ro,loop`), and read through
  the kernel;
* atomicfs: the state is recovered and read in this process through its Volume, as the
  crash explorer does (crash_check.check_with_volume), fsck before and after.

ext4 is mounted with its defaults (data=ordered, delayed allocation, 4 KiB blocks);
atomicfs with its defaults, its root's atomic unit 16 KiB.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from atomicfs.crash_blockdev import recording_device
from atomicfs.crash_check import CheckResult, check_with_volume, read_tree
from atomicfs.crash_env import Env, atomicfs_cli, mounted_fstype, run
from atomicfs.crash_record import Recording, StateBuilder, choose_states, sparse_copy
from atomicfs.crash_workloads import DataHistory, DataWorkload, SyncRequest, Verdict, \
    WorkloadError
from atomicfs.errors import UserError

log = logging.getLogger(__name__)

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
class FsResult:
    """What one filesystem went through: counts, and for each state the pages it tore."""

    name: str
    states: int = 0
    torn_pages: int = 0
    torn_states: int = 0
    lost_writes: int = 0
    lost_states: int = 0
    repaired_states: int = 0  # ext4: e2fsck corrected something beyond the journal
    failures: int = 0  # the state could not be recovered or read (mount, fsck, Volume)
    device_writes: int = 0
    flushes: int = 0
    torn_writes: int = 0  # writes the generator tore
    seconds: float = 0.0
    pages: list[tuple[str, int]] = field(default_factory=list)  # the grid's columns
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


def run_filesystem(env: Env, fs: Filesystem, states: int, seed: int, tear: int,
                   scale: float = 1.0,
                   progress: Callable[[str], None] | None = None) -> FsResult:
    """Record the page workload on fs over the recording device, then check `states`
    crash states drawn from the recording."""
    out = FsResult(fs.name)
    t0 = time.monotonic()
    base = env.new_path(f"{fs.name}-base.img")
    fs.make(base)
    disk = env.new_path(f"{fs.name}-disk.img")
    sparse_copy(base, disk)
    rec_path = env.new_path(f"{fs.name}.rec")
    wl = page_workload(scale)
    mnt = env.new_path(f"{fs.name}-mnt")
    os.makedirs(mnt)
    with recording_device(disk, rec_path, env.workdir) as dev:
        fs.mount(dev, mnt)
        try:
            history = wl.run(mnt, seed, threading.Event())
        except (WorkloadError, OSError) as exc:
            raise WorkloadError(f"the workload failed on {fs.name}: {exc}") from exc
        finally:
            _umount(fs, mnt)
    os.unlink(disk)
    out.pages = sorted({(history.files[f], u) for f, u in history.units},
                       key=lambda p: (p[0], p[1]))
    with Recording(rec_path) as rec, StateBuilder(rec, base, env.scratch) as builder:
        out.device_writes = len(rec.writes)
        out.flushes = len(rec.flush_pairs)
        for st in choose_states(rec, states, seed, tear):
            image = builder.build(st, env.new_path("state.img", scratch=True))
            try:
                res, repaired = fs.check(env, image, history, rec.time_before(st.crash_point))
            finally:
                os.unlink(image)
            out.torn_writes += st.torn_writes
            out.repaired_states += 1 if repaired else 0
            out.add(res)
            if progress and (out.states % 100 == 0 or out.states == states):
                progress(f"{fs.name}: {out.states}/{states} crash states checked")
    os.unlink(rec_path)
    os.unlink(base)
    out.seconds = time.monotonic() - t0
    return out


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
            workdir: str | None = None, names: tuple[str, ...] = ("ext4", "atomicfs"),
            progress: Callable[[str], None] | None = None) -> list[FsResult]:
    """The same workload and crash model on each filesystem, in one working directory
    (removed at the end, with every mount and device made)."""
    results = []
    with Env("file", workdir) as env:
        for name in names:
            results.append(run_filesystem(env, FILESYSTEMS[name](), states, seed, tear,
                                          scale, progress))
    return results


def table(results: list[FsResult]) -> str:
    """The side-by-side summary."""
    rows = [
        ("crash states checked", lambda r: r.states),
        ("torn 16 KiB pages", lambda r: f"{r.torn_pages} (in {r.torn_states} states)"),
        ("lost fsynced writes", lambda r: f"{r.lost_writes} (in {r.lost_states} states)"),
        ("states fsck had to repair", lambda r: r.repaired_states),
        ("states not recoverable", lambda r: r.failures),
        ("device writes / flushes", lambda r: f"{r.device_writes} / {r.flushes}"),
        ("writes torn by the power cut", lambda r: r.torn_writes),
        ("time", lambda r: f"{r.seconds:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(r.name), *(len(str(f(r))) for _, f in rows)) + 3 for r in results]
    lines = [" " * width + "".join(r.name.rjust(c) for r, c in zip(results, cols))]
    for label, f in rows:
        lines.append(label.ljust(width) + "".join(str(f(r)).rjust(c)
                                                  for r, c in zip(results, cols)))
    return "\n".join(lines)
