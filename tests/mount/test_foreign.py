"""mkfs refuses to format over what libblkid recognises (filesystems, RAID and volume
members, partition tables), names it in one line and changes nothing; with --force it
formats and leaves no old signature behind."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import cli, mount_env, need, run  # noqa: F401  (mount_env: fixture)
from tests.mount.posix_helpers import sha256_of
from tests.mount.test_badinput import refused, sparse_file

MiB = 1 << 20


def _image(tmp: Path, name: str) -> str:
    return sparse_file(tmp / f"{name}.img", 64 * MiB)


def _minix(tmp: Path) -> str:
    img = _image(tmp, "minix")
    run("mkfs.minix", img)
    return img


def _bfs(tmp: Path) -> str:
    img = _image(tmp, "bfs")
    run("mkfs.bfs", img)
    return img


def _tree(tmp: Path) -> str:
    src = tmp / "tree"
    src.mkdir(exist_ok=True)
    (src / "file").write_bytes(b"content\n")
    return str(src)


def _grown(img: str) -> str:
    """Image makers that write only their own length: grow to a size mkfs accepts."""
    with open(img, "r+b") as f:
        f.truncate(64 * MiB)
    return img


def _cramfs(tmp: Path) -> str:
    img = str(tmp / "cramfs.img")
    run("mkfs.cramfs", _tree(tmp), img)
    return _grown(img)


def _squashfs(tmp: Path) -> str:
    img = str(tmp / "squashfs.img")
    run("mksquashfs", _tree(tmp), img, "-quiet", "-noappend")
    return _grown(img)


def _iso9660(tmp: Path) -> str:
    img = str(tmp / "iso9660.img")
    run("genisoimage", "-quiet", "-o", img, _tree(tmp))
    return _grown(img)


def _f2fs(tmp: Path) -> str:
    img = _image(tmp, "f2fs")
    run("mkfs.f2fs", "-q", img)
    return img


def _table(tmp: Path, label: str) -> str:
    img = _image(tmp, label)
    subprocess.run(["sfdisk", "-q", img], input=f"label: {label}\n,32M,L\n", text=True,
                   check=True, capture_output=True)
    return img


def _dos(tmp: Path) -> str:
    return _table(tmp, "dos")


def _gpt(tmp: Path) -> str:
    """A GPT keeps a copy of its header at the end of the disk, which mkfs would not
    overwrite: partitioning tools would offer to restore the table from it."""
    return _table(tmp, "gpt")


def _ext4(tmp: Path) -> str:
    img = _image(tmp, "ext4")
    run("mkfs.ext4", "-q", "-F", img)
    return img


MAKERS: dict[str, tuple[str, Callable[[Path], str], str]] = {
    # name: (program, maker, what the refusal names)
    "minix": ("mkfs.minix", _minix, "minix filesystem"),
    "bfs": ("mkfs.bfs", _bfs, "bfs filesystem"),
    "cramfs": ("mkfs.cramfs", _cramfs, "cramfs filesystem"),
    "squashfs": ("mksquashfs", _squashfs, "squashfs filesystem"),
    "iso9660": ("genisoimage", _iso9660, "iso9660 filesystem"),
    "f2fs": ("mkfs.f2fs", _f2fs, "f2fs filesystem"),
    "dos": ("sfdisk", _dos, "dos partition table"),
    "gpt": ("sfdisk", _gpt, "gpt partition table"),
    "ext4": ("mkfs.ext4", _ext4, "ext4 filesystem"),
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_mkfs_refuses_what_blkid_finds(tmp_path: Path, kind: str) -> None:
    program, make, words = MAKERS[kind]
    need(shutil.which(program), f"{program} (make test-deb-deps)")
    img = make(tmp_path)
    before = sha256_of(img)
    refused(cli("mkfs", img, check=False), words, "--force")
    assert sha256_of(img) == before
    cli("mkfs", img, "--force")
    # the old signatures are gone, also copies at the end: blkid and wipefs find nothing,
    # and mkfs now sees our own
    probe = subprocess.run(["blkid", "-p", img], capture_output=True, text=True)
    assert probe.returncode == 2, probe.stdout
    assert run("wipefs", "--no-act", img).stdout == ""
    refused(cli("mkfs", img, check=False), "atomicfs filesystem", "--force")
    assert cli("fsck", img, check=False).returncode == 0
