"""Which setuid/setgid bits the daemon clears when the kernel flags a request for it
(FUSE_HANDLE_KILLPRIV_V2), as the kernel's setattr_should_drop_suidgid would."""
from __future__ import annotations

import os
import stat

from atomicfs.fs import privs_to_clear
from atomicfs.fuseconn import Caller
from atomicfs.metadata import Inode

NOBODY = Caller(uid=65534, gid=65534, pid=0)  # pid 0: no /proc entry, no extra groups


def _file(mode: int, gid: int = 0) -> Inode:
    node = Inode(5, stat.S_IFREG | mode)
    node.gid = gid
    return node


def test_setuid_always_goes() -> None:
    assert privs_to_clear(_file(0o4755), NOBODY) == stat.S_ISUID
    assert privs_to_clear(_file(0o4755), Caller(0, 0, 0)) == stat.S_ISUID


def test_setgid_goes_when_group_executable() -> None:
    assert privs_to_clear(_file(0o6775), NOBODY) == stat.S_ISUID | stat.S_ISGID
    assert privs_to_clear(_file(0o2775, gid=65534), NOBODY) == stat.S_ISGID


def test_setgid_without_group_execute_stays_for_the_group_only() -> None:
    assert privs_to_clear(_file(0o2764, gid=65534), NOBODY) == 0  # the caller's group
    assert privs_to_clear(_file(0o2764, gid=100), NOBODY) == stat.S_ISGID
    assert privs_to_clear(_file(0o2764, gid=100), Caller(0, 0, 0)) == 0  # root: capable


def test_plain_files_lose_nothing() -> None:
    assert privs_to_clear(_file(0o777), NOBODY) == 0


def test_supplementary_groups_come_from_proc() -> None:
    me = Caller(uid=12345, gid=12345, pid=os.getpid())
    for gid in os.getgroups():
        if gid != 12345:
            assert me.in_group(gid)
    assert not me.in_group(54321) or 54321 in os.getgroups()
    assert not Caller(uid=1, gid=1, pid=2**22 + 7).in_group(100)  # no such process
