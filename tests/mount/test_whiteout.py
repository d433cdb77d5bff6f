"""RENAME_WHITEOUT (what overlayfs asks of its upper directory) is durable and consistent:
the whiteout and the renamed file survive an unmount, fsck finds nothing wrong."""
from __future__ import annotations

import os
import stat

from tests.conftest import MountFactory, cli
from tests.mount.posix_helpers import RENAME_WHITEOUT, renameat2


def test_whiteout_survives_remount_and_fsck(image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    with open(m / "a", "wb") as f:
        f.write(b"upper")
    renameat2(m / "a", m / "b", RENAME_WHITEOUT)
    m.umount()
    assert cli("fsck", image, check=False).returncode == 0
    m = mounter(image)
    st = os.lstat(m / "a")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    with open(m / "b", "rb") as f:
        assert f.read() == b"upper"
    os.unlink(m / "a")  # a whiteout is removed like any device node
    assert sorted(os.listdir(m.path)) == ["b"]
