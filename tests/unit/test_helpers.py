"""The command line as administrators meet it: mount options as mount(8) passes them, the
help that lists every option with its default, and the helpers' argument forms."""
from __future__ import annotations

import argparse

import pytest

from atomicfs import cli, helpers
from atomicfs.options import (ATIME, DIRATIME, FLAGS, IGNORED, KERNEL_FLAGS, LAZYTIME,
                              OPTION_DOCS, STRICTATIME, VALUED, parse_mount_options)


def test_what_mount8_and_systemd_pass_is_dropped() -> None:
    # the option string mount(8) gave a helper for an fstab line with these options
    o = parse_mount_options(["rw,noatime,noexec,nosuid,nodev,atomic_unit=16k,nofail,"
                             "_netdev,user,defaults,noauto,auto,async,users,owner,group,"
                             "x-systemd.automount,x-systemd.device-timeout=5s,comment=x"])
    assert o.atomic_unit == 16384
    assert o.atime == "noatime"
    assert sorted(o.kernel_flags) == ["nodev", "noexec", "nosuid"]


@pytest.mark.parametrize("option,atime,nodiratime", [
    ("relatime", "relatime", False), ("atime", "relatime", False),
    ("noatime", "noatime", False), ("nodiratime", "relatime", True),
    ("noatime,nodiratime", "noatime", True), ("lazytime", "relatime", False),
])
def test_atime_options_are_honoured(option: str, atime: str, nodiratime: bool) -> None:
    o = parse_mount_options([option])
    assert (o.atime, o.nodiratime) == (atime, nodiratime)


@pytest.mark.parametrize("option,words", [
    ("nolazytime", "not supported"), ("noatime=1", "takes no value"),
    ("strictatime", "not supported"), ("norelatime", "not supported"),
    ("sync", "unknown mount option"), ("loop", "unknown mount option"),
])
def test_options_that_would_be_ignored_are_refused(option: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_mount_options([option])


def _documented() -> set[str]:
    names = set()
    for d in OPTION_DOCS:
        names.update(n.strip().rstrip("*").rstrip("=") for n in d.name.split(","))
    return names


def test_every_mount_option_is_documented_with_a_default() -> None:
    known = FLAGS | VALUED | IGNORED | KERNEL_FLAGS | set(ATIME) | set(DIRATIME) | LAZYTIME | \
        STRICTATIME
    documented = _documented()
    # each accepted option is in the table, or named in the text of an alias's entry
    text = " ".join(f"{d.name} {d.meaning}" for d in OPTION_DOCS)
    missing = [n for n in known if n not in documented and n not in text]
    assert not missing, missing
    for d in OPTION_DOCS:
        assert d.meaning
        assert d.default or "dropped" in d.meaning or "refused" in d.meaning, d.name
    helptext = cli.build_parser()._subparsers._group_actions[0].choices[  # type: ignore
        "mount"].format_help()
    for d in OPTION_DOCS:
        assert d.name.split(",")[0] in helptext


def _parsers() -> list[argparse.ArgumentParser]:
    out = [cli.build_parser(), helpers.build_mount_parser(), helpers.build_umount_parser(),
           helpers.build_mkfs_parser(), helpers.build_fsck_parser()]
    for action in out[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += list(action.choices.values())
    return out


def test_every_argument_has_help_and_valued_options_a_default() -> None:
    for parser in _parsers():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            where = f"{parser.prog} {action.dest}"
            assert action.help, where
            # an option that takes a value and has a default says what it is
            takes_value = action.option_strings and action.nargs != 0
            if takes_value and action.default not in (None, []):
                assert "default" in action.help, where


def test_fsck_help_gives_exit_codes() -> None:
    text = helpers.build_fsck_parser().format_help()
    for code, _ in helpers.FSCK8_EXIT_CODES:
        assert f"\n  {code:<2}" in text, code
    sub = cli.build_parser()._subparsers._group_actions[0].choices["fsck"]  # type: ignore
    assert "exit status" in sub.format_help()


def test_fsck_usage_errors_exit_16(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        helpers.fsck_main(["--bogus", "x"])
    assert exc.value.code == helpers.FSCK_USAGE
    assert helpers.fsck_main(["-n", "-y", "x"]) == helpers.FSCK_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_fsck_of_nothing_is_an_operational_error(tmp_path: object,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert helpers.fsck_main([f"{tmp_path}/missing.img"]) == helpers.FSCK_OPERATIONAL
    assert "Traceback" not in capsys.readouterr().err


def test_repair_is_decided_in_one_place() -> None:
    # until `atomicfs fsck --repair` lands, -y/-p/-a cannot repair (exit 4 on damage)
    from atomicfs import fsck
    assert (helpers.repair_function() is None) == (not hasattr(fsck, "repair"))


def test_mount_helper_usage_and_failures(tmp_path: object,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        helpers.mount_main(["only-one-argument"])
    assert exc.value.code == helpers.MOUNT_USAGE
    img = f"{tmp_path}/missing.img"
    assert helpers.mount_main([img, str(tmp_path), "-o", "bogus"]) == helpers.MOUNT_FAILURE
    assert helpers.mount_main([img, str(tmp_path), "-f", "-o", "atomic_unit=16k,nofail"]) == 0
    assert helpers.mount_main([img, str(tmp_path), "-f", "-s", "-o", "bogus,rw"]) == 0
    assert helpers.mount_main([img, str(tmp_path), "-N", "1"]) == helpers.MOUNT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unknown mount option 'bogus'" in err
