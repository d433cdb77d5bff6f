"""`make install` and the standard entry points, driven the way administrators drive them:
real mount(8) with `-t fuse.atomicfs` and private fstab files (`mount -a -T`), umount(8),
`mkfs -t atomicfs`, `fsck -t atomicfs` and `fsck -A`, man pages and bash completion.

The package is installed once into a temporary PREFIX; the mount helpers must be in /sbin
(mount(8) looks nowhere else), so the module puts them there and takes them away again,
restoring any that were there before, even when a test fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from atomicfs.options import OPTION_DOCS
from tests.conftest import _SESSION_DIRS, make_image, mounted_at, need
from tests.mount.test_badinput import rewrite_snapshot, sparse_file, with_nlink

ROOT = Path(__file__).resolve().parents[2]
SBIN = "/sbin"
MOUNT_LINKS = ["mount.atomicfs", "mount.fuse.atomicfs", "umount.atomicfs",
               "umount.fuse.atomicfs"]
MiB = 1 << 20


class Installed:
    def __init__(self, prefix: Path) -> None:
        self.prefix = prefix
        self.env = dict(os.environ, PATH=f"{prefix}/sbin:{prefix}/bin:/usr/sbin:/usr/bin:"
                        "/sbin:/bin")
        self.env.pop("VIRTUAL_ENV", None)

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env,
                              timeout=timeout, cwd="/")

    def make(self, target: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), target,
                               f"PREFIX={self.prefix}", f"SBINDIR={SBIN}"],
                              capture_output=True, text=True, timeout=900)


def _umount_all(paths: list[str]) -> None:
    for path in paths:
        if mounted_at(path) is not None:
            subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)


@pytest.fixture(scope="module")
def installed(mount_env: None, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Installed]:
    need(shutil.which("make"), "make")
    saved = {name: os.readlink(f"{SBIN}/{name}") for name in MOUNT_LINKS
             if os.path.islink(f"{SBIN}/{name}")}
    inst = Installed(tmp_path_factory.mktemp("prefix"))
    try:
        res = inst.make("install")
        assert res.returncode == 0, res.stdout + res.stderr
        yield inst
    finally:
        inst.make("uninstall")
        for name in MOUNT_LINKS:
            if name in saved:
                if os.path.lexists(f"{SBIN}/{name}"):
                    os.unlink(f"{SBIN}/{name}")
                os.symlink(saved[name], f"{SBIN}/{name}")


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Path]:
    """A directory for images and mountpoints; whatever is mounted under it at the end is
    detached."""
    mps: list[str] = []
    for name in ("mnt", "mnt2"):
        (tmp_path / name).mkdir()
        mps.append(str(tmp_path / name))
        _SESSION_DIRS.append(mps[-1])
    try:
        yield tmp_path
    finally:
        _umount_all(mps)
        for mp in mps:
            _SESSION_DIRS.remove(mp)


def one_line(res: subprocess.CompletedProcess[str]) -> str:
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr + res.stdout
    assert len(err.splitlines()) == 1, err
    return err


def test_installed_commands(installed: Installed) -> None:
    p = installed.prefix
    for path in [p / "bin/atomicfs", p / "sbin/mkfs.atomicfs", p / "sbin/fsck.atomicfs",
                 p / "sbin/fsck.fuse.atomicfs"] + [Path(SBIN, n) for n in MOUNT_LINKS]:
        assert os.access(path, os.X_OK), path
        assert os.path.realpath(path).startswith(str(p / "lib/atomicfs/bin/")), path
    res = installed.run("atomicfs", "--version")
    assert res.returncode == 0 and res.stdout.startswith("atomicfs "), res.stderr
    # self-contained: the commands run with the interpreter of the environment under PREFIX
    with open(p / "lib/atomicfs/bin/atomicfs") as f:
        assert f.readline().startswith(f"#!{p}/lib/atomicfs/bin/python")


def test_install_is_idempotent(installed: Installed) -> None:
    res = installed.make("install")
    assert res.returncode == 0, res.stdout + res.stderr
    assert installed.run("atomicfs", "--version").returncode == 0


def test_man_pages_list_every_option(installed: Installed) -> None:
    need(shutil.which("man"), "man (package man-db)")
    pages = {}
    for name in ("atomicfs", "mount.atomicfs", "umount.atomicfs", "mkfs.atomicfs",
                 "fsck.atomicfs"):
        path = installed.prefix / f"share/man/man8/{name}.8"
        res = installed.run("man", "-P", "cat", "-l", str(path))
        assert res.returncode == 0, res.stderr
        pages[name] = " ".join(res.stdout.replace("\u2010\n", "").split())
    for page in ("atomicfs", "mount.atomicfs"):
        for doc in OPTION_DOCS:
            assert doc.name.split(",")[0] in pages[page], (page, doc.name)
        assert "fuse.atomicfs" in pages[page]
    for code in ("16", "32"):
        assert f"{code} " in pages["fsck.atomicfs"]
    for option in ("--atomic-unit", "--block-size", "--force"):
        assert option in pages["mkfs.atomicfs"] and option in pages["atomicfs"]


def test_bash_completion(installed: Installed) -> None:
    script = installed.prefix / "share/bash-completion/completions/atomicfs"

    def complete(*words: str) -> set[str]:
        line = " ".join(words)
        cmd = (f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
               f"COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; _shtab_atomicfs; "
               "printf '%s\\n' \"${COMPREPLY[@]}\"")
        res = installed.run("bash", "-c", cmd)
        assert res.returncode == 0, res.stderr
        return set(res.stdout.split())

    assert {"mkfs", "mount", "umount", "fsck", "stat", "crashtest"} <= complete("atomicfs",
                                                                               "''")
    assert {"--atomic-unit", "--block-size", "--force", "--size"} <= complete(
        "atomicfs", "mkfs", "--")


def test_mkfs_t_mount_t_umount_fsck_t(installed: Installed, place: Path) -> None:
    img, mnt = str(place / "a.img"), str(place / "mnt")
    sparse_file(place / "a.img", 256 * MiB)
    res = installed.run("mkfs", "-t", "atomicfs", "--atomic-unit", "16k", img)
    assert res.returncode == 0, res.stderr
    res = installed.run("mkfs", "-t", "atomicfs", img)  # refuses to overwrite
    assert res.returncode == 1 and "--force" in one_line(res)
    res = installed.run("mount", "-t", "fuse.atomicfs", "-o",
                        "noatime,nosuid,nodev,cache_size=64M", img, mnt)
    assert res.returncode == 0, res.stderr
    assert mounted_at(mnt) == "fuse.atomicfs"
    options = installed.run("findmnt", "-n", "-o", "OPTIONS", mnt).stdout
    assert {"nosuid", "nodev", "noatime"} <= set(options.strip().split(","))
    with open(f"{mnt}/f", "wb") as f:
        f.write(os.urandom(64 << 10))
    assert os.getxattr(f"{mnt}/f", "user.atomicfs.atomic_unit") == b"16384"
    stat = json.loads(os.getxattr(mnt, "user.atomicfs.stat"))
    pid = stat["pid"]
    # the installed daemon found libatomicfs-fuseconn.so next to its command
    assert stat["fuse_conn"] == {"wrapped": True, "auto_inval_data": False,
                                 "handle_killpriv_v2": True}
    res = installed.run("umount", mnt)
    assert res.returncode == 0, res.stderr
    # umount.fuse.atomicfs waited for the write-back: the daemon is gone, the image is at
    # rest and checks clean
    assert mounted_at(mnt) is None
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split(") ", 1)[1][0] == "Z"
    res = installed.run("fsck", "-t", "atomicfs", img)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "clean" in res.stdout


def test_mount_failures_exit_32(installed: Installed, place: Path) -> None:
    img, mnt = make_image(place / "a.img", "64M"), str(place / "mnt")
    for opts, words in [("bogus", "unknown mount option 'bogus'"),
                        ("cache_size=1k", "cache_size"), ("atomic_unit=16KB", "atomic unit")]:
        res = installed.run("mount", "-t", "fuse.atomicfs", "-o", opts, img, mnt)
        assert res.returncode == 32, res.stderr
        assert words in res.stderr and "Traceback" not in res.stderr
        assert mounted_at(mnt) is None
    res = installed.run("mount", "-t", "fuse.atomicfs", str(place / "missing.img"), mnt)
    assert res.returncode == 32 and "no such file" in res.stderr


def test_fstab_lines(installed: Installed, place: Path) -> None:
    a, b = make_image(place / "a.img", "64M"), make_image(place / "b.img", "64M")
    mnt, mnt2 = str(place / "mnt"), str(place / "mnt2")
    fstab = place / "fstab"
    fstab.write_text(
        f"# a private fstab\n"
        f"{a} {mnt} fuse.atomicfs defaults,rw,nofail,_netdev,x-systemd.automount,"
        f"x-systemd.device-timeout=10s,comment=db,relatime,atomic_unit=8k 0 2\n"
        f"{b} {mnt2} fuse.atomicfs noauto,user,nodiratime 0 0\n")
    res = installed.run("mount", "-a", "-T", str(fstab))
    assert res.returncode == 0, res.stderr
    assert mounted_at(mnt) == "fuse.atomicfs"
    assert mounted_at(mnt2) is None  # noauto
    with open(f"{mnt}/f", "wb") as f:
        f.write(b"x" * 8192)
    assert os.getxattr(f"{mnt}/f", "user.atomicfs.atomic_unit") == b"8192"
    res = installed.run("mount", "-T", str(fstab), mnt2)
    assert res.returncode == 0, res.stderr
    # `user` implies noexec,nosuid,nodev, which mount(8) passes and the kernel applies
    assert "noexec" in installed.run("findmnt", "-n", "-o", "OPTIONS", mnt2).stdout
    for path in (mnt, mnt2):
        res = installed.run("umount", path)
        assert res.returncode == 0, res.stderr
    # the pass number: fsck -A checks the entry through fsck.fuse.atomicfs (fsck(8) takes
    # an image file for a missing device, so that line has no nofail)
    fstab.write_text(f"{a} {mnt} fuse.atomicfs defaults,atomic_unit=8k 0 2\n")
    env = dict(installed.env, FSTAB_FILE=str(fstab))
    res = subprocess.run(["fsck", "-A"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{a}: clean" in res.stdout


def test_mount_fuse3_runs_the_atomicfs_command(installed: Installed, place: Path) -> None:
    """mount.fuse3 runs `atomicfs SOURCE MOUNTPOINT -o OPTS` for type fuse.atomicfs."""
    img, mnt = make_image(place / "a.img", "64M"), str(place / "mnt")
    res = installed.run("mount.fuse3", img, mnt, "-t", "fuse.atomicfs", "-o",
                        "atomic_unit=16k,rw")
    assert res.returncode == 0, res.stderr
    assert mounted_at(mnt) == "fuse.atomicfs"
    assert installed.run("umount", mnt).returncode == 0


def _damaged(installed: Installed, place: Path, name: str = "d.img") -> str:
    """An image whose file has a wrong link count (fsck finds one problem)."""
    img = make_image(place / name, "64M")
    m = str(place / "mnt")
    assert installed.run("mount", "-t", "fuse.atomicfs", img, m).returncode == 0
    with open(f"{m}/f", "wb") as f:
        f.write(b"data")
    ino = os.stat(f"{m}/f").st_ino
    assert installed.run("umount", m).returncode == 0
    rewrite_snapshot(img, with_nlink(ino, 3))
    return img


def test_fsck_exit_codes(installed: Installed, place: Path) -> None:
    damaged = img = _damaged(installed, place)
    for flags in (["-n"], []):  # reported, left uncorrected
        res = installed.run("fsck", "-t", "atomicfs", *flags, img)
        assert res.returncode == 4, (flags, res.stdout, res.stderr)
        assert "link count 3" in res.stdout
    for flags in (["-y"], ["-p"], ["-a"]):  # corrected by atomicfs fsck --repair
        img = _damaged(installed, place, f"d{flags[0]}.img")
        res = installed.run("fsck", "-t", "atomicfs", *flags, img)
        assert res.returncode == 1, (flags, res.stdout, res.stderr)
        res = installed.run("fsck", "-t", "atomicfs", "-n", img)
        assert res.returncode == 0, (flags, res.stdout, res.stderr)
    garbage = sparse_file(place / "g.img", 64 * MiB, os.urandom(MiB))
    res = installed.run("fsck", "-t", "atomicfs", garbage)
    assert res.returncode == 8, res.stdout + res.stderr
    res = installed.run("fsck.atomicfs", "-n", "-y", garbage)
    assert res.returncode == 16
    res = installed.run("fsck.atomicfs", "--no-such-flag", garbage)
    assert res.returncode == 16 and "Traceback" not in res.stderr
    # a mounted filesystem is not checked (its newest state is in the daemon): exit 8
    mounted, mnt = make_image(place / "m.img", "64M"), str(place / "mnt")
    assert installed.run("mount", "-t", "fuse.atomicfs", mounted, mnt).returncode == 0
    res = installed.run("fsck", "-t", "atomicfs", mounted)
    assert res.returncode == 8 and "mounted" in res.stderr, res.stderr
    assert installed.run("umount", mnt).returncode == 0
    # `atomicfs fsck` keeps its own codes
    assert installed.run("atomicfs", "fsck", damaged).returncode == 1
    assert installed.run("atomicfs", "fsck", garbage).returncode == 2


def test_uninstall_removes_everything(installed: Installed) -> None:
    res = installed.make("uninstall")
    assert res.returncode == 0, res.stderr
    left = [str(p) for p in installed.prefix.rglob("*") if not p.is_dir()]
    assert not left, left
    for name in MOUNT_LINKS:
        assert not os.path.lexists(f"{SBIN}/{name}"), name
