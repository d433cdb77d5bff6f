"""`python -m atomicfs.manpages DIR`: the man pages (argparse-manpage) and the bash
completion (shtab) of every atomicfs command, made from the argparse parsers that --help
prints, with the tables of their epilogs (mount options, exit status) as man sections.

Run by `make docs` and `make install`; needs the `docs` extra (not needed at run time).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from atomicfs import __version__
from atomicfs.cli import (FSCK_EXIT_CODES, SIZE_HELP, build_parser, exit_code_rows,
                          mount_option_rows)
from atomicfs import helpers

Rows = Sequence[tuple[str, str]]
SEE_ALSO = ("atomicfs(8), mount.atomicfs(8), umount.atomicfs(8), mkfs.atomicfs(8), "
            "fsck.atomicfs(8), mount(8), fstab(5), fsck(8), mkfs(8), blkid(8)")
FSTAB_EXAMPLE = ("/srv/db.img  /srv/db  fuse.atomicfs  "
                 "defaults,nofail,x-systemd.automount,atomic_unit=16k  0  2")


def _escape(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def roff_table(rows: Rows) -> str:
    """A .TP list: the left column in bold, the right as the paragraph."""
    return "\n".join(f".TP\n.B {_escape(left)}\n{_escape(right)}" for left, right in rows)


def _paragraph(text: str) -> str:
    return _escape(" ".join(text.split()))


def _sections(name: str) -> list[tuple[str, str]]:
    size = ("SIZE", _paragraph(SIZE_HELP))
    fstab = ("FSTAB", ".nf\n" + _escape(FSTAB_EXAMPLE) + "\n.fi\n" + _paragraph(
        "Options for mount(8), fstab and systemd (defaults, rw, noauto, nofail, _netdev, "
        "user, x-systemd.*, comment=) are accepted and dropped; the pass number 2 lets "
        "fsck -A check the image at boot through fsck.fuse.atomicfs."))
    see = ("SEE ALSO", _escape(SEE_ALSO))
    mount_opts = ("MOUNT OPTIONS", roff_table(mount_option_rows()))
    if name == "atomicfs":
        return [mount_opts, ("EXIT STATUS OF FSCK", roff_table(exit_code_rows(
            FSCK_EXIT_CODES))), size, fstab, see]
    if name == "mount.atomicfs":
        return [mount_opts, ("EXIT STATUS", roff_table(exit_code_rows(
            helpers.MOUNT_EXIT_CODES))), size, fstab, see]
    if name == "fsck.atomicfs":
        return [("EXIT STATUS", roff_table(exit_code_rows(helpers.FSCK8_EXIT_CODES))), see]
    if name == "mkfs.atomicfs":
        return [size, see]
    return [see]


SUMMARIES = {
    "atomicfs": "FUSE filesystem with buffered atomic writes and write-through writes",
    "mount.atomicfs": "mount an atomicfs (mount -t fuse.atomicfs, fstab)",
    "umount.atomicfs": "write back and unmount an atomicfs (umount)",
    "mkfs.atomicfs": "make an atomicfs (mkfs -t atomicfs)",
    "fsck.atomicfs": "check an atomicfs with fsck(8)'s flags and exit codes",
}

PAGES: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "atomicfs": build_parser,
    "mount.atomicfs": helpers.build_mount_parser,
    "umount.atomicfs": helpers.build_umount_parser,
    "mkfs.atomicfs": helpers.build_mkfs_parser,
    "fsck.atomicfs": helpers.build_fsck_parser,
}


def _without_epilogs(parser: argparse.ArgumentParser) -> None:
    """The epilogs are text tables for --help; the man page has them as sections."""
    parser.epilog = None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _without_epilogs(sub)


def manpage(name: str) -> str:
    from argparse_manpage.manpage import Manpage  # the docs extra
    parser = PAGES[name]()
    _without_epilogs(parser)
    page = Manpage(parser, _data={"project_name": "atomicfs", "version": __version__,
                                  "manual_section": 8, "description": SUMMARIES[name],
                                  "manual_title": "System Administration"})
    for heading, content in _sections(name):
        page.add_section(heading, ">", content)
    return str(page)


def completion() -> str:
    """bash completion of the subcommands and options; paths for the positionals."""
    import shtab  # the docs extra
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                for arg in sub._actions:
                    if not arg.option_strings and arg.dest in ("target", "path"):
                        arg.complete = shtab.FILE  # type: ignore[attr-defined]
                    elif not arg.option_strings and arg.dest == "mountpoint":
                        arg.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    return str(shtab.complete(parser, shell="bash"))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m atomicfs.manpages OUTDIR", file=sys.stderr)
        return 2
    out = args[0]
    os.makedirs(out, exist_ok=True)
    for name in PAGES:
        with open(os.path.join(out, f"{name}.8"), "w") as f:
            f.write(manpage(name))
    with open(os.path.join(out, "atomicfs.bash"), "w") as f:
        f.write(completion())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
