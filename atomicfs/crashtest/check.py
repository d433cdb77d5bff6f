"""Checking one crash state: recover it, read it, run the oracle, fsck it.

Two ways to recover a state, with the same oracle:

* `check_with_volume`: in this process, through atomicfs.volume.Volume, which is what the
  daemon runs without FUSE: open (superblock, snapshot, log replay), start (orphans,
  checkpoint), read every file through the page cache, shut down (write back, checkpoint),
  then fsck. No kernel mount, so thousands of states take minutes, not hours.
* `check_with_mount`: a real `atomicfs mount` of the state (image file, loop device or
  image on XFS, as recorded), reading through the kernel, then `atomicfs umount` and
  `atomicfs fsck`. Slower; the explorer runs a sample of states this way so that the FUSE
  layer and the daemon's start-up are in the loop too.

Both also fsck the state as the crash left it (read-only: the log is replayed in memory),
since that is what a user runs after a power loss.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

import trio

from atomicfs.crashtest.env import Env, mounted
from atomicfs.crashtest.workloads.base import FileView, FsView, History, Verdict, file_kind
from atomicfs.errors import UserError
from atomicfs.fsck import fsck
from atomicfs.metadata import iter_tree
from atomicfs.options import MountOptions
from atomicfs.volume import Volume

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20


@dataclass
class CheckResult:
    verdict: Verdict = field(default_factory=Verdict)
    mount_failure: str | None = None
    fsck_failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.verdict.ok and self.mount_failure is None and self.fsck_failure is None

    def problems(self) -> list[str]:
        out = []
        if self.mount_failure:
            out.append(f"mount failed: {self.mount_failure}")
        if self.fsck_failure:
            out.append(f"fsck: {self.fsck_failure}")
        return out + self.verdict.problems


def fsck_problem(path: str) -> str | None:
    """None when fsck finds the filesystem clean, else its first complaint."""
    try:
        rep = fsck(path)
    except Exception as exc:  # noqa: BLE001 - any crash of fsck is a finding
        return f"{type(exc).__name__}: {exc}"
    if rep.clean:
        return None
    return f"{len(rep.problems)} problems, first: {rep.problems[0]}"


# ------------------------------------------------------------------- through a Volume

def check_with_volume(image: str, history: History, t_crash: int,
                      opts: MountOptions | None = None) -> CheckResult:
    res = CheckResult()
    res.fsck_failure = fsck_problem(image)
    if res.fsck_failure:
        res.fsck_failure = f"before recovery: {res.fsck_failure}"
    try:
        view = recover_and_read(image, opts or MountOptions())
    except Exception as exc:  # noqa: BLE001 - recovery must succeed by itself
        log.debug("recovery of %s failed", image, exc_info=True)
        res.mount_failure = f"{type(exc).__name__}: {exc}"
        return res
    res.verdict = history.check(view, t_crash)
    after = fsck_problem(image)
    if after and not res.fsck_failure:
        res.fsck_failure = f"after recovery: {after}"
    return res


def recover_and_read(image: str, opts: MountOptions) -> FsView:
    """Open and recover the filesystem, read it all, shut it down cleanly."""
    vol = Volume.open(image, opts)
    try:
        return trio.run(_serve_and_read, vol)
    finally:
        vol.close()


async def _serve_and_read(vol: Volume) -> FsView:
    async with trio.open_nursery() as nursery:
        await vol.start(nursery)
        view = await read_volume(vol)
        ok = await vol.shutdown()
        nursery.cancel_scope.cancel()
    if not ok:
        raise OSError(errno.EIO, "shutdown could not write everything back")
    return view


async def read_volume(vol: Volume) -> FsView:
    """Every name below the root, with attributes and (regular files) contents, read
    through the page cache as FUSE reads would."""
    view: FsView = {}
    for raw_path, inode in iter_tree(vol.md):
        if raw_path == b"/":
            continue
        path = os.fsdecode(raw_path.lstrip(b"/"))
        kind = file_kind(inode.mode)
        fv = FileView(path, kind, inode.ino, inode.size,
                      {os.fsdecode(k): v for k, v in inode.xattrs.items()})
        if kind == "f":
            fv.data = await _read_file(vol, inode)
        elif kind == "l":
            fv.target = os.fsdecode(inode.target or b"")
        view[path] = fv
    return view


async def _read_file(vol: Volume, inode) -> bytes:  # type: ignore[no-untyped-def]
    m = vol.mapping(inode)
    out = bytearray()
    while len(out) < inode.size:
        chunk = await vol.filemap.read(inode, m, len(out), READ_CHUNK)
        if not chunk:
            break
        out += chunk
    return bytes(out)


# --------------------------------------------------------------------- through a mount

def check_with_mount(env: Env, image: str, history: History, t_crash: int) -> CheckResult:
    """Mount the state for real (on the device kind of the recording), read it through
    the kernel, unmount, fsck."""
    res = CheckResult()
    res.fsck_failure = fsck_problem(image)
    if res.fsck_failure:
        res.fsck_failure = f"before recovery: {res.fsck_failure}"
    with env.target_for(image) as target:
        try:
            with mounted(env, target, []) as mnt:
                view = read_tree(mnt.path)
                clean = mnt.umount()
        except (UserError, OSError) as exc:
            res.mount_failure = str(exc)
            return res
        if not clean:
            res.mount_failure = "umount reported errors"
        res.verdict = history.check(view, t_crash)
        after = fsck_problem(target)
        if after and not res.fsck_failure:
            res.fsck_failure = f"after recovery: {after}"
    return res


def read_tree(root: str) -> FsView:
    """The same view as read_volume, through a mounted filesystem."""
    view: FsView = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            kind = file_kind(st.st_mode)
            xattrs = {}
            if kind in ("f", "d"):
                for x in os.listxattr(full, follow_symlinks=False):
                    xattrs[x] = os.getxattr(full, x, follow_symlinks=False)
            fv = FileView(rel, kind, st.st_ino, st.st_size, xattrs)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    fv.data = f.read()
            elif stat.S_ISLNK(st.st_mode):
                fv.target = os.readlink(full)
            view[rel] = fv
    return view
