"""The `atomicfs` command: one function per subcommand."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import NoReturn, Sequence

from atomicfs import __version__
from atomicfs.errors import UserError
from atomicfs.sizes import format_size, parse_size

log = logging.getLogger(__name__)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"invalid seconds {text!r} (more than 0, less "
                                         "than a day)")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like argparse but shorter
        self.exit(2, f"atomicfs: {message} (see atomicfs {self.prog.split()[-1]} --help)\n"
                  if " " in self.prog else f"atomicfs: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="atomicfs", description="FUSE filesystem with buffered atomic writes "
                "and write-through writes")
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("mkfs", help="format a block device or image file")
    s.add_argument("target")
    s.add_argument("--size", type=_size, help="create (or resize) an image file of SIZE")
    s.add_argument("--atomic-unit", type=_size, default=0,
                   help="atomic unit of the root directory (inherited by new files)")
    s.add_argument("--block-size", type=_size, default=4096)
    s.add_argument("--force", action="store_true", help="overwrite an existing filesystem")
    s.set_defaults(func=cmd_mkfs)

    s = sub.add_parser("mount", help="mount a filesystem")
    s.add_argument("target")
    s.add_argument("mountpoint")
    s.add_argument("-o", dest="options", action="append", default=[],
                   metavar="OPT[,OPT...]")
    s.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached (log to stderr)")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="write back, unmount and wait for the daemon")
    s.add_argument("mountpoint")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("fsck", help="check (read-only), or repair with --repair")
    s.add_argument("target")
    s.add_argument("--repair", action="store_true",
                   help="fix what can be fixed and report each fix; exit 0 if the "
                   "filesystem is clean afterwards")
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("stat", help="atomic and write-through state of a file or mount")
    s.add_argument("path", help="a file, or the mountpoint for the cache and counters")
    form = s.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON (with --watch: one a line)")
    form.add_argument("--prometheus", action="store_true",
                      help="the mount's metrics in the Prometheus text format "
                      "(node_exporter's textfile collector)")
    s.add_argument("--watch", type=_seconds, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C, with counter rates")
    s.set_defaults(func=cmd_stat)

    s = sub.add_parser("crashtest", help="crash-consistency explorer")
    s.add_argument("--workload", default="units",
                   help="units, writethrough, namespace, mixed, a comma list, or all")
    s.add_argument("--states", type=int, default=200,
                   help="power-loss states to check (from recorded runs)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--tear", type=_size, default=512,
                   help="granularity of torn writes (a multiple of 512)")
    s.add_argument("--kills", type=int, default=0,
                   help="runs to end with SIGKILL of the daemon, then recover and check")
    s.add_argument("--device", default="file",
                   help="file (image file), loop (loop device), xfs (image on XFS: the "
                   "hardware path), a comma list, or all")
    s.add_argument("--control", action="store_true",
                   help="switch atomic protection off: the explorer must see torn units")
    s.add_argument("--workdir", default=None, help="where images and mounts go")
    s.add_argument("--unit", type=_size, default=16 << 10, help="atomic unit (16k)")
    s.add_argument("--per-recording", dest="per_recording", type=int, default=100,
                   help="crash states drawn from each recorded run")
    s.add_argument("--mount-every", dest="mount_every", type=int, default=25,
                   help="check every n-th state through a real mount (the rest in-process)")
    s.add_argument("--scale", type=float, default=1.0,
                   help="multiply the workload's number of operations")
    s.add_argument("--keep", action="store_true", help="keep the working directory")
    s.add_argument("--expect-torn", dest="expect_torn", action="store_true",
                   help="with --control: succeed only if torn units were seen")
    s.set_defaults(func=cmd_crashtest)
    return p


def cmd_mkfs(args: argparse.Namespace) -> int:
    from atomicfs.mkfs import mkfs
    sb = mkfs(args.target, size=args.size, atomic_unit=args.atomic_unit,
              block_size=args.block_size, force=args.force)
    print(f"atomicfs: formatted {args.target}: {format_size(sb.total_blocks * sb.block_size)}"
          f", block size {sb.block_size}, log {format_size(sb.log_bytes)}"
          + (f", atomic unit {sb.atomic_unit}" if sb.atomic_unit else ""))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from atomicfs.daemon import mount
    from atomicfs.options import check_privileges, parse_mount_options
    try:
        opts = parse_mount_options(args.options)
        check_privileges(opts, os.geteuid())
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return mount(args.target, args.mountpoint, opts, args.foreground)


def cmd_umount(args: argparse.Namespace) -> int:
    from atomicfs.daemon import umount
    return umount(args.mountpoint)


def cmd_fsck(args: argparse.Namespace) -> int:
    from atomicfs.fsck import fsck
    rep = fsck(args.target, repair=args.repair)
    for note in rep.notes:
        print(f"note: {note}")
    for fix in rep.fixes:
        print(f"fixed: {fix}")
    for problem in rep.problems:
        print(f"damage: {problem}")
    state = "clean" if rep.clean else f"{len(rep.problems)} problems"
    if rep.fixes:
        state = f"repaired ({len(rep.fixes)} fixes), " + (
            "clean" if rep.clean else f"{len(rep.problems)} problems remain")
    print(f"{args.target}: {state}; {rep.inodes} inodes ({rep.files} files, "
          f"{rep.directories} directories), {rep.used_blocks}/{rep.total_blocks} blocks used")
    return 0 if rep.clean else 1


def cmd_stat(args: argparse.Namespace) -> int:
    from atomicfs.daemon import read_stat
    from atomicfs.statview import prometheus, text_view, watch
    if args.prometheus and args.watch:
        raise UserError("--prometheus prints once (the textfile collector reads a file); "
                        "use it without --watch")
    data = read_stat(args.path)
    if args.prometheus:
        if "cache" not in data:
            raise UserError(f"--prometheus needs the mountpoint; {args.path} is a file")
        print(prometheus(os.path.realpath(args.path), data), end="")
    elif args.watch:
        return watch(args.path, args.watch, read_stat, as_json=args.json)
    elif args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text_view(args.path, data))
    return 0


def cmd_crashtest(args: argparse.Namespace) -> int:
    from atomicfs.crash import run_crashtest
    return run_crashtest(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "mount":
        logging.basicConfig(level=logging.WARNING, format="atomicfs: %(message)s")
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"atomicfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
