"""An in-test model of a directory tree, a random workload that applies each operation to
both the model and a real directory, and a check that the two agree.

Files are identified by a model id, so hard links (several names, one file) are modelled as
the real thing: one object, several names, nlink equal to the number of names."""
from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field


@dataclass
class FileNode:
    data: bytearray
    mode: int = 0o644
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Model:
    files: dict[int, FileNode] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)  # path -> file id
    dirs: set[str] = field(default_factory=lambda: {""})
    symlinks: dict[str, str] = field(default_factory=dict)
    next_id: int = 0

    def nlink(self, fid: int) -> int:
        return sum(1 for f in self.names.values() if f == fid)

    def children(self, d: str) -> list[str]:
        prefix = d + "/" if d else ""
        everything = list(self.names) + list(self.dirs) + list(self.symlinks)
        return [p for p in everything if p and p.startswith(prefix)
                and "/" not in p[len(prefix):]]


def _size(rng: random.Random) -> int:
    """Mostly small files, some of several folios, a few large (about 15 KB on average)."""
    r = rng.random()
    if r < 0.15:
        return 0
    if r < 0.89:
        return rng.randrange(1, 16 << 10)
    if r < 0.99:
        return rng.randrange(16 << 10, 128 << 10)
    return rng.randrange(128 << 10, 1 << 20)


class Workload:
    """Random operations applied to the real tree at root and to the model; `touched`
    collects what an fsync must cover to make them durable (files and directories)."""

    def __init__(self, root: str, model: Model, seed: int) -> None:
        self.root = root
        self.m = model
        self.rng = random.Random(seed)
        self.touched_files: set[str] = set()
        self.touched_dirs: set[str] = set()
        self._counter = 0

    def real(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _new_name(self, d: str, prefix: str) -> str:
        self._counter += 1
        name = f"{prefix}{self._counter}"
        if self.rng.random() < 0.02:
            name = (name + "_" * 255)[:255]
        return f"{d}/{name}" if d else name

    def _touch_dir_of(self, path: str) -> None:
        self.touched_dirs.add(os.path.dirname(path))

    # ------------------------------------------------------------------- operations

    def mkdir(self) -> None:
        d = self.rng.choice(sorted(self.m.dirs))
        path = self._new_name(d, "d")
        os.mkdir(self.real(path))
        self.m.dirs.add(path)
        self._touch_dir_of(path)

    def create(self) -> None:
        d = self.rng.choice(self._dir_list())
        path = self._new_name(d, "f")
        data = self.rng.randbytes(_size(self.rng))
        with open(self.real(path), "xb") as f:
            f.write(data)
        fid = self.m.next_id
        self.m.next_id += 1
        self.m.files[fid] = FileNode(bytearray(data))
        self.m.names[path] = fid
        self.touched_files.add(path)
        self._touch_dir_of(path)

    def overwrite(self) -> None:
        path = self._some_file()
        if path is None:
            return
        node = self.m.files[self.m.names[path]]
        off = self.rng.randrange(0, len(node.data) + 8192)
        data = self.rng.randbytes(self.rng.randrange(1, 32 << 10))
        fd = os.open(self.real(path), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, off) == len(data)
        finally:
            os.close(fd)
        if off > len(node.data):
            node.data.extend(bytes(off - len(node.data)))
        node.data[off:off + len(data)] = data
        self._touch_file(path)

    def truncate(self) -> None:
        path = self._some_file()
        if path is None:
            return
        node = self.m.files[self.m.names[path]]
        size = self.rng.randrange(0, len(node.data) * 2 + 4096)
        os.truncate(self.real(path), size)
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        self._touch_file(path)

    def rename_file(self) -> None:
        path = self._some_file()
        if path is None:
            return
        if self.rng.random() < 0.3:  # over another file
            dest = self._some_file()
            if dest is None or self.m.names[dest] == self.m.names[path]:
                return
        else:
            dest = self._new_name(self.rng.choice(self._dir_list()), "r")
        os.rename(self.real(path), self.real(dest))
        replaced = self.m.names.get(dest)
        self.m.names[dest] = self.m.names.pop(path)
        if replaced is not None:
            if replaced in self.m.names.values():
                self._touch_other_names(replaced)
            else:
                del self.m.files[replaced]
        self._touch_dir_of(path)
        self._touch_dir_of(dest)
        self._touch_file(dest)

    def rename_dir(self) -> None:
        dirs = [d for d in self.m.dirs if d]
        if not dirs:
            return
        src = self.rng.choice(sorted(dirs))
        parents = [d for d in self._dir_list() if d != src and not d.startswith(src + "/")]
        dest = self._new_name(self.rng.choice(parents), "m")
        os.rename(self.real(src), self.real(dest))
        self._move_prefix(src, dest)
        self._touch_dir_of(src)
        self._touch_dir_of(dest)
        self.touched_dirs.add(dest)

    def unlink(self) -> None:
        path = self._some_file()
        if path is None:
            return
        os.unlink(self.real(path))
        fid = self.m.names.pop(path)
        if fid not in self.m.names.values():
            del self.m.files[fid]
        self._touch_dir_of(path)
        self.touched_files.discard(path)
        self._touch_other_names(fid)

    def link(self) -> None:
        path = self._some_file()
        if path is None:
            return
        dest = self._new_name(self.rng.choice(self._dir_list()), "l")
        os.link(self.real(path), self.real(dest))
        self.m.names[dest] = self.m.names[path]
        self._touch_dir_of(dest)
        self._touch_file(dest)

    def symlink(self) -> None:
        d = self.rng.choice(self._dir_list())
        path = self._new_name(d, "s")
        target = "../" * self.rng.randrange(3) + f"t{self.rng.randrange(10**6)}"
        os.symlink(target, self.real(path))
        self.m.symlinks[path] = target
        self._touch_dir_of(path)

    def xattr(self) -> None:
        path = self._some_file()
        if path is None:
            return
        node = self.m.files[self.m.names[path]]
        if node.xattrs and self.rng.random() < 0.3:
            name = self.rng.choice(sorted(node.xattrs))
            os.removexattr(self.real(path), name)
            del node.xattrs[name]
        else:
            name = f"user.k{self.rng.randrange(5)}"
            value = self.rng.randbytes(self.rng.randrange(0, 300))
            os.setxattr(self.real(path), name, value)
            node.xattrs[name] = value
        self._touch_file(path)

    def chmod(self) -> None:
        path = self._some_file()
        if path is None:
            return
        mode = self.rng.choice([0o600, 0o644, 0o755, 0o640, 0o4755])
        os.chmod(self.real(path), mode)
        self.m.files[self.m.names[path]].mode = mode
        self._touch_file(path)

    OPS = (("create", 20), ("overwrite", 15), ("truncate", 8), ("rename_file", 12),
           ("rename_dir", 2), ("unlink", 10), ("link", 6), ("symlink", 3), ("xattr", 8),
           ("chmod", 4), ("mkdir", 3))

    def run(self, count: int) -> None:
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for _ in range(count):
            getattr(self, self.rng.choices(names, weights)[0])()

    # ---------------------------------------------------------------------- helpers

    def _dir_list(self) -> list[str]:
        return sorted(self.m.dirs)

    def _some_file(self) -> str | None:
        if not self.m.names:
            return None
        return self.rng.choice(sorted(self.m.names))

    def _touch_file(self, path: str) -> None:
        self.touched_files.add(path)

    def _touch_other_names(self, fid: int) -> None:
        for p, f in self.m.names.items():
            if f == fid:
                self.touched_files.add(p)  # its link count changed

    def _move_prefix(self, src: str, dest: str) -> None:
        def moved(p: str) -> str:
            return dest + p[len(src):] if p == src or p.startswith(src + "/") else p
        self.m.dirs = {moved(d) for d in self.m.dirs}
        self.m.names = {moved(p): f for p, f in self.m.names.items()}
        self.m.symlinks = {moved(p): t for p, t in self.m.symlinks.items()}
        self.touched_files = {moved(p) for p in self.touched_files}
        self.touched_dirs = {moved(p) for p in self.touched_dirs}

    def fsync_touched(self) -> int:
        """fsync every touched file that still exists, then every touched directory."""
        n = 0
        for path in sorted(self.touched_files):
            if path not in self.m.names:
                continue
            fd = os.open(self.real(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            n += 1
        for d in sorted(self.touched_dirs):
            if d not in self.m.dirs:
                continue
            fd = os.open(self.real(d), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            n += 1
        self.touched_files.clear()
        self.touched_dirs.clear()
        return n


def check_tree(root: str, m: Model) -> None:
    """The real tree at root is exactly the model: names, types, data, modes, link counts,
    shared inodes of hard links, symlink targets, xattrs."""
    seen_dirs, seen_files, seen_links = {""}, {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        for name in dirnames:
            seen_dirs.add(os.path.join(rel_dir, name))
        for name in filenames:
            rel = os.path.join(rel_dir, name)
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISLNK(st.st_mode):
                seen_links[rel] = os.readlink(os.path.join(dirpath, name))
            else:
                assert stat.S_ISREG(st.st_mode), rel
                seen_files[rel] = st
    assert seen_dirs == m.dirs, _diff("directories", seen_dirs, m.dirs)
    assert seen_links == m.symlinks, _diff("symlinks", set(seen_links), set(m.symlinks))
    assert set(seen_files) == set(m.names), _diff("files", set(seen_files), set(m.names))
    ino_of: dict[int, int] = {}
    nlinks: dict[int, int] = {}
    for fid in m.names.values():
        nlinks[fid] = nlinks.get(fid, 0) + 1
    for rel, st in sorted(seen_files.items()):
        fid = m.names[rel]
        node = m.files[fid]
        assert ino_of.setdefault(fid, st.st_ino) == st.st_ino, f"{rel}: links split"
        assert st.st_nlink == nlinks[fid], f"{rel}: nlink {st.st_nlink}"
        assert stat.S_IMODE(st.st_mode) == node.mode, f"{rel}: mode {oct(st.st_mode)}"
        assert st.st_size == len(node.data), f"{rel}: size {st.st_size} != {len(node.data)}"
        path = os.path.join(root, rel)
        with open(path, "rb") as f:
            assert f.read() == node.data, f"{rel}: content differs"
        xattrs = {n: os.getxattr(path, n) for n in os.listxattr(path)}
        assert xattrs == node.xattrs, f"{rel}: xattrs"


def _diff(what: str, real: set[str], model: set[str]) -> str:
    return (f"{what}: only on disk {sorted(real - model)[:10]}, "
            f"only in model {sorted(model - real)[:10]}")


def populate(root: str, m: Model, seed: int, files: int, dirs: int) -> Workload:
    w = Workload(root, m, seed)
    for _ in range(dirs):
        w.mkdir()
    for _ in range(files):
        w.create()
    return w
