"""The programs that mount(8), umount(8), mkfs(8) and fsck(8) run for an atomicfs:
mount.atomicfs (also installed as mount.fuse.atomicfs, for `mount -t fuse.atomicfs` and
fstab), umount.atomicfs, mkfs.atomicfs and fsck.atomicfs (also fsck.fuse.atomicfs).

Each speaks its caller's conventions: the argument forms these callers use, and their exit
codes (mount(8): 32 for a failed mount; fsck(8): 0, 1, 4, 8, 16, 32).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

from atomicfs import __version__
from atomicfs.cli import (SIZE_HELP, add_mkfs_arguments, add_mount_arguments, cmd_mkfs,
                          exit_code_rows, help_table, mount_option_rows)
from atomicfs.errors import NotAtomicfs, UserError

if TYPE_CHECKING:
    from atomicfs.fsck import FsckReport

log = logging.getLogger(__name__)

# mount(8)'s exit codes that its helpers share.
MOUNT_USAGE = 1
MOUNT_FAILURE = 32

# fsck(8)'s exit codes.
FSCK_OK = 0
FSCK_CORRECTED = 1
FSCK_UNCORRECTED = 4
FSCK_OPERATIONAL = 8
FSCK_USAGE = 16
FSCK_CANCELLED = 32
FSCK8_EXIT_CODES = ((FSCK_OK, "no errors"),
                   (FSCK_CORRECTED, "errors corrected"),
                   (FSCK_UNCORRECTED, "errors left uncorrected (with -n, or without a repair)"),
                   (FSCK_OPERATIONAL, "operational error: not an atomicfs, unreadable, "
                    "in use"),
                   (FSCK_USAGE, "usage or syntax error"),
                   (FSCK_CANCELLED, "cancelled by the user (SIGINT, SIGTERM)"))
MOUNT_EXIT_CODES = ((0, "mounted (or, with -f, the options are valid)"),
                    (MOUNT_USAGE, "incorrect invocation"),
                    (MOUNT_FAILURE, "mount failure: bad target, mountpoint or option"))


class _HelperParser(argparse.ArgumentParser):
    """argparse with a one-line error and the caller's usage exit code."""

    def __init__(self, *args: object, usage_code: int = 2, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.usage_code = usage_code

    def error(self, message: str) -> NoReturn:
        self.exit(self.usage_code, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _formatter() -> type[argparse.HelpFormatter]:
    return argparse.RawDescriptionHelpFormatter


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


# ------------------------------------------------------------------------------- mount

def build_mount_parser(prog: str = "mount.atomicfs") -> argparse.ArgumentParser:
    p = _HelperParser(
        prog=prog, usage_code=MOUNT_USAGE, formatter_class=_formatter(),
        description="Mount an atomicfs the way mount(8) runs its helpers: `mount -t "
        "fuse.atomicfs IMAGE DIR`, fstab lines of type fuse.atomicfs, and mount.fuse3's "
        "`atomicfs SOURCE DIR -o OPTS`. Options for mount(8), fstab and systemd are "
        "dropped; every other option is honoured or refused with one line.",
        epilog=help_table("mount options (-o)", mount_option_rows()) + "\n\n"
        + help_table("exit status", exit_code_rows(MOUNT_EXIT_CODES)) + "\n\n" + SIZE_HELP)
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    add_mount_arguments(p)
    p.add_argument("-s", dest="sloppy", action="store_true",
                   help="sloppy: drop unknown options with a warning instead of failing "
                   "(default: fail)")
    p.add_argument("-f", dest="fake", action="store_true",
                   help="fake: check the options, do not mount (default: mount)")
    p.add_argument("-n", dest="nomtab", action="store_true",
                   help="do not write /etc/mtab (accepted: there is none to write)")
    p.add_argument("-v", dest="verbose", action="store_true",
                   help="say what was mounted (default: quiet)")
    p.add_argument("-t", dest="type", metavar="TYPE", default="fuse.atomicfs",
                   help="filesystem type as mount(8) names it: fuse.atomicfs or atomicfs "
                   "(default: fuse.atomicfs)")
    p.add_argument("-N", dest="namespace", metavar="NS",
                   help="mount namespace: refused (not supported)")
    return p


def _sloppy_filter(groups: list[str]) -> list[str]:
    """The options of groups that parse, each unknown one dropped with a warning."""
    from atomicfs.options import parse_mount_options
    kept = []
    for group in groups:
        for item in group.split(","):
            try:
                parse_mount_options([item])
            except ValueError as exc:
                if str(exc).startswith("unknown mount option"):
                    print(f"mount.atomicfs: warning: {exc} dropped (-s)", file=sys.stderr)
                    continue
            kept.append(item)
    return [",".join(kept)]


def mount_main(argv: Sequence[str] | None = None, prog: str = "mount.atomicfs") -> int:
    """mount.atomicfs SOURCE DIR [-sfnv] [-o OPTS] [-t TYPE]; exit 32 when it fails."""
    _setup_logging()
    args = build_mount_parser(prog).parse_args(argv)
    from atomicfs import fuseconn
    fuseconn.load()  # before the daemon loads pyfuse3
    from atomicfs.daemon import mount
    from atomicfs.options import parse_mount_options
    try:
        if args.namespace is not None:
            raise UserError("-N (mounting in another namespace) is not supported")
        if args.type not in ("fuse.atomicfs", "atomicfs"):
            raise UserError(f"type {args.type} is not atomicfs")
        groups = _sloppy_filter(args.options) if args.sloppy else args.options
        try:
            opts = parse_mount_options(groups)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if args.fake:
            return 0
        code = mount(args.target, args.mountpoint, opts, foreground=False)
    except UserError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return MOUNT_FAILURE
    except KeyboardInterrupt:
        return MOUNT_FAILURE
    if code != 0:
        return MOUNT_FAILURE
    _register_umount_helper(args.target, args.mountpoint)
    if args.verbose:
        print(f"{prog}: {args.target} mounted on {args.mountpoint}")
    return 0


def _register_umount_helper(target: str, mountpoint: str) -> None:
    """Record uhelper=atomicfs for the mount in libmount's utab, so that umount(8) runs
    umount.fuse.atomicfs (write back, unmount, wait for the daemon) instead of a bare
    umount(2), after which the daemon would still be writing when umount returns.
    Without the record libmount takes the mount's type from statfs ("fuse") and finds no
    helper. A failure costs only that wait: it is logged, the mount stays. Other users
    unmount with fusermount3, which runs no helper: nothing to record for them."""
    if os.geteuid() != 0:
        return
    res = subprocess.run(["mount", "--fake", "--internal-only", "-t", "fuse.atomicfs",
                          "-o", "uhelper=atomicfs", os.path.abspath(target),
                          os.path.realpath(mountpoint)], capture_output=True, text=True)
    if res.returncode != 0:
        log.warning("umount(8) will not wait for write-back of %s: %s", mountpoint,
                    res.stderr.strip())


# ------------------------------------------------------------------------------ umount

def build_umount_parser() -> argparse.ArgumentParser:
    p = _HelperParser(
        prog="umount.atomicfs", usage_code=MOUNT_USAGE, formatter_class=_formatter(),
        description="What umount(8) runs for a mount of type fuse.atomicfs: write back "
        "everything, unmount and wait for the daemon to exit, so that the filesystem is at "
        "rest (and fsck can check it) when umount returns.",
        epilog=help_table("exit status", [("0", "unmounted, everything written"),
                                          ("32", "not unmounted, or not everything could "
                                           "be written (see the daemon log)")]))
    p.add_argument("mountpoint", help="where the atomicfs is mounted")
    p.add_argument("-l", dest="lazy", action="store_true",
                   help="lazy: detach now, the daemon writes back and exits once the mount "
                   "is no longer busy (default: wait)")
    p.add_argument("-f", dest="force", action="store_true",
                   help="force: abort the FUSE connection (dirty data is lost)")
    p.add_argument("-n", dest="nomtab", action="store_true", help="accepted (no mtab)")
    p.add_argument("-r", dest="remount_ro", action="store_true",
                   help="accepted (remounting read-only on failure is not supported)")
    p.add_argument("-v", dest="verbose", action="store_true", help="say what was unmounted")
    p.add_argument("-t", dest="type", metavar="TYPE", help="accepted (the type)")
    p.add_argument("-N", dest="namespace", metavar="NS", help="refused (not supported)")
    return p


def umount_main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    args = build_umount_parser().parse_args(argv)
    from atomicfs import daemon
    try:
        if args.namespace is not None:
            raise UserError("-N (unmounting in another namespace) is not supported")
        if args.lazy or args.force:
            _detach(args.mountpoint, force=args.force)
            code = 0
        else:
            code = daemon.umount(args.mountpoint)
    except UserError as exc:
        print(f"umount.atomicfs: {exc}", file=sys.stderr)
        return MOUNT_FAILURE
    if code == 0 and args.verbose:
        print(f"umount.atomicfs: {args.mountpoint} unmounted")
    return 0 if code == 0 else MOUNT_FAILURE


def _detach(mountpoint: str, force: bool) -> None:
    """umount -l / -f: the kernel's lazy detach or forced abort, without this helper."""
    from atomicfs.daemon import FSTYPE, find_mount
    path = os.path.realpath(mountpoint)
    mounted = find_mount(path)
    if mounted is None or mounted[0] != FSTYPE:
        raise UserError(f"{mountpoint} is not an atomicfs mountpoint")
    res = subprocess.run(["umount", "-i", "-f" if force else "-l", path],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise UserError(res.stderr.strip().splitlines()[-1] if res.stderr.strip()
                        else f"cannot unmount {mountpoint}")


# -------------------------------------------------------------------------------- mkfs

def build_mkfs_parser() -> argparse.ArgumentParser:
    p = _HelperParser(prog="mkfs.atomicfs", usage_code=1, formatter_class=_formatter(),
                      description="Format a block device or image file with an empty "
                      "atomicfs (what `mkfs -t atomicfs` runs; the same as `atomicfs mkfs`). "
                      "The size is --size, not a trailing block count.",
                      epilog=SIZE_HELP)
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    add_mkfs_arguments(p)
    p.add_argument("-V", dest="verbose", action="store_true",
                   help="accepted, as mkfs(8) may pass it (the result is always printed)")
    return p


def mkfs_main(argv: Sequence[str] | None = None) -> int:
    _setup_logging()
    args = build_mkfs_parser().parse_args(argv)
    try:
        return cmd_mkfs(args)
    except UserError as exc:
        print(f"mkfs.atomicfs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -------------------------------------------------------------------------------- fsck

def build_fsck_parser() -> argparse.ArgumentParser:
    p = _HelperParser(
        prog="fsck.atomicfs", usage_code=FSCK_USAGE, formatter_class=_formatter(),
        description="Check an atomicfs at rest, with fsck(8)'s flags and exit codes (what "
        "`fsck -t atomicfs` and boot-time `fsck -A` run for fstab entries with a pass "
        "number). `atomicfs fsck` keeps its own codes: 0 clean, 1 damage, 2 not an "
        "atomicfs.",
        epilog=help_table("exit status (bits, as fsck(8) adds them)",
                          exit_code_rows(FSCK8_EXIT_CODES)))
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    p.add_argument("target", help="block device or image file holding an atomicfs")
    p.add_argument("-n", dest="no", action="store_true",
                   help="open read-only, answer no: report damage, change nothing")
    p.add_argument("-y", dest="yes", action="store_true",
                   help="answer yes: repair what can be repaired")
    p.add_argument("-p", dest="preen", action="store_true",
                   help="preen: repair what is safe without questions, quiet when clean")
    p.add_argument("-a", dest="auto", action="store_true", help="the same as -p")
    p.add_argument("-f", dest="force", action="store_true",
                   help="check even if clean (accepted: every run is a full check)")
    p.add_argument("-v", dest="verbose", action="store_true",
                   help="print notes as well as damage")
    p.add_argument("-V", dest="verbose", action="store_true", help="the same as -v")
    p.add_argument("-C", dest="progress_fd", nargs="?", metavar="FD",
                   help="progress to file descriptor FD (accepted, no progress is shown)")
    p.add_argument("-r", dest="report", action="store_true",
                   help="accepted (the summary line is always printed unless -p/-a)")
    return p


RepairFn = Callable[[str], "FsckReport"]


def repair_function() -> RepairFn | None:
    """The one place that decides how -y, -p and -a repair: `atomicfs fsck --repair`'s
    function, atomicfs.fsck.repair(target) -> FsckReport of what is left, once it exists;
    None (damage is left uncorrected, exit 4) while it does not."""
    from atomicfs import fsck as fsck_module
    repair = getattr(fsck_module, "repair", None)
    return repair if callable(repair) else None


def _cancel(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def fsck_main(argv: Sequence[str] | None = None) -> int:
    """fsck.atomicfs [-n|-y|-p|-a] [-f] [-v] TARGET, with fsck(8)'s exit codes."""
    _setup_logging()
    args = build_fsck_parser().parse_args(argv)
    fix = args.yes or args.preen or args.auto
    if args.no and fix:
        print("fsck.atomicfs: -n cannot be combined with -y, -p or -a", file=sys.stderr)
        return FSCK_USAGE
    previous = signal.signal(signal.SIGTERM, _cancel)
    try:
        return _fsck(args.target, fix, quiet=args.preen or args.auto, verbose=args.verbose)
    except KeyboardInterrupt:
        print(f"fsck.atomicfs: {args.target}: cancelled", file=sys.stderr)
        return FSCK_CANCELLED
    finally:
        signal.signal(signal.SIGTERM, previous)  # called in-process too (tests)


def _fsck(target: str, fix: bool, quiet: bool, verbose: bool) -> int:
    from atomicfs.fsck import fsck
    try:
        rep = fsck(target)
    except (NotAtomicfs, UserError) as exc:
        print(f"fsck.atomicfs: {exc}", file=sys.stderr)
        return FSCK_OPERATIONAL
    if verbose:
        for note in rep.notes:
            print(f"note: {note}")
    if rep.clean:
        print(f"{target}: clean, {rep.inodes} inodes, {rep.used_blocks}/{rep.total_blocks} "
              "blocks")
        return FSCK_OK
    for problem in rep.problems:
        print(f"damage: {problem}")
    repair = repair_function() if fix else None
    if repair is None:
        why = "no changes made (-n)" if not fix else "repair is not available"
        print(f"{target}: {len(rep.problems)} problems left uncorrected; {why}",
              file=sys.stderr)
        return FSCK_UNCORRECTED
    try:
        after = repair(target)
    except (NotAtomicfs, UserError) as exc:
        print(f"fsck.atomicfs: {exc}", file=sys.stderr)
        return FSCK_OPERATIONAL
    if after.clean:
        if not quiet:
            print(f"{target}: {len(rep.problems)} problems corrected")
        return FSCK_CORRECTED
    for problem in after.problems:
        print(f"left: {problem}")
    return FSCK_UNCORRECTED
