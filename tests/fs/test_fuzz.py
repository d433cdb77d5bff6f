"""Fuzzed images: random bit flips in the superblock, the metadata snapshot and the log,
with checksums recomputed so that only the consistency checks stand between the damage and
a mount. For every image: no traceback, no hang, and either the open is refused with one
line (UserError) or it succeeds and fsck calls the image clean; fsck and the open agree.

Most images go through a read-only Volume (no FUSE, nothing written, so the same image is
restored by undoing the flips); every 20th accepted one is also opened read-write, used and
shut down, after which fsck must still be clean. A few real mounts: tests/mount/
test_reliability.py."""
from __future__ import annotations

import os
import random
import shutil
import signal
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trio

from atomicfs.errors import UserError
from atomicfs.fs import AtomicFS
from atomicfs.fsck import fsck
from atomicfs.metadata import XATTR_ATOMIC_UNIT
from atomicfs.mkfs import mkfs
from atomicfs.options import MountOptions
from atomicfs.volume import Volume
from tests.fs import damage
from tests.fs.helpers import Ctx, Driver, open_fs

IMAGES = int(os.environ.get("ATOMICFS_FUZZ_IMAGES", "300"))
SEED = int(os.environ.get("ATOMICFS_FUZZ_SEED", "12"))
PER_IMAGE_TIMEOUT = 30  # seconds: a hang fails the test instead of stalling CI


async def _populate(d: Driver, rounds: int) -> None:
    for r in range(rounds):
        await d.mkdir(f"d{r}")
        await d.mkdir(f"d{r}/sub")
        await d.create(f"d{r}/small", os.urandom(100 + r))
        await d.create(f"d{r}/sub/big", os.urandom(70_000 + 4096 * r))
        await d.symlink(f"../d{r}/small", f"d{r}/link")
        await d.setxattr(f"d{r}/small", "user.note", b"x" * (10 + r))
        await d.link(f"d{r}/small", f"d{r}/hard")
    await d.mkdir("atomic")
    await d.setxattr("atomic", XATTR_ATOMIC_UNIT.decode(), b"16384")
    await d.create("atomic/unit", os.urandom(3 * 16384))


async def _crash_with_log(image: str) -> None:
    """Make changes, commit them to the log and stop without a checkpoint (a crash)."""
    vol = Volume.open(image, MountOptions(commit_interval=3600.0))
    try:
        async with trio.open_nursery() as nursery:
            await vol.start(nursery)
            fs = AtomicFS(vol)
            d = Driver(fs)
            await d.create("late", os.urandom(5000))
            await d.rename("d0/small", "d1/moved")
            await d.unlink("d2/hard")
            await d.create("atomic/logged", os.urandom(16384))
            await d.setxattr("late", "user.when", b"after the checkpoint")
            await vol.journal.commit()
            nursery.cancel_scope.cancel()
    finally:
        vol.close()


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two checkpoints (so a previous snapshot is kept) and a log to replay."""
    path = str(tmp_path_factory.mktemp("fuzz") / "base.img")
    mkfs(path, size=64 << 20)

    async def build() -> None:
        async with open_fs(path) as d:
            await _populate(d, 3)
        async with open_fs(path) as d:
            await d.create("second", os.urandom(9000))
        await _crash_with_log(path)

    trio.run(build)
    assert damage.newest(path).prev_snap_block
    assert damage.log_batches(path)
    assert fsck(path).clean
    yield path


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def _open_ro(image: str) -> tuple[str | None, list[str]]:
    """Open read-only and read everything through the Operations. (why it was refused,
    []) or (None, what the open survived: bad slots, an unreadable snapshot)."""
    try:
        vol = Volume.open(image, MountOptions(ro=True))
    except UserError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg, msg
        return msg, []
    rec = vol.recovered
    assert rec is not None
    survived = list(rec.slot_problems) + ([rec.kept_problem] if rec.kept_problem else [])
    if rec.fallback:
        survived.append(rec.fallback)

    async def walk() -> None:
        async with trio.open_nursery() as nursery:
            await vol.start(nursery)
            fs = AtomicFS(vol)
            ctx = Ctx()
            for inode in list(vol.md.inodes.values()):
                await fs.getattr(inode.ino, ctx)
                if stat.S_ISREG(inode.mode):
                    fi = await fs.open(inode.ino, os.O_RDONLY, ctx)
                    await fs.read(fi.fh, 0, 1 << 16)
                    await fs.release(fi.fh)
                elif stat.S_ISLNK(inode.mode):
                    await fs.readlink(inode.ino, ctx)
            assert await vol.shutdown()
            nursery.cancel_scope.cancel()

    try:
        trio.run(walk)
    finally:
        vol.close()
    return None, survived


def _use_rw(image: str) -> None:
    """Mount read-write, change something, shut down (checkpoint)."""
    async def use() -> None:
        async with open_fs(image) as d:
            await d.create("written-after-fuzz", b"hello")
            await d.mkdir("dir-after-fuzz")
    trio.run(use)


DAMAGES: list[tuple[str, Callable[[str, random.Random], damage.Undo]]] = [
    ("superblock", lambda p, r: damage.damage_superblock(p, r, nbits=r.choice((1, 1, 2)))),
    ("snapshot", lambda p, r: damage.damage_snapshot(p, r, nbits=r.choice((1, 1, 2, 4)))),
    ("snapshot header", damage.damage_snapshot_header),
    ("log", lambda p, r: damage.damage_log(p, r, nbits=r.choice((1, 1, 2)))),
    ("snapshot, no crc", lambda p, r: damage.damage_snapshot(p, r, recompute=False,
                                                             nbits=32)),
]


@pytest.mark.daemon_log(allow=[r"the newest metadata snapshot is damaged \(",
                               r"superblock slot [AB]: .*; run `atomicfs fsck --repair`$"])
def test_fuzzed_images_are_refused_or_clean(base_image: str, tmp_path: Path) -> None:
    image = str(tmp_path / "fuzz.img")
    shutil.copyfile(base_image, image)
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(IMAGES):
            kind, fn = DAMAGES[i % len(DAMAGES)] if i < len(DAMAGES) else rng.choice(DAMAGES)
            undo = fn(image, rng)
            signal.alarm(PER_IMAGE_TIMEOUT)
            try:
                outcome = _one(image, i, kind)
            except Hang:
                pytest.fail(f"image {i} ({kind}, seed {SEED}): hung")
            finally:
                signal.alarm(0)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome == "clean" and i % 20 == 0:
                _use_rw(image)
                rep = fsck(image)
                assert rep.clean, f"image {i} ({kind}): after a rw mount {rep.problems}"
                shutil.copyfile(base_image, image)  # written to: start again from the base
            elif outcome != "clean" and i % 5 == 0:
                signal.alarm(PER_IMAGE_TIMEOUT)
                try:
                    repaired = _repair(image, f"image {i} ({kind}, seed {SEED})")
                finally:
                    signal.alarm(0)
                outcomes[repaired] = outcomes.get(repaired, 0) + 1
                shutil.copyfile(base_image, image)
            else:
                damage.restore(image, undo)
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz outcomes over {IMAGES} images: {outcomes}")
    assert outcomes.get("refused", 0) and outcomes.get("clean", 0)


def _repair(image: str, what: str) -> str:
    """fsck --repair either gives up with one line or leaves an image that fsck calls
    clean and that opens (and reads) read-write."""
    try:
        rep = fsck(image, repair=True)
    except UserError as exc:
        assert "\n" not in str(exc)
        return "repair refused"
    assert rep.clean and rep.fixes, f"{what}: after repair {rep.problems}, {rep.fixes}"
    refused, survived = _open_ro(image)
    assert refused is None and not survived, f"{what}: repaired, then {refused}{survived}"
    _use_rw(image)
    rep = fsck(image)
    assert rep.clean, f"{what}: repaired and used, then {rep.problems}"
    return "repaired"


def _one(image: str, i: int, kind: str) -> str:
    what = f"image {i} ({kind}, seed {SEED})"
    try:
        rep = fsck(image)
        fsck_clean: bool | None = rep.clean
        problems = rep.problems
    except UserError as exc:  # not an atomicfs any more (both slots or geometry)
        fsck_clean, problems = None, [str(exc)]
    refused, survived = _open_ro(image)
    if refused is None:
        # fsck reports what the open survived (as damage: the redundancy is gone), and
        # nothing else
        other = [p for p in problems if not p.startswith("lost: ")
                 and not any(s in p for s in survived)]
        assert not other, f"{what}: opened, but fsck says {problems}"
        assert bool(survived) == (not fsck_clean), f"{what}: {survived} / {problems}"
        return "survived" if survived else "clean"
    assert not fsck_clean, f"{what}: fsck clean, but the open was refused: {refused}"
    return "refused"
