"""What else a target holds, found by util-linux's libblkid as mkfs.xfs and wipefs find it.

The `blkid -p` command is used rather than a Python binding: it ships with util-linux on
every Debian machine (the bindings on PyPI need libblkid's headers and a compiler, and are
not kept as well), and its `-o export` output is a stable KEY=value interface. libblkid knows
some hundred filesystems, RAID members, volume managers, partition tables and containers
(minix, cramfs, bfs, LVM2, md, ISO9660, squashfs, ZFS, f2fs, bcache, ...); atomicfs is not one
of them, so our own superblock is recognised separately, by mkfs.
"""
from __future__ import annotations

import logging
import shutil
import subprocess

from atomicfs.errors import UserError

log = logging.getLogger(__name__)

# blkid's exit codes (blkid(8)): 0 found, 2 nothing found, 8 ambivalent (several signatures).
_FOUND, _NOTHING, _AMBIVALENT = 0, 2, 8


def _blkid() -> str:
    tool = shutil.which("blkid") or next(
        (p for p in ("/sbin/blkid", "/usr/sbin/blkid") if shutil.which(p)), None)
    if tool is None:
        raise UserError("blkid not found (install the util-linux package); it is needed to "
                        "check what the target holds before formatting it")
    return tool


def foreign_signature(path: str) -> str | None:
    """A description of the filesystem, partition table or volume signature that libblkid
    finds on path (a block device or file), or None when it finds none."""
    res = subprocess.run([_blkid(), "-p", "-o", "export", path], capture_output=True,
                         text=True, timeout=120)
    if res.returncode == _NOTHING:
        return None
    if res.returncode == _AMBIVALENT:
        return "more than one filesystem or volume signature (blkid: ambivalent result)"
    if res.returncode != _FOUND:
        reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else \
            f"exit {res.returncode}"
        raise UserError(f"cannot probe {path} with blkid: {reason}")
    found = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    log.debug("blkid -p %s: %s", path, found)
    if "TYPE" in found:
        usage = found.get("USAGE", "filesystem")
        what = {"filesystem": "filesystem", "raid": "RAID member", "crypto": "encrypted volume",
                "other": "signature"}.get(usage, usage)
        label = f" labelled {found['LABEL']!r}" if found.get("LABEL") else ""
        article = "an" if found["TYPE"][:1].lower() in "aeiou" else "a"
        return f"{article} {found['TYPE']} {what}{label}"
    if "PTTYPE" in found:
        return f"a {found['PTTYPE']} partition table"
    return "a signature blkid recognises: " + ", ".join(f"{k}={v}" for k, v in found.items()
                                                        if k != "DEVNAME")


def wipe_signatures(path: str) -> None:
    """Erase every signature libblkid finds (wipefs -a), also those mkfs would not
    overwrite, such as an md superblock or a GPT copy at the end of the target. Called
    after mkfs --force and its exclusive open (so nothing has it mounted): wipefs gets
    --force too, without which it keeps partition tables of image files."""
    tool = shutil.which("wipefs") or "/sbin/wipefs"
    res = subprocess.run([tool, "--all", "--force", "--quiet", path], capture_output=True,
                         text=True, timeout=120)
    if res.returncode != 0:
        reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else \
            f"exit {res.returncode}"
        raise UserError(f"cannot erase the old signatures on {path}: {reason}")
