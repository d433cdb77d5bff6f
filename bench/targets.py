"""The filesystems under test, each set up in turn on the environment's one loop device.

- atomicfs-sw: atomicfs formatted on the loop device (no atomic limits there: software path);
- atomicfs-hw: atomicfs on an image file on kernel XFS made on the loop device (statx reports
  atomic write limits for that file: hardware path, pwritev2(RWF_ATOMIC) in place);
- xfs, ext4: the kernel's filesystems formatted on the loop device, mounted directly;
- nullfs, nullfs-xattr: bench/nullfs.py, no device (the FUSE transport's ceiling); the
  -xattr variant answers getxattr like a filesystem with extended attributes, so the kernel
  asks it for security.capability before every write, as it asks atomicfs;
- nullfs-perm: bench/nullfs.py mounted with default_permissions, as atomicfs is, for the
  metadata rows only (the kernel then asks for a directory's attributes after each create
  or unlink in it: the ceiling of a filesystem that lets the kernel check permissions).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.sysutil import (ATOMICFS, REPO, BenchError, Environment, drop_kernel_caches,
                           fstype_at, run, start_fuse_daemon, stop_fuse_daemon, syncfs,
                           unmount, write_zeros)

log = logging.getLogger(__name__)

UNIT = 16384
HW_IMAGE_SIZE = 2 << 30
XATTR_UNIT = "user.atomicfs.atomic_unit"
XATTR_CONTROL = "user.atomicfs.control"
XATTR_STAT = "user.atomicfs.stat"


class Target:
    """One filesystem under test, mounted at env.mnt while it is measured."""

    name = ""
    family = ""  # "atomicfs", "nullfs" or "kernel"
    description = ""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.root = env.mnt

    @property
    def atomic_dir(self) -> Path:
        """Where the 16 KiB random-write files live (a 16 KiB-unit directory on atomicfs)."""
        return self.root / "u16k"

    @property
    def plain_dir(self) -> Path:
        return self.root / "plain"

    def setup(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        unmount(self.root)

    def settle(self) -> None:
        """Make everything written so far durable, so the next run starts clean."""
        syncfs(self.root)

    def drop_caches(self) -> None:
        self.settle()
        drop_kernel_caches()

    def stats(self) -> dict[str, Any] | None:
        return None

    def daemon_pid(self) -> int:
        """The serving process (FUSE targets), 0 for the kernel's filesystems."""
        return 0

    def _make_dirs(self) -> None:
        self.atomic_dir.mkdir()
        self.plain_dir.mkdir()


class KernelTarget(Target):
    family = "kernel"

    def __init__(self, env: Environment, name: str) -> None:
        super().__init__(env)
        self.name = name
        if name == "xfs":
            self.mkfs = ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]
            self.description = "kernel XFS (mkfs.xfs -m reflink=1) on the loop device"
        else:
            # No lazy initialisation: ext4lazyinit would write inode tables during the runs.
            self.mkfs = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
            self.description = "kernel ext4 (mkfs.ext4 defaults, no lazy init) on the loop device"

    def setup(self) -> None:
        assert self.env.loop
        run(self.mkfs + [self.env.loop])
        run(["mount", self.env.loop, str(self.root)])
        self._make_dirs()


class AtomicTarget(Target):
    family = "atomicfs"

    def __init__(self, env: Environment, hardware: bool, allow_other: bool = False) -> None:
        super().__init__(env)
        self.hardware = hardware
        self.allow_other = allow_other  # for servers that run as their own user
        self.name = "atomicfs-hw" if hardware else "atomicfs-sw"
        self.description = (
            "atomicfs on a written-out image file on kernel XFS on the loop device "
            "(-o atomic_path=hardware: RWF_ATOMIC in place)" if hardware else
            "atomicfs on the loop device (-o atomic_path=software: checksummed log)")
        self.pid = 0

    def setup(self) -> None:
        assert self.env.loop
        if self.hardware:
            run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.env.loop])
            run(["mount", self.env.loop, str(self.env.host)])
            image = self.env.host / "atomicfs.img"
            with open(image, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, HW_IMAGE_SIZE)
            write_zeros(image, HW_IMAGE_SIZE)  # no unwritten extents under atomicfs
            device = str(image)
        else:
            device = self.env.loop
        run(ATOMICFS + ["mkfs", device, "--force"])
        path = "hardware" if self.hardware else "software"
        opts = f"atomic_path={path}" + (",allow_other" if self.allow_other else "")
        run(ATOMICFS + ["mount", device, str(self.root), "-o", opts], timeout=120)
        self._make_dirs()
        os.setxattr(self.atomic_dir, XATTR_UNIT, str(UNIT).encode())
        st = self.stats() or {}
        self.pid = int(st.get("pid", 0))
        got = st.get("device", {}).get("atomic_path")
        if got != path:
            raise BenchError(f"{self.name}: the mount reports atomic path {got!r}")

    def teardown(self) -> None:
        try:
            if fstype_at(self.root) == "fuse.atomicfs":
                res = run(ATOMICFS + ["umount", str(self.root)], check=False, timeout=600)
                if res.returncode != 0:
                    log.warning("%s: umount: %s", self.name, res.stderr.strip())
            unmount(self.root)
        finally:
            if self.hardware:
                unmount(self.env.host)

    def settle(self) -> None:
        os.setxattr(self.root, XATTR_CONTROL, b"sync")  # write back all, checkpoint

    def drop_caches(self) -> None:
        self.settle()
        os.setxattr(self.root, XATTR_CONTROL, b"drop_caches")
        drop_kernel_caches()

    def stats(self) -> dict[str, Any] | None:
        return json.loads(os.getxattr(self.root, XATTR_STAT))

    def daemon_pid(self) -> int:
        return self.pid


class NullTarget(Target):
    family = "nullfs"

    def __init__(self, env: Environment, variant: str = "") -> None:
        super().__init__(env)
        self.variant = variant  # "", "xattr" or "perm"
        self.name = f"nullfs-{variant}" if variant else "nullfs"
        self.description = {
            "xattr": "bench/nullfs.py --xattrs: discards writes, reads zeros, answers "
                     "getxattr (so pays the per-write security.capability round trip, as "
                     "atomicfs did before it negotiated FUSE_HANDLE_KILLPRIV_V2)",
            "perm": "bench/nullfs.py --perm: nullfs mounted with default_permissions, as "
                    "atomicfs is (the kernel asks for the directory's attributes after each "
                    "create or unlink); metadata rows only",
            "": "bench/nullfs.py: discards writes, reads zeros (getxattr unimplemented: the "
                "kernel stops asking)"}[variant]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def atomic_dir(self) -> Path:
        return self.root  # nullfs has one directory

    @property
    def plain_dir(self) -> Path:
        return self.root

    def setup(self) -> None:
        args = [sys.executable, str(REPO / "bench" / "nullfs.py"), str(self.root)]
        if self.variant == "xattr":
            args.append("--xattrs")
        elif self.variant == "perm":
            args.append("--perm")
        self.proc = start_fuse_daemon(args, self.root, "fuse.nullfs",
                                      self.env.workdir / f"{self.name}.log", "nullfs")

    def teardown(self) -> None:
        try:
            stop_fuse_daemon(self.proc, self.root)
        finally:
            self.proc = None

    def settle(self) -> None:
        pass  # nothing is ever stored

    def daemon_pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


ALL_TARGETS = ("atomicfs-sw", "atomicfs-hw", "nullfs", "nullfs-xattr", "nullfs-perm", "xfs",
               "ext4")
# Targets that run only the metadata rows (they are those rows' ceiling, nothing else's)
META_ONLY_TARGETS = frozenset({"nullfs-perm"})


def stub(name: str) -> Target:
    """A target that is never set up: its name and family, enough for Workload.spec_for."""
    t = Target.__new__(Target)
    t.name = name
    t.family = ("atomicfs" if name.startswith("atomicfs") else
                "nullfs" if name.startswith("nullfs") else "kernel")
    return t


def make_target(env: Environment, name: str) -> Target:
    if name == "atomicfs-sw":
        return AtomicTarget(env, hardware=False)
    if name == "atomicfs-hw":
        return AtomicTarget(env, hardware=True)
    if name in ("nullfs", "nullfs-xattr", "nullfs-perm"):
        return NullTarget(env, name.partition("-")[2])
    if name in ("xfs", "ext4"):
        return KernelTarget(env, name)
    raise BenchError(f"unknown target {name!r} (known: {', '.join(ALL_TARGETS)})")
