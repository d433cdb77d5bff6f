"""A failing daemon never takes the mount away; test knobs and the mount's statistics are
kept from other users; runtime files cannot be planted; the daemon detaches cleanly.

Non-root cases run real commands under another uid with setpriv: `nobody`, and for the
planted-runtime-directory attack a temporary user (removed even when the test fails)."""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from atomicfs import daemonlog, runtime
from tests.conftest import ATOMICFS, Mount, MountFactory, make_image, mounted_at, need, run
from tests.mount.test_badinput import refused

NOBODY = "nobody"


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def daemon_log(pid: int) -> str:
    """What the daemon logged (its private log file, or the journal)."""
    path = runtime.file_path(runtime.log_name(pid))
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    need(shutil.which("journalctl"), "the daemon's log: a log file or journalctl")
    return run("journalctl", "-q", "-o", "cat", f"_PID={pid}", check=False).stdout


def _others_can_reach(path: Path) -> bool:
    """Whether any user may enter every directory above path (and read it)."""
    for parent in path.resolve().parents:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


_WORLD: list[str] = []  # PYTHONPATH of the world-readable copy, once made


def _world_pythonpath() -> str:
    """A checkout in a directory only root may enter (/root, `mktemp -d`) hides the venv
    and the package from other users: copy the package and the venv's site-packages once
    into a directory everyone may read, removed when the tests end."""
    if not _WORLD:
        import atexit

        import trio
        top = Path(tempfile.mkdtemp(prefix="atomicfs-world-", dir="/tmp"))
        atexit.register(shutil.rmtree, top, True)
        shutil.copytree(Path(trio.__file__).resolve().parents[1], top / "site",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(Path(daemonlog.__file__).resolve().parent, top / "pkg" / "atomicfs",
                        ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.c"))
        for d in [top, *top.rglob("*")]:
            os.chmod(d, os.stat(d).st_mode | stat.S_IROTH |
                     (stat.S_IXOTH if d.is_dir() or os.stat(d).st_mode & stat.S_IXUSR else 0))
        _WORLD.append(f"{top / 'pkg'}:{top / 'site'}")
    return _WORLD[0]


def as_user(user: str, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run a command as user (no capabilities, no supplementary groups). This project's
    Python runs from the checkout, or from a world-readable copy where the checkout is
    closed to other users."""
    need(shutil.which("setpriv"), "setpriv (package util-linux)")
    pw = pwd.getpwnam(user)
    env = dict(env if env is not None else os.environ)
    argv = list(args)
    if argv and argv[0] == sys.executable and not _others_can_reach(Path(sys.executable)):
        argv[0] = os.path.realpath(sys.executable)  # the system interpreter the venv uses
        env["PYTHONPATH"] = _world_pythonpath()
    return subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                           "--clear-groups", *argv], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="atomicfs-trust-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for sub in path.iterdir():  # nothing of ours stays mounted below it
            if mounted_at(str(sub)) is not None:
                run("fusermount3", "-u", "-z", str(sub), check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def temp_user(world_dir: Path) -> Iterator[pwd.struct_passwd]:
    """A fresh unprivileged user with a home directory under world_dir; removed after."""
    need(shutil.which("useradd") and shutil.which("userdel"), "useradd (package passwd)")
    name = f"afstr{os.getpid() % 100000}"
    home = world_dir / "home"
    run("useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/usr/sbin/nologin",
        "--user-group", name)
    try:
        pw = pwd.getpwnam(name)
        home.mkdir(mode=0o755)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        yield pw
    finally:
        run("userdel", name, check=False)


def detach(path: str) -> None:
    run("fusermount3", "-u", "-z", path, check=False)


# ------------------------------------------------------------ a dying daemon, a live mount

@pytest.mark.daemon_log(allow=[r"^opendir failed unexpectedly; the request gets EIO$"])
def test_an_unexpected_error_fails_only_its_request(image: str, mounter: MountFactory
                                                    ) -> None:
    m = mounter(image, "testing")
    with open(m / "f", "wb") as f:
        f.write(b"before")
    m.control("fault=request")  # the next request's handler raises an unexpected error
    with pytest.raises(OSError) as exc:
        os.listdir(m.path)
    assert exc.value.errno == errno.EIO
    assert m.alive and not gone(m.pid)
    with open(m / "f", "ab") as f:  # still serving
        f.write(b" and after")
    with open(m / "f", "rb") as f:
        assert f.read() == b"before and after"
    logged = daemon_log(m.pid)
    assert logged.count("failed unexpectedly") == 1, logged
    assert "Traceback" in logged and "InjectedFault" in logged
    assert m.umount().returncode == 0


@pytest.mark.daemon_log(allow=[r"^daemon stopped on an error; .* answering ENOTCONN"])
def test_a_dead_daemon_leaves_the_mount_answering_enotconn(image: str, mounter: MountFactory
                                                           ) -> None:
    m = mounter(image, "testing")
    os.mkdir(m / "app")
    with open(m / "app/durable", "wb") as f:
        f.write(b"fsynced")
        f.flush()
        os.fsync(f.fileno())
    pid = m.pid
    try:
        m.control("fault=daemon")  # the serving task dies (the reply may never come)
    except OSError:
        pass
    wait_for(lambda: gone(pid), "the daemon to exit")
    assert mounted_at(m.path) == "fuse.atomicfs", "the dead daemon unmounted"
    for attempt in (lambda: open(m / "app/x", "wb"), lambda: open(m / "x", "wb"),
                    lambda: os.listdir(m.path)):
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.ENOTCONN
    assert "Traceback" in daemon_log(pid)  # a failed daemon's log stays
    detach(m.path)
    assert os.listdir(m.path) == [], "something landed in the directory underneath"
    again = mounter(image)
    with open(again / "app/durable", "rb") as f:
        assert f.read() == b"fsynced"


@pytest.mark.daemon_log(allow=[r"^cannot unmount .*: Device or resource busy\); still serving$"])
def test_sigterm_leaves_a_busy_mount_mounted(mnt: Mount) -> None:
    """SIGTERM unmounts as umount does: not while the mount is busy (a lazy unmount would
    let the open file's owner go on in the directory underneath)."""
    fd = os.open(mnt / "open", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.kill(mnt.pid, signal.SIGTERM)
        wait_for(lambda: "still serving" in daemon_log(mnt.pid), "the refused unmount")
        assert mnt.alive
        os.write(fd, b"still here")
        assert os.pread(fd, 100, 0) == b"still here"
    finally:
        os.close(fd)
    assert mnt.umount().returncode == 0


# ------------------------------------------------------------- controls and test knobs

BAD_CONTROLS = ["delay=inf", "delay=nan", "delay=1e300", "delay=-5", "delay=", "delay=abc",
                "inject=bogus", "inject=data:99999999999999999999", "fault=", "fault=bogus",
                "sync=now", "bogus"]


@pytest.mark.daemon_log(allow=[
    r"^control (delay|inject|fault) refused: (delay must be|unknown inject|bad inject|fault must)"])
def test_invalid_control_values_are_refused(image: str, mounter: MountFactory) -> None:
    m = mounter(image, "testing")
    with open(m / "f", "wb") as f:
        f.write(b"x")
    for value in BAD_CONTROLS:
        with pytest.raises(OSError) as exc:
            m.control(value)
        assert exc.value.errno == errno.EINVAL, value
        assert m.alive and not gone(m.pid), f"{value} killed the daemon"
    logged = daemon_log(m.pid)
    assert "Traceback" not in logged
    assert "not 'inf'" in logged and "not '1e300'" in logged
    m.control("delay=0")
    with open(m / "f", "rb") as f:
        assert f.read() == b"x"
    assert m.umount().returncode == 0


@pytest.mark.daemon_log(allow=[
    r"^control (delay|inject|fault) refused: a test knob, for root on mounts started"])
def test_test_knobs_need_a_testing_mount(image: str, mounter: MountFactory) -> None:
    m = mounter(image)
    for value in ("delay=10", "inject=data", "fault=daemon", "fault=request"):
        with pytest.raises(OSError) as exc:
            m.control(value)
        assert exc.value.errno == errno.EPERM, value
    m.control("sync")  # the ordinary controls still work
    assert m.alive and not gone(m.pid)


@pytest.mark.daemon_log(allow=[
    r"^control (delay|inject|fault) refused: a test knob, for root on mounts started"])
def test_other_users_get_neither_knobs_nor_the_mounts_statistics(
        image: str, mounter: MountFactory, world_dir: Path) -> None:
    """nobody owns the mount's root directory (so may sync), but on a testing mount gets
    no test knob, and the root's statistics (image path, options) are not for them."""
    mp = world_dir / "mnt"
    mp.mkdir()
    m = mounter(image, "testing", "allow_other", path=str(mp))
    os.chown(m.path, pwd.getpwnam(NOBODY).pw_uid, -1)
    with open(m / "f", "wb") as f:
        f.write(b"file")
    for value in ("delay=1e300", "delay=10", "inject=data", "fault=daemon"):
        res = as_user(NOBODY, "setfattr", "-n", "user.atomicfs.control", "-v", value, m.path)
        assert res.returncode != 0 and "Operation not permitted" in res.stderr, value
    res = as_user(NOBODY, "setfattr", "-n", "user.atomicfs.control", "-v", "sync", m.path)
    assert res.returncode == 0, res.stderr
    res = as_user(NOBODY, "getfattr", "-n", "user.atomicfs.stat", m.path)
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = as_user(NOBODY, "getfattr", "-n", "user.atomicfs.stat", m / "f")  # a file's: fine
    assert res.returncode == 0 and "atomic_unit" in res.stdout
    res = as_user(NOBODY, *ATOMICFS, "stat", m.path)
    refused(res, "permission denied")
    assert m.alive and not gone(m.pid)
    assert "atomic_unit" in m.stat("f") and m.stat()["pid"] == m.pid  # root still reads it


@pytest.mark.parametrize("option", ["delay=5", "inject=off", "testing", "unsafe_atomic"])
def test_test_knob_mount_options_are_for_root(option: str, mount_env: None,
                                              world_dir: Path) -> None:
    img = make_image(world_dir / "fs.img", "64M")
    mp = world_dir / "mnt"
    mp.mkdir()
    res = as_user(NOBODY, *ATOMICFS, "mount", img, str(mp), "-o", option)
    refused(res, option.split("=")[0], "root only")
    assert mounted_at(str(mp)) is None


# ------------------------------------------------------------------ runtime files, logs

# The attacker's part: a directory for everyone, with symlinks named after the next pids.
PLANT = """import os, sys
where, target, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.mkdir(where)
os.chmod(where, 0o777)
for pid in range(first, last):
    for kind in ("status", "log"):
        os.symlink(target, f"{where}/{pid}.{kind}")
"""


def test_a_planted_runtime_directory_is_not_used(temp_user: pwd.struct_passwd,
                                                 world_dir: Path, mount_env: None) -> None:
    """The attack of issue 12: without XDG_RUNTIME_DIR the runtime files were put in
    /tmp/atomicfs-UID, whoever made it; nobody made it first, full of symlinks named after
    the next pids' status and log files, pointing at the victim's own file."""
    uid, gid = temp_user.pw_uid, temp_user.pw_gid
    home = Path(temp_user.pw_dir)
    precious = home / "precious"
    precious.write_bytes(b"the victim's data\n")
    os.chown(precious, uid, gid)
    img = make_image(world_dir / "fs.img", "64M")
    os.chown(img, uid, gid)
    mp = world_dir / "mnt"
    mp.mkdir()
    os.chown(mp, uid, gid)
    planted = Path(f"/tmp/atomicfs-{uid}")
    shutil.rmtree(planted, ignore_errors=True)
    try:
        with open("/proc/sys/kernel/ns_last_pid") as f:
            last = int(f.read())
        res = as_user(NOBODY, sys.executable, "-c", PLANT, str(planted), str(precious),
                      str(last + 1), str(last + 5000))
        assert res.returncode == 0, res.stderr
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}
        res = as_user(temp_user.pw_name, *ATOMICFS, "mount", img, str(mp), env=env)
        if res.returncode == 0:  # where unprivileged FUSE mounts work
            assert as_user(temp_user.pw_name, *ATOMICFS, "umount", str(mp),
                           env=env).returncode == 0
        else:  # here /dev/fuse may be root's only: refused after the runtime files
            refused(res)
        assert precious.read_bytes() == b"the victim's data\n", "the victim's file changed"
        assert all(p.is_symlink() for p in planted.iterdir()), "files created in /tmp"
        private = home / ".cache" / "atomicfs"
        st = private.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == uid
        assert stat.S_IMODE(st.st_mode) == 0o700
    finally:
        shutil.rmtree(planted, ignore_errors=True)


def test_a_runtime_directory_others_control_is_refused(temp_user: pwd.struct_passwd,
                                                       world_dir: Path,
                                                       mount_env: None) -> None:
    """XDG_RUNTIME_DIR in a shared place: what another user planted there as the atomicfs
    directory (a symlink, their own directory) is refused in one line, and nothing is
    written through it."""
    uid, gid = temp_user.pw_uid, temp_user.pw_gid
    home = Path(temp_user.pw_dir)
    precious = home / "precious"
    precious.write_bytes(b"keep\n")
    os.chown(precious, uid, gid)
    shared = world_dir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    img = make_image(world_dir / "fs.img", "64M")
    os.chown(img, uid, gid)
    mp = world_dir / "mnt"
    mp.mkdir()
    os.chown(mp, uid, gid)
    nobody = pwd.getpwnam(NOBODY)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "XDG_RUNTIME_DIR": str(shared)}
    planted = shared / "atomicfs"

    def mount() -> subprocess.CompletedProcess[str]:
        return as_user(temp_user.pw_name, *ATOMICFS, "mount", img, str(mp), env=env)

    os.symlink(home, planted)
    os.lchown(planted, nobody.pw_uid, nobody.pw_gid)
    refused(mount(), str(planted), "symlink")
    os.unlink(planted)
    planted.mkdir()
    os.chmod(planted, 0o777)
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    refused(mount(), str(planted), f"owned by uid {nobody.pw_uid}")
    os.rmdir(planted)
    planted.mkdir()
    os.chmod(planted, 0o755)
    os.chown(planted, uid, gid)
    refused(mount(), str(planted), "0755", "0700")
    assert precious.read_bytes() == b"keep\n"
    assert sorted(p.name for p in home.iterdir()) == ["precious"]
    assert mounted_at(str(mp)) is None


def test_the_daemon_detaches_and_a_clean_umount_leaves_no_files(image: str, tmp_path: Path,
                                                                mount_env: None) -> None:
    """The daemon works in /, keeps none of the caller's descriptors, and a daemon that
    exits cleanly leaves nothing in the runtime directory."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    caller_dir = tmp_path / "cwd"
    caller_dir.mkdir()
    marker = tmp_path / "inherited"
    fd = os.open(marker, os.O_CREAT | os.O_RDWR, 0o600)  # inheritable, as a shell's would be
    m = Mount(image, str(mp), [])
    try:
        res = subprocess.run(ATOMICFS + ["mount", image, str(mp)], cwd=caller_dir,
                             pass_fds=(fd,), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        m.pid = int(m.stat()["pid"])
        assert os.readlink(f"/proc/{m.pid}/cwd") == "/"
        held = [os.readlink(f"/proc/{m.pid}/fd/{n}") for n in os.listdir(f"/proc/{m.pid}/fd")]
        assert str(marker) not in held, held
        logs = daemonlog.where(m.pid)
        assert m.umount().returncode == 0
        assert not any(n.startswith(f"{m.pid}.") for n in os.listdir(runtime.runtime_dir()))
        assert not logs.startswith("/") or not os.path.exists(logs)
    finally:
        os.close(fd)
        m.cleanup()


def test_runtime_directory_of_root_is_private() -> None:
    if os.geteuid() != 0:
        pytest.skip("root's runtime directory")
    st = os.lstat(runtime.runtime_dir())
    assert runtime.runtime_dir() == "/run/atomicfs"
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
