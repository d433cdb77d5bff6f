"""Persistence and recovery on real mounts: unmount and remount keep everything; a daemon
killed with SIGKILL right after fsync returned loses nothing fsync covered; fsck is clean
after each."""
from __future__ import annotations

import os
import socket
import stat

import pytest
from tests.conftest import Mount, MountFactory, cli
from tests.mount.persistence_model import Model, check_tree, populate
from tests.mount.posix_helpers import backing, tree_state

__all__ = ["backing"]  # fixture used below

NS = 1_000_000_000
SPARSE_TAIL = (5 << 30) + 17


def fsck_clean(target: str) -> str:
    res = cli("fsck", target, check=False)
    assert res.returncode == 0, f"fsck exit {res.returncode}: {res.stdout}{res.stderr}"
    assert "damage" not in res.stdout
    return res.stdout


def contents(root: str, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode) and \
                    os.path.relpath(path, root) not in skip:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = f.read()
    return out


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_varied_tree(root: str) -> None:
    """One of each kind of object with unusual attributes."""
    os.makedirs(f"{root}/a/b/c")
    with open(f"{root}/a/data", "wb") as f:
        f.write(os.urandom(1_000_003))
    with open(f"{root}/sparse", "wb") as f:
        f.seek(SPARSE_TAIL)
        f.write(b"tail")
    with open(f"{root}/a/b/c/small", "wb") as f:
        f.write(b"tiny")
    open(f"{root}/empty", "wb").close()
    os.link(f"{root}/a/data", f"{root}/a/b/hardlink")
    os.symlink("a/b/c/small", f"{root}/symlink")
    os.symlink("dangling/target", f"{root}/a/dangling")
    os.mkfifo(f"{root}/fifo", 0o640)
    os.mknod(f"{root}/chardev", stat.S_IFCHR | 0o600, os.makedev(10, 200))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"{root}/a/sock")
    sock.close()
    os.mkdir(f"{root}/" + "n" * 255)
    os.setxattr(f"{root}/a/data", "user.one", b"1")
    os.setxattr(f"{root}/a/data", "user.bin", bytes(range(256)) * 4)
    os.setxattr(f"{root}/a", "user.dir", b"dir value")
    os.setxattr(f"{root}/a/b/c/small", "trusted.t", b"")
    os.setxattr(f"{root}/a/b", "user.atomicfs.atomic_unit", b"16384")
    with open(f"{root}/a/b/inherits", "wb") as f:
        f.write(os.urandom(65536))
    os.chown(f"{root}/a/b/c/small", 4321, 8765)
    os.chmod(f"{root}/a/b/c/small", 0o4751)  # after chown, which clears set-user-ID
    os.chmod(f"{root}/a/b/c", 0o1777)
    os.lchown(f"{root}/symlink", 11, 12)
    os.chown(f"{root}/fifo", 65534, 65534)
    for i, path in enumerate(["a/data", "a/b/c/small", "sparse", "a/b/c", "a", "fifo"]):
        os.utime(f"{root}/{path}", ns=(1_500_000_000 * NS + 111_111_111 * i + 7,
                                       1_600_000_000 * NS + 222_222_222 * i + 9))
    os.utime(f"{root}/symlink", ns=(NS + 1, 2 * NS + 3), follow_symlinks=False)


def test_remount_keeps_tree_contents_and_attributes(backing: str, mounter: MountFactory) -> None:
    m = mounter(backing)
    build_varied_tree(m.path)
    state = tree_state(m.path)  # stat only: reading would move access times
    root_st = os.stat(m.path)
    data = contents(m.path, skip=("sparse",))  # 5 GiB of holes: checked in pieces below
    state_after_read = tree_state(m.path)
    m.umount()
    fsck_clean(backing)
    again = mounter(backing)
    assert tree_state(again.path) == state_after_read
    assert contents(again.path, skip=("sparse",)) == data
    with open(again / "sparse", "rb") as f:
        f.seek(SPARSE_TAIL - 65536)
        assert f.read() == bytes(65536) + b"tail"
        f.seek(3 << 30)
        assert f.read(1 << 20) == bytes(1 << 20)
    assert os.stat(again.path).st_mode == root_st.st_mode
    assert again.stat("a/b/inherits")["atomic_unit"] == 16384
    # reading moved only the access times of regular files
    assert {k: v[:6] + v[7:] for k, v in state.items()} == \
        {k: v[:6] + v[7:] for k, v in state_after_read.items()}
    small = state["a/b/c/small"]
    assert (small[1], small[2], small[3]) == (stat.S_IFREG | 0o4751, 4321, 8765)
    assert state["a/data"][4] == 2 and state["a/data"][0] == state["a/b/hardlink"][0]


def _kill_and_recover(m: Mount, mounter: MountFactory) -> Mount:
    """SIGKILL the daemon; fsck must find no damage before the next mount recovers."""
    m.kill()
    fsck_clean(m.target)
    return mounter(m.target)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_sigkill_after_fsync_loses_nothing_fsync_covered(backing: str,
                                                         mounter: MountFactory) -> None:
    m = mounter(backing)
    os.mkdir(m / "d")
    durable: dict[str, bytes] = {}
    for i in range(20):
        data = os.urandom(4096 * i + 123)
        path = m / f"d/f{i}"
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        durable[f"d/f{i}"] = data
    fsync_path(m / "d")
    # changes of every kind, each made durable by fsync of the file or its directory
    os.rename(m / "d/f1", m / "d/renamed")
    durable["d/renamed"] = durable.pop("d/f1")
    os.unlink(m / "d/f2")
    del durable["d/f2"]
    os.link(m / "d/f3", m / "linked")
    durable["linked"] = durable["d/f3"]
    fsync_path(m / "d")
    fsync_path(m.path)
    os.truncate(m / "d/f4", 1000)
    durable["d/f4"] = durable["d/f4"][:1000]
    fsync_path(m / "d/f4")
    os.setxattr(m / "d/f5", "user.k", b"kept")
    os.chmod(m / "d/f5", 0o600)
    os.utime(m / "d/f5", ns=(3 * NS + 3, 4 * NS + 4))
    fsync_path(m / "d/f5")
    with open(m / "d/f6", "r+b") as f:
        f.seek(50_000)
        f.write(b"patched")
        f.flush()
        os.fdatasync(f.fileno())
    old = durable["d/f6"]
    durable["d/f6"] = (old + bytes(max(0, 50_000 - len(old))))[:50_000] + b"patched" + \
        old[50_007:]
    again = _kill_and_recover(m, mounter)
    st = os.stat(again / "d/f5")  # before reading: reading moves the access time
    assert contents(again.path) == durable
    assert os.getxattr(again / "d/f5", "user.k") == b"kept"
    assert (stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns) == (0o600, 3 * NS + 3,
                                                                          4 * NS + 4)
    assert os.stat(again / "linked").st_nlink == 2
    again.umount()
    fsck_clean(backing)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_sigkill_with_unsynced_changes_stays_consistent(mnt: Mount,
                                                        mounter: MountFactory) -> None:
    """What no fsync covered may be lost, but the filesystem must mount and check clean,
    and what was fsynced before stays."""
    with open(mnt / "synced", "wb") as f:
        f.write(b"s" * 100_000)
        os.fsync(f.fileno())
    fsync_path(mnt.path)
    for i in range(200):
        with open(mnt / f"loose{i}", "wb") as f:
            f.write(os.urandom(i * 100))
    os.rename(mnt / "synced", mnt / "synced-renamed-unsynced")
    again = _kill_and_recover(mnt, mounter)
    names = set(os.listdir(again.path))
    assert len(names & {"synced", "synced-renamed-unsynced"}) == 1
    survivor = (names & {"synced", "synced-renamed-unsynced"}).pop()
    with open(again / survivor, "rb") as f:
        assert f.read() == b"s" * 100_000
    again.umount()
    fsck_clean(mnt.target)


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_thousands_of_files_mixed_operations_survive(loop_device: str,
                                                     mounter: MountFactory) -> None:
    """A few thousand files under mixed operations, content-checked against a model after
    unmount/remount, after SIGKILL right after fsync, and by fsck each time."""
    cli("mkfs", loop_device)
    m = mounter(loop_device)
    model = Model()
    work = populate(m.path, model, seed=20240601, files=2500, dirs=40)
    work.run(2500)
    check_tree(m.path, model)

    m.umount()
    fsck_clean(loop_device)
    m = mounter(loop_device)
    check_tree(m.path, model)

    work.root = m.path
    work.touched_files.clear()  # the clean unmount made all earlier changes durable
    work.touched_dirs.clear()
    work.run(1000)
    assert work.fsync_touched() > 500
    m = _kill_and_recover(m, mounter)
    check_tree(m.path, model)

    work.root = m.path
    work.run(500)
    m.umount()
    fsck_clean(loop_device)
    m = mounter(loop_device)
    check_tree(m.path, model)
    assert len(model.names) > 2000


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_unlinked_open_file_at_crash_is_removed_by_the_next_mount(
        mnt: Mount, mounter: MountFactory) -> None:
    free0 = os.statvfs(mnt.path).f_bfree
    fd = os.open(mnt / "orphan", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, os.urandom(8 << 20))
        os.fsync(fd)
        os.unlink(mnt / "orphan")
        fsync_path(mnt.path)
        mnt.kill()  # the file is still open: its blocks are held by an orphan inode
    finally:
        try:
            os.close(fd)
        except OSError:  # ENOTCONN: the daemon is gone
            pass
    res = cli("fsck", mnt.target)
    assert "unlinked but was open" in res.stdout
    again = mounter(mnt.target)
    assert os.listdir(again.path) == []
    assert os.statvfs(again.path).f_bfree >= free0 - 16
    again.umount()
    res = cli("fsck", mnt.target)
    assert "unlinked but was open" not in res.stdout and "clean" in res.stdout


@pytest.mark.daemon_log(allow=[r"taking over the owner record of atomicfs pid \d+ on this host \("])
def test_unsynced_file_never_comes_back_as_zeros(mnt: Mount, mounter: MountFactory) -> None:
    """A crash may lose data that was never fsync'ed, but the recorded size follows the
    data: a file is never brought back at its full size with zeros where its data was,
    even when another file's fsync commits the log meanwhile."""
    data = bytes(range(256)) * 4096  # 1 MiB, no zero bytes runs of a block
    with open(mnt / "unsynced", "wb") as f:
        f.write(data)
    with open(mnt / "other", "wb") as f:
        f.write(b"x")
        f.flush()
        os.fsync(f.fileno())  # commits the log: before the fix, with unsynced's size
    mnt.kill()
    m2 = mounter(mnt.target)
    with open(m2 / "other", "rb") as f:
        assert f.read() == b"x"
    with open(m2 / "unsynced", "rb") as f:
        got = f.read()
    assert got == data[: len(got)], "the recovered part must be the data written"
    for i in range(0, len(got), 4096):
        assert got[i: i + 4096] != bytes(4096), f"a zero block at {i} of {len(got)}"
