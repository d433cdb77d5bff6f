"""A full filesystem returns ENOSPC, stays consistent, and works again after deletes."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import MountFactory, cli, make_image

CHUNK = 1 << 20


def fill_with_files(root: str, prefix: str) -> tuple[dict[str, bytes], OSError]:
    """Write 1 MiB files (fsynced) until something fails; returns what was written fully
    and the error. A file whose write failed is kept with what it has."""
    written: dict[str, bytes] = {}
    for i in range(1000):
        path = os.path.join(root, f"{prefix}{i}")
        data = os.urandom(CHUNK)
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        except OSError as exc:
            return written, exc
        try:
            assert os.write(fd, data) == CHUNK
            os.fsync(fd)
        except OSError as exc:
            return written, exc
        finally:
            os.close(fd)
        written[path] = data
    raise AssertionError("a 64 MiB filesystem took 1000 MiB")


def test_full_filesystem_enospc_consistent_and_recovers(tmp_path: Path,
                                                        mounter: MountFactory) -> None:
    image = make_image(tmp_path / "small.img", "64M")
    m = mounter(image)
    written, err = fill_with_files(m.path, "f")
    assert err.errno == errno.ENOSPC, err
    assert len(written) >= 40  # most of the 64 MiB is usable
    st = os.statvfs(m.path)
    assert st.f_bavail * st.f_frsize < 2 * CHUNK
    # metadata still works when data space is gone, or says ENOSPC; never anything else
    made = 0
    for i in range(300):
        try:
            os.mkdir(m / f"dir{i}")
            made += 1
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
    # what was written before the failure is intact, also after remount and fsck
    for path, data in written.items():
        with open(path, "rb") as f:
            assert f.read() == data
    m.umount()
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    m = mounter(image)
    names = sorted(written, key=lambda p: int(os.path.basename(p)[1:]))
    for path in names[:5]:
        with open(m / os.path.basename(path), "rb") as f:
            assert f.read() == written[path]
    assert sum(1 for n in os.listdir(m.path) if n.startswith("dir")) == made
    # delete half, and writing works again
    for path in names[::2]:
        os.unlink(m / os.path.basename(path))
    again, err2 = _write_some(m.path, len(names[::2]) // 2)
    for path, data in again.items():
        with open(path, "rb") as f:
            assert f.read() == data
    m.umount()
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert err2 is None


def _write_some(root: str, count: int) -> tuple[dict[str, bytes], OSError | None]:
    out: dict[str, bytes] = {}
    for i in range(count):
        path = os.path.join(root, f"again{i}")
        data = os.urandom(CHUNK)
        try:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            return out, exc
        out[path] = data
    return out, None


def test_enospc_on_buffered_writes_without_fsync(tmp_path: Path,
                                                 mounter: MountFactory) -> None:
    """Without fsync, the write call itself reports ENOSPC (space is reserved when data
    enters the cache); unmount then writes everything that was accepted."""
    image = make_image(tmp_path / "small.img", "64M")
    m = mounter(image)
    accepted: dict[str, bytes] = {}
    failure = None
    for i in range(200):
        path = m / f"b{i}"
        data = os.urandom(CHUNK)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            assert os.write(fd, data) == CHUNK
            accepted[path] = data
        except OSError as exc:
            failure = exc
            break
        finally:
            os.close(fd)
    assert failure is not None and failure.errno == errno.ENOSPC
    assert m.umount().returncode == 0
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    m = mounter(image)
    for path, data in accepted.items():
        with open(m / os.path.basename(path), "rb") as f:
            assert f.read() == data


def test_metadata_growth_on_a_full_filesystem_is_enospc_not_eio(tmp_path: Path,
                                                                 mounter: MountFactory) -> None:
    """Names and attributes take space too: with data filling the disk, creating files
    with large attributes must end in ENOSPC, and the filesystem must still checkpoint,
    unmount cleanly and keep every file whose creation succeeded."""
    image = make_image(tmp_path / "small.img", "64M")
    m = mounter(image)
    written, err = fill_with_files(m.path, "f")
    assert err.errno == errno.ENOSPC
    created: dict[str, bytes] = {}
    for i in range(20000):
        path = m / (f"meta{i}-" + "x" * 200)
        value = os.urandom(4000)
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            os.setxattr(path, "user.v", value)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        created[os.path.basename(path)] = value
    else:
        raise AssertionError("20000 files with 4 KB attributes fit on 64 MiB")
    assert m.umount().returncode == 0
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    m = mounter(image)
    for name, value in created.items():
        assert os.getxattr(m / name, "user.v") == value
    for name in list(created)[:50]:
        os.unlink(m / name)
    os.setxattr(m / "f0", "user.after", b"room again")
    assert m.umount().returncode == 0
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_attributes_alone_can_fill_the_filesystem(tmp_path: Path, mounter: MountFactory
                                                  ) -> None:
    image = make_image(tmp_path / "small.img", "64M")
    m = mounter(image)
    os.mkdir(m / "d")
    count = 0
    with pytest.raises(OSError) as info:
        for i in range(5000):
            path = m / f"d/{i}"
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            os.setxattr(path, "user.big", os.urandom(65536))
            count += 1
    assert info.value.errno == errno.ENOSPC
    assert count >= 100
    # the room left belongs to the metadata snapshot: file data gets ENOSPC
    fd = os.open(m / "d/0", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, os.urandom(1 << 20))
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    shutil.rmtree(m / "d")
    with open(m / "after", "wb") as f:
        f.write(os.urandom(8 << 20))
    assert m.umount().returncode == 0
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _write_until_full(root: str, prefix: str, sizes: list[int], fsync_every: int,
                      chunk: int) -> dict[str, bytes]:
    """Write files of the given sizes (cycled) in `chunk`-byte writes until ENOSPC; every
    fsync_every-th file is fsynced (its blocks allocated, so deleting it frees blocks that
    wait for a commit). Returns what was accepted, the last file's part included."""
    accepted: dict[str, bytes] = {}
    for i in range(100000):
        path = os.path.join(root, f"{prefix}{i}")
        data = os.urandom(sizes[i % len(sizes)])
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:done + chunk])
            if i % fsync_every == 0:
                os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            accepted[path] = data[:done]
            return accepted
        finally:
            os.close(fd)
        accepted[path] = data
    raise AssertionError("a 64 MiB filesystem took 100000 files")


def test_fill_delete_rewrite_umount_writes_everything_back(tmp_path: Path,
                                                           mounter: MountFactory) -> None:
    """Space promised to a write is there at writeback: fill with buffered and fsynced
    files of mixed sizes, delete every other one, fill again with small writes, and the
    unmount writes all of it back (rc 0, no 'no space to write back'), fsck is clean and
    every accepted byte reads back after a remount. A checkpoint written meanwhile takes
    its snapshot out of the metadata reserve: that must not take the promised blocks."""
    image = make_image(tmp_path / "small.img", "64M")
    m = mounter(image)
    first = _write_until_full(m.path, "f", [4096, 12288, 65536, 300_000], 5, 1 << 20)
    assert len(first) > 100
    for path in sorted(first)[::2]:
        os.unlink(path)
        del first[path]
    second = _write_until_full(m.path, "g", [4096, 8192, 65536, 1 << 20], 7, 4096)
    assert len(second) > 50
    res = m.umount(check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    res = cli("fsck", image, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    m = mounter(image)
    for path, data in {**first, **second}.items():
        with open(m / os.path.basename(path), "rb") as f:
            assert f.read() == data, path
    assert m.umount().returncode == 0
