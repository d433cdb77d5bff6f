"""The `atomicfs` command: one function per subcommand."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from typing import NoReturn, Sequence

from atomicfs import __version__
from atomicfs.errors import UserError
from atomicfs.sizes import format_size, parse_size



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


class _Help(argparse.RawDescriptionHelpFormatter):
    """Epilogs are tables made by help_table: keep their layout."""


# Exit codes as `atomicfs fsck` documents them (fsck.atomicfs maps them to fsck(8)'s).
FSCK_EXIT_CODES = ((0, "clean"), (1, "damage found (printed)"),
                   (2, "not an atomicfs, or unreadable"))


def help_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table for an epilog (the man pages render the same rows)."""
    width = min(max((len(a) for a, _ in rows), default=0), 24)
    lines = [f"{title}:"]
    for left, right in rows:
        text = textwrap.wrap(right, 78 - width - 4) or [""]
        if len(left) > width:
            lines += textwrap.wrap(left, 76, initial_indent="  ", subsequent_indent="    ")
        else:
            lines.append(f"  {left:{width}}  {text.pop(0)}")
        lines += [" " * (width + 4) + t for t in text]
    return "\n".join(line.rstrip() for line in lines)


def mount_option_rows() -> list[tuple[str, str]]:
    """The -o options: name[=VALUE] and meaning with default, from options.OPTION_DOCS."""
    from atomicfs.options import OPTION_DOCS
    rows = []
    for d in OPTION_DOCS:
        left = f"{d.name}={d.value}" if d.value else d.name
        right = d.meaning + (f" (default: {d.default})" if d.default else "")
        rows.append((left, right))
    return rows


def exit_code_rows(codes: Sequence[tuple[int, str]]) -> list[tuple[str, str]]:
    return [(str(code), meaning) for code, meaning in codes]


def add_mkfs_arguments(s: argparse.ArgumentParser) -> None:
    """The options of `atomicfs mkfs`, shared with mkfs.atomicfs."""
    s.add_argument("target", help="block device or image file to format (an image file is "
                   "created when it does not exist and --size is given)")
    s.add_argument("--size", type=_size, metavar="SIZE",
                   help="create an image file of SIZE, or grow/shrink an existing one to "
                   "SIZE (shrinking needs --force); default: the whole target")
    s.add_argument("--atomic-unit", type=_size, default=0, metavar="SIZE",
                   help="atomic unit of the root directory, inherited by new files and "
                   "directories: a power of two from the block size to 1M, 0 for none "
                   "(default: 0)")
    s.add_argument("--block-size", type=_size, default=4096, metavar="SIZE",
                   help="filesystem block size, a power of two from 4096 (default: 4096)")
    s.add_argument("--force", "-f", action="store_true",
                   help="overwrite an existing atomicfs or any other filesystem, partition "
                   "table or volume signature that blkid finds (default: refuse)")


def add_mount_arguments(s: argparse.ArgumentParser) -> None:
    """Source, mountpoint and -o, shared by `atomicfs mount` and mount.atomicfs."""
    s.add_argument("target", help="block device or image file holding an atomicfs")
    s.add_argument("mountpoint", help="existing directory to mount on")
    s.add_argument("-o", dest="options", action="append", default=[],
                   metavar="OPT[,OPT...]",
                   help="mount options, comma-separated, repeatable (listed below)")


SIZE_HELP = textwrap.fill(
    "SIZE is a number of bytes with an optional suffix, as coreutils reads it: K, M, G, T, "
    "P, E (also k, m, g, ...) and KiB, MiB, ... are powers of 1024; KB, MB, GB, ... powers "
    "of 1000 (4096, 16k, 1M, 20GiB = 20G, 20GB).", 78)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="atomicfs", description="FUSE filesystem with buffered atomic writes "
                "and write-through writes", epilog=SIZE_HELP)
    p.add_argument("--version", action="version", version=f"atomicfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="COMMAND")

    s = sub.add_parser("mkfs", help="format a block device or image file",
                       description="Format a block device or image file with an empty "
                       "atomicfs.", epilog=SIZE_HELP)
    add_mkfs_arguments(s)
    s.set_defaults(func=cmd_mkfs)

    s = sub.add_parser("mount", help="mount a filesystem", formatter_class=_Help,
                       description="Mount an atomicfs; returns once the mount is live and "
                       "serving (the daemon goes on in the background).",
                       epilog=help_table("mount options (-o)", mount_option_rows())
                       + "\n\n" + SIZE_HELP)
    add_mount_arguments(s)
    s.add_argument("--foreground", "-f", action="store_true",
                   help="stay attached, log to stderr, return when unmounted "
                   "(default: detach once mounted, log to the runtime directory)")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="write back, unmount and wait for the daemon",
                       description="Write back everything, unmount and wait for the daemon "
                       "to exit; exit 1 if anything could not be written.")
    s.add_argument("mountpoint", help="where the atomicfs is mounted")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("fsck", help="check (read-only), or repair with --repair",
                       formatter_class=_Help,
                       description="Check a filesystem at rest (not mounted) without "
                       "writing to it; with --repair, fix what can be fixed.",
                       epilog=help_table("exit status", exit_code_rows(FSCK_EXIT_CODES)))
    s.add_argument("target", help="block device or image file holding an atomicfs")
    s.add_argument("--repair", action="store_true",
                   help="fix what can be fixed and report each fix (`fixed:` lines); exit 0 "
                   "if the filesystem is clean afterwards (default: change nothing)")
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("stat", help="atomic and write-through state of a file or mount",
                       description="A file: its atomic and write-through settings and folio "
                       "states. The mountpoint: cache, device, counters and the oldest "
                       "request in flight.")
    s.add_argument("path", help="a file on an atomicfs mount, or the mountpoint")
    form = s.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true",
                      help="print JSON instead of text, one object a line with --watch "
                      "(default: text)")
    form.add_argument("--prometheus", action="store_true",
                      help="the mount's metrics in the Prometheus text format "
                      "(node_exporter's textfile collector)")
    s.add_argument("--watch", type=_seconds, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C, with counter rates "
                   "(default: print once)")
    s.set_defaults(func=cmd_stat)

    s = sub.add_parser("run", help="start a program with RWF_ATOMIC, RWF_WRITETHROUGH and "
                       "statx atomic limits on atomicfs files (the preload library)",
                       usage="atomicfs run -- CMD [ARGS...]")
    s.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("crashtest", help="crash-consistency explorer",
                       description="Record workloads, replay power-loss states and daemon "
                       "kills, and count torn units and lost durable writes; exit 1 if any "
                       "check failed.")
    s.add_argument("--workload", default="units",
                   help="units, writethrough, namespace, mixed, logfill, rwf, a comma list, or "
                   "all (default: units)")
    s.add_argument("--states", type=int, default=200,
                   help="power-loss states to check, from recorded runs (default: 200)")
    s.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    s.add_argument("--tear", type=_size, default=512, metavar="SIZE",
                   help="granularity of torn writes, a multiple of 512 (default: 512)")
    s.add_argument("--kills", type=int, default=0,
                   help="runs to end with SIGKILL of the daemon, then recover and check "
                   "(default: 0)")
    s.add_argument("--device", default="file",
                   help="file (image file), loop (loop device), xfs (image on XFS: the "
                   "hardware path), a comma list, or all (default: file)")
    s.add_argument("--control", action="store_true",
                   help="switch atomic protection off: the explorer must see torn units "
                   "(default: protection on)")
    s.add_argument("--workdir", default=None,
                   help="where images and mounts go (default: a new directory under /tmp)")
    s.add_argument("--unit", type=_size, default=16 << 10, metavar="SIZE",
                   help="atomic unit (default: 16K)")
    s.add_argument("--per-recording", dest="per_recording", type=int, default=100,
                   help="crash states drawn from each recorded run (default: 100)")
    s.add_argument("--mount-every", dest="mount_every", type=int, default=25,
                   help="check every n-th state through a real mount, the rest "
                   "in-process (default: 25)")
    s.add_argument("--scale", type=float, default=1.0,
                   help="multiply the workload's number of operations (default: 1.0)")
    s.add_argument("--keep", action="store_true",
                   help="keep the working directory (default: remove it)")
    s.add_argument("--expect-torn", dest="expect_torn", action="store_true",
                   help="with --control: succeed only if torn units were seen")
    s.set_defaults(func=cmd_crashtest)
    return p


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def cmd_mkfs(args: argparse.Namespace) -> int:
    from atomicfs.mkfs import mkfs
    sb = mkfs(args.target, size=args.size, atomic_unit=args.atomic_unit,
              block_size=args.block_size, force=args.force)
    print(f"atomicfs: formatted {args.target}: {format_size(sb.total_blocks * sb.block_size)}"
          f", block size {sb.block_size}, log {format_size(sb.log_bytes)}"
          + (f", atomic unit {sb.atomic_unit}" if sb.atomic_unit else ""))
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from atomicfs import fuseconn
    fuseconn.load()  # before the daemon loads pyfuse3
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


def cmd_run(args: argparse.Namespace) -> int:
    from atomicfs.run import run
    run(args.cmd)


def cmd_crashtest(args: argparse.Namespace) -> int:
    from atomicfs.crashtest.explorer import run_crashtest
    from atomicfs.crashtest.workloads import WORKLOADS
    from atomicfs.crashtest.workloads.rwf import preload_active
    names = WORKLOADS if args.workload == "all" else args.workload.split(",")
    if "rwf" in names and not preload_active():
        # the rwf workload's RWF_ATOMIC writes go through the preload library: start again
        # under it (the daemons it mounts inherit it, and pass everything through)
        from atomicfs.run import preload_env
        os.execve(sys.executable, [sys.executable, "-m", "atomicfs", *args.argv],
                  preload_env())
    return run_crashtest(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if len(argv) >= 2 and not argv[0].startswith("-") and os.path.exists(argv[0]) and \
            argv[0] not in _subcommands(parser):
        # mount.fuse3's form, `atomicfs SOURCE MOUNTPOINT -o OPTS` (-t fuse.atomicfs
        # without mount.fuse.atomicfs installed): the mount helper's rules apply
        from atomicfs.helpers import mount_main
        return mount_main(argv, prog="atomicfs")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
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
