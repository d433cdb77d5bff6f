"""The `namespace` workload and its oracle.

One thread of single-request operations (create, mkdir, symlink, write, truncate, link,
rename, unlink, rmdir, xattrs, fsync), so the namespace after a crash must be the model's
state after some prefix of them: not before the last operation made durable by an fsync
before t, not after the last one started before t.
"""
from __future__ import annotations

import hashlib
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from atomicfs.crashtest.workloads.base import NEVER, FsView, Verdict, WorkloadError, now, \
    stopped_by_crash


@dataclass
class _Node:
    kind: str  # "f", "d", "l"
    size: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    target: str = ""


class NamespaceModel:
    """What the namespace should look like: paths to node ids, nodes to attributes."""

    def __init__(self) -> None:
        self.paths: dict[str, int] = {}
        self.nodes: dict[int, _Node] = {}
        self._next_id = 1

    def peek_id(self) -> int:
        """The id the next add will use."""
        return self._next_id

    def add(self, path: str, node: _Node) -> int:
        nid = self._next_id
        self._next_id += 1
        self.nodes[nid] = node
        self.paths[path] = nid
        return nid

    def files(self) -> list[str]:
        return [p for p, n in self.paths.items() if self.nodes[n].kind == "f"]

    def dirs(self) -> list[str]:
        return [""] + [p for p, n in self.paths.items() if self.nodes[n].kind == "d"]

    def children(self, d: str) -> list[str]:
        prefix = d + "/" if d else ""
        return [p for p in self.paths if p.startswith(prefix) and "/" not in p[len(prefix):]]

    def remove_path(self, path: str) -> None:
        nid = self.paths.pop(path)
        if nid not in self.paths.values():
            del self.nodes[nid]

    def rename(self, src: str, dst: str) -> None:
        if dst in self.paths:
            self.remove_path(dst)
        moved = {p: n for p, n in self.paths.items() if p == src or p.startswith(src + "/")}
        for p in moved:
            del self.paths[p]
        for p, n in moved.items():
            self.paths[dst + p[len(src):]] = n

    def canonical(self) -> NsState:
        """The state as the oracle compares it: the shape of the tree (names, kinds, links,
        xattrs, targets) as one digest, and each file's id and size beside it, because a
        crash may legitimately recover a file shorter than it was (see NamespaceHistory)."""
        digest = canonical_digest(
            (p, n.kind, 0, n.xattrs, n.target, nid)
            for p, nid in self.paths.items() for n in [self.nodes[nid]])
        files = {p: (nid, self.nodes[nid].size) for p, nid in self.paths.items()
                 if self.nodes[nid].kind == "f"}
        return NsState(digest, files)


@dataclass
class NsState:
    digest: str
    files: dict[str, tuple[int, int]]  # path -> (node id, size)


def canonical_digest(entries: Iterable[tuple[str, str, int, dict[str, bytes], str, int]]
                     ) -> str:
    """A digest of a namespace that ignores inode numbers but keeps which names share an
    inode. Only the workload's own xattrs (user.t.*) count."""
    groups: dict[int, list[tuple[str, str, int, dict[str, bytes], str]]] = {}
    for path, kind, size, xattrs, target, ident in entries:
        mine = {k: v for k, v in xattrs.items() if k.startswith("user.t.")}
        groups.setdefault(ident, []).append((path, kind, size if kind == "f" else 0, mine,
                                             target))
    items = []
    for members in groups.values():
        paths = tuple(sorted(m[0] for m in members))
        _, kind, size, xattrs, target = members[0]
        items.append((paths, kind, size, tuple(sorted(xattrs.items())), target))
    return hashlib.sha1(repr(sorted(items)).encode()).hexdigest()


@dataclass
class NsOp:
    what: str
    t_start: int
    t_end: int = NEVER
    touched: frozenset[int] = frozenset()  # node ids (0: the root directory)
    fsync_of: int | None = None  # node id made durable (-1: everything)


class NamespaceHistory:
    """The states a namespace workload went through, and which of them a crash may leave.

    The tree's shape must be exactly one state between the last durable one and the last
    operation started. A file's size may be shorter than that state's: like ext4's
    i_disksize, the recorded size grows only as data reaches the device, so a write not
    made durable may be lost from the end of the file (never read back as zeros). It
    may not be shorter than the smallest size the file had since its last fsync."""

    def __init__(self, ops: list[NsOp], states: list[NsState]) -> None:
        self.ops = ops  # op i leads from state i to state i + 1
        self.states = states  # states[i]: the state after i operations
        self.by_digest: dict[str, list[int]] = {}
        for i, st in enumerate(states):
            self.by_digest.setdefault(st.digest, []).append(i)
        self._required = self._durable_requirements()
        self._sizes = [{nid: size for nid, size in st.files.values()} for st in states]

    def _durable_requirements(self) -> list[tuple[int, int, int]]:
        """(ack time, minimum state index, node id or -1) for each fsync: the state must
        include every earlier operation that touched what the fsync made durable."""
        out = []
        last_touch: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            if op.fsync_of is not None and op.t_end != NEVER:
                if op.fsync_of == -1:
                    need = i
                else:
                    need = last_touch.get(op.fsync_of, 0)
                out.append((op.t_end, need, op.fsync_of))
            for nid in op.touched:
                last_touch[nid] = i + 1
        return out

    def _size_problem(self, view: FsView, k: int, t_crash: int) -> tuple[str, bool] | None:
        """Why the files' sizes cannot be those of state k after a crash at t_crash (and
        whether that loses durable data), or None when they can."""
        for path, (nid, size) in self.states[k].files.items():
            got = view[path].size
            if got > size:
                return f"{path} has {got} bytes, more than the {size} of state {k}", False
            if got == size:
                continue
            durable = max((need for t, need, of in self._required
                           if t < t_crash and of in (nid, -1)), default=0)
            floor = min((self._sizes[s].get(nid, size) for s in range(durable, k + 1)),
                        default=0) if durable else 0
            if got < floor:
                return (f"{path} has {got} bytes, fewer than the {floor} made durable by "
                        f"fsync"), True
        return None

    def summary(self) -> str:
        return f"{len(self.ops)} namespace operations, {len(self._required)} fsyncs"

    def check(self, view: FsView, t_crash: int) -> Verdict:
        v = Verdict()
        digest = view_digest(view)
        started = sum(1 for op in self.ops if op.t_start < t_crash)
        need = max([n for t, n, _ in self._required if t < t_crash], default=0)
        matches = self.by_digest.get(digest, [])
        problems = [self._size_problem(view, k, t_crash) for k in matches
                    if need <= k <= started]
        if problems and None in problems:
            return v
        if problems:
            note, lost = problems[-1]  # type: ignore[misc]
            if lost:
                v.lost_writes = 1
            else:
                v.namespace_errors = 1
            v.note(f"namespace: {note}")
            return v
        if any(k < need for k in matches):
            v.lost_writes = 1
            v.note(f"namespace is the state after {max(matches)} operations, but "
                   f"{need} were durable")
        else:
            v.namespace_errors = 1
            where = (f"matches only states {matches}" if matches else
                     "matches no state the workload went through")
            v.note(f"namespace {where} (allowed {need}..{started} of {len(self.ops)})")
        return v


def view_digest(view: FsView) -> str:
    return canonical_digest((fv.path, fv.kind, 0, fv.xattrs, fv.target or "", fv.ino)
                            for fv in view.values())


@dataclass
class _Step:
    """What one namespace operation needs: where, the model, the choices it draws from."""

    root: str
    model: NamespaceModel
    rng: random.Random
    ops: list[NsOp]
    files: list[str]
    dirs: list[str]


@dataclass
class NamespaceWorkload:
    name: str = "namespace"
    ops: int = 300

    def run(self, root: str, seed: int, stop: threading.Event) -> NamespaceHistory:
        rng = random.Random(f"{seed}:namespace")
        model = NamespaceModel()
        ops: list[NsOp] = []
        states = [model.canonical()]
        for _ in range(self.ops):
            if stop.is_set():
                break
            before = len(ops)
            try:
                self._one_op(root, model, rng, ops)
            except OSError as exc:
                if not stopped_by_crash(exc, stop):
                    raise WorkloadError(f"namespace op {ops[-1].what if ops else '?'}: "
                                        f"{exc}") from exc
                if len(ops) > before:  # the interrupted operation may have happened
                    states.append(model.canonical())
                break
            states.append(model.canonical())
        return NamespaceHistory(ops, states)

    def _one_op(self, root: str, model: NamespaceModel, rng: random.Random,
                ops: list[NsOp]) -> bool:
        """Pick a valid operation, do it, apply it to the model; False if none fits."""
        files, dirs = model.files(), model.dirs()
        choices = ["create", "mkdir", "symlink"]
        if files:
            choices += ["write", "write", "truncate", "link", "rename", "unlink", "setxattr",
                        "removexattr", "fsync", "fsync"]
        if len(dirs) > 1:
            choices += ["rmdir", "rename_dir", "fsyncdir"]
        what = rng.choice(choices)
        step: Callable[[_Step], bool] = getattr(self, f"_op_{what}")
        return step(_Step(root, model, rng, ops, files, dirs))

    @staticmethod
    def _abs(root: str, rel: str) -> str:
        return os.path.join(root, rel) if rel else root

    @staticmethod
    def _new_name(model: NamespaceModel, rng: random.Random, d: str, prefix: str) -> str:
        while True:
            name = f"{prefix}{rng.randrange(1000)}"
            path = f"{d}/{name}" if d else name
            if path not in model.paths:
                return path

    @staticmethod
    def _parent_id(model: NamespaceModel, path: str) -> int:
        parent = path.rpartition("/")[0]
        return model.paths[parent] if parent else 0

    def _do(self, ops: list[NsOp], what: str, touched: Iterable[int],
            change: Callable[[], object], call: Callable[[], object],
            fsync_of: int | None = None) -> bool:
        """Record the operation, apply it to the model, then issue it: if a crash cuts
        the call short, the model already holds the state it may have produced."""
        op = NsOp(what, now(), touched=frozenset(touched), fsync_of=fsync_of)
        ops.append(op)
        change()
        call()
        op.t_end = now()
        return True

    def _op_create(self, c: _Step) -> bool:
        path = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "f")
        parent = self._parent_id(c.model, path)
        return self._do(c.ops, f"create {path}", [parent, c.model.peek_id()],
                        lambda: c.model.add(path, _Node("f")),
                        lambda: os.close(os.open(self._abs(c.root, path),
                                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY,
                                                 0o644)))

    def _op_mkdir(self, c: _Step) -> bool:
        path = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "d")
        parent = self._parent_id(c.model, path)
        return self._do(c.ops, f"mkdir {path}", [parent, c.model.peek_id()],
                        lambda: c.model.add(path, _Node("d")),
                        lambda: os.mkdir(self._abs(c.root, path)))

    def _op_symlink(self, c: _Step) -> bool:
        path = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "l")
        target = f"target{c.rng.randrange(100)}"
        parent = self._parent_id(c.model, path)
        return self._do(c.ops, f"symlink {path}", [parent, c.model.peek_id()],
                        lambda: c.model.add(path, _Node("l", target=target)),
                        lambda: os.symlink(target, self._abs(c.root, path)))

    def _op_write(self, c: _Step) -> bool:
        path = c.rng.choice(c.files)
        nid = c.model.paths[path]
        node = c.model.nodes[nid]
        off = c.rng.choice((node.size, c.rng.randrange(node.size + 1), 0))
        data = c.rng.randbytes(c.rng.choice((100, 4096, 20000, 70000)))
        fd = os.open(self._abs(c.root, path), os.O_WRONLY)
        try:
            def grow() -> None:
                node.size = max(node.size, off + len(data))
            return self._do(c.ops, f"write {path} {off}+{len(data)}", [nid], grow,
                            lambda: os.pwrite(fd, data, off))
        finally:
            os.close(fd)

    def _op_truncate(self, c: _Step) -> bool:
        path = c.rng.choice(c.files)
        nid = c.model.paths[path]
        node = c.model.nodes[nid]
        size = c.rng.choice((0, c.rng.randrange(100000), node.size // 2))

        def resize() -> None:
            node.size = size
        return self._do(c.ops, f"truncate {path} {size}", [nid], resize,
                        lambda: os.truncate(self._abs(c.root, path), size))

    def _op_link(self, c: _Step) -> bool:
        src = c.rng.choice(c.files)
        dst = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "h")
        nid = c.model.paths[src]

        def add_name() -> None:
            c.model.paths[dst] = nid
        return self._do(c.ops, f"link {src} {dst}", [nid, self._parent_id(c.model, dst)],
                        add_name, lambda: os.link(self._abs(c.root, src), self._abs(c.root, dst)))

    def _op_rename(self, c: _Step) -> bool:
        src = c.rng.choice(c.files)
        if c.rng.random() < 0.4 and len(c.files) > 1:
            dst = c.rng.choice([f for f in c.files if f != src])
        else:
            dst = self._new_name(c.model, c.rng, c.rng.choice(c.dirs), "r")
        touched = {c.model.paths[src], self._parent_id(c.model, src), self._parent_id(c.model, dst)}
        if dst in c.model.paths:
            touched.add(c.model.paths[dst])

        def move() -> None:
            if c.model.paths.get(dst) != c.model.paths[src]:  # links of one inode: no-op
                c.model.rename(src, dst)
        return self._do(c.ops, f"rename {src} {dst}", touched, move,
                        lambda: os.rename(self._abs(c.root, src), self._abs(c.root, dst)))

    def _op_rename_dir(self, c: _Step) -> bool:
        src = c.rng.choice(c.dirs[1:])
        parents = [d for d in c.dirs if d != src and not d.startswith(src + "/")]
        dst = self._new_name(c.model, c.rng, c.rng.choice(parents), "m")
        touched = {c.model.paths[src], self._parent_id(c.model, src), self._parent_id(c.model, dst)}
        return self._do(c.ops, f"rename {src} {dst}", touched, lambda: c.model.rename(src, dst),
                        lambda: os.rename(self._abs(c.root, src), self._abs(c.root, dst)))

    def _op_unlink(self, c: _Step) -> bool:
        path = c.rng.choice(c.files + [p for p, n in c.model.paths.items()
                                   if c.model.nodes[n].kind == "l"])
        touched = [c.model.paths[path], self._parent_id(c.model, path)]
        return self._do(c.ops, f"unlink {path}", touched, lambda: c.model.remove_path(path),
                        lambda: os.unlink(self._abs(c.root, path)))

    def _op_rmdir(self, c: _Step) -> bool:
        empty = [d for d in c.dirs[1:] if not c.model.children(d)]
        if not empty:
            return self._op_mkdir(c)
        path = c.rng.choice(empty)
        touched = [c.model.paths[path], self._parent_id(c.model, path)]
        return self._do(c.ops, f"rmdir {path}", touched, lambda: c.model.remove_path(path),
                        lambda: os.rmdir(self._abs(c.root, path)))

    def _op_setxattr(self, c: _Step) -> bool:
        path = c.rng.choice(c.files + c.dirs[1:])
        nid = c.model.paths[path]
        name = f"user.t.{c.rng.randrange(4)}"
        value = c.rng.randbytes(c.rng.randrange(1, 60))

        def put() -> None:
            c.model.nodes[nid].xattrs[name] = value
        return self._do(c.ops, f"setxattr {path} {name}", [nid], put,
                        lambda: os.setxattr(self._abs(c.root, path), name, value))

    def _op_removexattr(self, c: _Step) -> bool:
        have = [(p, k) for p in c.files + c.dirs[1:]
                for k in c.model.nodes[c.model.paths[p]].xattrs]
        if not have:
            return self._op_setxattr(c)
        path, name = c.rng.choice(have)
        nid = c.model.paths[path]
        return self._do(c.ops, f"removexattr {path} {name}", [nid],
                        lambda: c.model.nodes[nid].xattrs.pop(name),
                        lambda: os.removexattr(self._abs(c.root, path), name))

    def _op_fsync(self, c: _Step) -> bool:
        path = c.rng.choice(c.files)
        fd = os.open(self._abs(c.root, path), os.O_RDONLY)
        try:
            return self._do(c.ops, f"fsync {path}", [], lambda: None, lambda: os.fsync(fd),
                            fsync_of=c.model.paths[path])
        finally:
            os.close(fd)

    def _op_fsyncdir(self, c: _Step) -> bool:
        path = c.rng.choice(c.dirs)
        fd = os.open(self._abs(c.root, path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._do(c.ops, f"fsyncdir {path or '/'}", [], lambda: None,
                            lambda: os.fsync(fd), fsync_of=c.model.paths[path] if path else 0)
        finally:
            os.close(fd)
