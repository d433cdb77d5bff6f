"""The crash-state generator and the oracles, on recordings and views made by hand: each
test builds a case the instrument must get right, including the ones it must flag."""
from __future__ import annotations

import time
from pathlib import Path

from atomicfs.crashtest.recording import Recording
from atomicfs.crashtest.states import TORN, WHOLE, StateBuilder, choose_states, sparse_copy, \
    torn_chunks
from atomicfs.crashtest.workloads.base import NEVER, SECTOR, FileView, decode_sector, \
    encode_sectors
from atomicfs.crashtest.workloads.data import DataHistory, DataWrite, SyncRequest
from atomicfs.crashtest.workloads.namespace import NamespaceHistory, NamespaceModel, NsOp, \
    _Node, view_digest
from atomicfs.device import Recorder

UNIT = 16 << 10
SPU = UNIT // SECTOR


class Script:
    """Writes a recording as the native recorder does: submit, completion (with data),
    flush start and end."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "wb")
        self.f.write(Recorder.MAGIC)
        self.seq = 0

    def _event(self, kind: bytes, offset: int = 0, length: int = 0, flags: int = 0,
               ref: int = 0, data: bytes = b"") -> int:
        self.seq += 1
        self.f.write(Recorder.pack(kind, self.seq, offset, length, flags, time.monotonic_ns(),
                                   ref) + data)
        return self.seq

    def write(self, offset: int, data: bytes, atomic: bool = False) -> None:
        self.complete(self.submit_only(offset, data, atomic))

    def submit_only(self, offset: int, data: bytes,
                    atomic: bool = False) -> tuple[int, bytes, int, int]:
        flags = Recorder.KIND_FLAGS["data"] | (Recorder.FLAG_ATOMIC if atomic else 0)
        token = self._event(Recorder.WRITE_SUBMIT, offset, len(data), flags)
        return token, data, offset, flags

    def complete(self, pending: tuple[int, bytes, int, int]) -> None:
        token, data, offset, flags = pending
        self._event(Recorder.WRITE, offset, len(data), flags, token, data)

    def flush(self) -> None:
        self._event(Recorder.FLUSH_END, ref=self._event(Recorder.FLUSH_START))

    def close(self) -> None:
        self.f.close()


def test_durable_prefix_and_in_flight_window(tmp_path: Path) -> None:
    s = Script(tmp_path / "r.rec")
    s.write(0, b"a" * 4096)                  # write 0 (event 1)
    s.flush()                                # S 2, F 3
    s.write(4096, b"b" * 4096)               # write 1 (event 5)
    late = s.submit_only(8192, b"c" * 4096)  # write 2 submitted (event 6)
    s.flush()                                # S 7, F 8
    s.complete(late)                         # write 2 completes after that flush (event 9)
    s.close()
    with Recording(str(tmp_path / "r.rec")) as rec:
        assert [w.offset for w in rec.writes] == [0, 4096, 8192]
        assert rec.durable_writes(3) == []           # the first flush has not ended yet
        assert rec.durable_writes(4) == [0]
        assert rec.in_flight_writes(4) == []
        assert rec.in_flight_writes(7) == [1, 2]     # write 2 is submitted, not complete
        assert rec.durable_writes(9) == [0, 1]       # write 2 completed after that flush
        assert rec.in_flight_writes(9) == [2]


def test_states_are_deterministic_and_atomic_writes_never_torn(tmp_path: Path) -> None:
    s = Script(tmp_path / "r.rec")
    for i in range(40):
        s.write(i * UNIT, bytes([i]) * UNIT, atomic=i % 2 == 0)
        if i % 10 == 9:
            s.flush()
    s.close()
    with Recording(str(tmp_path / "r.rec")) as rec:
        a = choose_states(rec, 300, seed=7, tear=512)
        b = choose_states(rec, 300, seed=7, tear=512)
        c = choose_states(rec, 300, seed=8, tear=512)
        assert [x.describe() for x in a] == [x.describe() for x in b]
        assert [x.describe() for x in a] != [x.describe() for x in c]
        torn = [ap for st in a for ap in st.applied if ap.mode == TORN]
        assert torn, "the generator must tear non-atomic writes"
        assert all(not rec.writes[ap.write].atomic for ap in torn)
        assert any(rec.writes[ap.write].atomic and ap.mode == WHOLE
                   for st in a for ap in st.applied)


def test_torn_chunks_cover_part_of_the_write() -> None:
    import random
    rng = random.Random(1)
    for _ in range(200):
        chunks = torn_chunks(UNIT, 512, rng)
        assert chunks
        total = sum(n for _, n in chunks)
        assert 0 < total < UNIT or len(chunks) > 1
        assert all(off % 512 == 0 and 0 < n and off + n <= UNIT for off, n in chunks)


def test_state_images_hold_prefix_plus_choices(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(1 << 20)
    s = Script(tmp_path / "r.rec")
    s.write(0, b"A" * 4096)
    s.flush()
    s.write(0, b"B" * 4096)
    s.write(4096, b"C" * 8192)
    s.close()
    with Recording(str(tmp_path / "r.rec")) as rec, \
            StateBuilder(rec, str(base), str(tmp_path)) as builder:
        for st in choose_states(rec, 50, seed=3, tear=512):
            img = builder.build(st, str(tmp_path / "s.img"))
            data = open(img, "rb").read(12288)
            chosen = {a.write: a for a in st.applied}
            if st.crash_point < 4:
                continue
            _expect(data[:4096], chosen.get(1), b"B", b"A")
            _expect(data[4096:], chosen.get(2), b"C", b"\0")
        final = builder.build_final(str(tmp_path / "final.img"))
        assert open(final, "rb").read(12288) == b"B" * 4096 + b"C" * 8192


def _expect(got: bytes, applied: object, new: bytes, old: bytes) -> None:
    """Each 512-byte sector holds the write's data if it was applied there, else old."""
    kept: set[int] = set()
    if applied is not None:
        if applied.mode == WHOLE:  # type: ignore[attr-defined]
            kept = set(range(len(got) // 512))
        else:
            kept = {o // 512 for off, n in applied.chunks  # type: ignore[attr-defined]
                    for o in range(off, off + n, 512)}
    for k in range(len(got) // 512):
        assert got[k * 512:(k + 1) * 512] == (new if k in kept else old) * 512


def test_sparse_copy_keeps_holes_and_data(tmp_path: Path) -> None:
    src = tmp_path / "a.img"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(5 << 20)
        f.write(b"x" * 10000)
    sparse_copy(str(src), str(tmp_path / "b.img"))
    assert open(tmp_path / "b.img", "rb").read() == open(src, "rb").read()
    assert (tmp_path / "b.img").stat().st_blocks * 512 < 1 << 20


# ----------------------------------------------------------------------------- oracles

def _unit(file_id: int, u: int, version: int) -> bytes:
    return encode_sectors(file_id, u * SPU, SPU, version)


def _history(writes: list[DataWrite], syncs: list[SyncRequest] | None = None) -> DataHistory:
    return DataHistory({1: "f"}, UNIT, writes, syncs or [])


def _view(data: bytes) -> dict[str, FileView]:
    return {"f": FileView("f", "f", 2, len(data), {}, data)}


def test_sector_codec_detects_mixing() -> None:
    a = encode_sectors(1, 0, 2, 5)
    b = encode_sectors(1, 0, 2, 6)
    assert [decode_sector(1, k, a[k * SECTOR:(k + 1) * SECTOR]) for k in range(2)] == [5, 5]
    mixed = a[:100] + b[100:SECTOR]
    assert decode_sector(1, 0, mixed) == -1
    assert decode_sector(1, 1, a[:SECTOR]) == -1  # right data, wrong place
    assert decode_sector(1, 0, bytes(SECTOR)) == 0


def test_unit_oracle_flags_torn_and_accepts_whole_versions() -> None:
    writes = [DataWrite(1, 1, 0, SPU, 10, 20), DataWrite(2, 1, 0, SPU, 30, 40)]
    h = _history(writes)
    assert h.check(_view(_unit(1, 0, 1)), 100).ok
    assert h.check(_view(_unit(1, 0, 2)), 100).ok
    assert h.check(_view(b""), 100).ok  # nothing durable: an empty file is possible
    torn = _unit(1, 0, 1)[:8 * SECTOR] + _unit(1, 0, 2)[8 * SECTOR:]
    v = h.check(_view(torn), 100)
    assert v.torn_units == 1 and not v.ok
    half = _unit(1, 0, 2)[:8 * SECTOR] + bytes(UNIT - 8 * SECTOR)
    assert h.check(_view(half), 100).torn_units == 1
    # version 2 started only at t=30: in a crash at t=25 it cannot be there
    assert h.check(_view(_unit(1, 0, 2)), 25).torn_units == 1


def test_unit_oracle_flags_lost_durable_writes() -> None:
    writes = [DataWrite(1, 1, 0, SPU, 10, 20), DataWrite(2, 1, 0, SPU, 30, 40)]
    h = _history(writes, [SyncRequest(1, 25, 28)])  # fsync after write 1 returned
    assert h.check(_view(b""), 27).ok             # the fsync had not returned yet
    assert h.check(_view(b""), 29).lost_writes == 1
    assert h.check(_view(_unit(1, 0, 1)), 29).ok
    assert h.check(_view(_unit(1, 0, 2)), 50).ok  # newer than the durable one is fine
    dsync = _history([DataWrite(1, 1, 0, SPU, 10, 20, dsync=True)])
    assert dsync.check(_view(b""), 21).lost_writes == 1
    assert dsync.check(_view(b""), 19).ok
    killed = _history([DataWrite(1, 1, 0, SPU, 10, NEVER, dsync=True)])
    assert killed.check(_view(b""), NEVER - 1).ok  # never answered: never promised


def test_mixed_oracle_allows_tears_only_after_partial_writes() -> None:
    whole = DataWrite(1, 1, 0, SPU, 10, 20)
    partial = DataWrite(2, 1, 4, 8, 30, 40)  # sectors 4..11: clears the atomic tag
    h = _history([whole, partial])
    mix = bytearray(_unit(1, 0, 1))
    mix[4 * SECTOR: 12 * SECTOR] = encode_sectors(1, 4, 8, 2)
    assert h.check(_view(bytes(mix)), 100).ok
    # the non-atomic writeback of that mix may be torn against the older zeros
    torn = bytes(mix[: 8 * SECTOR]) + bytes(UNIT - 8 * SECTOR)
    assert h.check(_view(torn), 100).ok
    # but before the partial write started, the unit was atomic: the same tear is torn
    assert h.check(_view(_unit(1, 0, 1)[: 8 * SECTOR] + bytes(UNIT - 8 * SECTOR)),
                   25).torn_units == 1


def test_namespace_oracle_accepts_prefixes_only() -> None:
    model = NamespaceModel()
    digests = [model.canonical()]
    a = model.add("a", _Node("f", size=3))
    digests.append(model.canonical())
    model.rename("a", "b")
    digests.append(model.canonical())
    ops = [NsOp("create a", 10, 20, frozenset({0, a})), NsOp("rename a b", 30, 40,
           frozenset({0, a})), NsOp("fsync b", 50, 60, fsync_of=a)]
    digests.append(model.canonical())
    h = NamespaceHistory(ops, digests)

    def view(*names: str) -> dict[str, FileView]:
        return {n: FileView(n, "f", 5, 3, {}) for n in names}
    assert h.check(view(), 15).ok
    assert h.check(view("a"), 35).ok
    assert h.check(view("b"), 35).ok
    assert h.check(view(), 70).lost_writes == 1     # the fsync made "b" durable
    assert h.check(view("b"), 25).namespace_errors == 1  # rename had not started
    assert h.check(view("a", "b"), 70).namespace_errors == 1  # never a state
    assert view_digest(view("b")) == digests[2].digest


def test_namespace_oracle_allows_files_short_of_unsynced_writes_only() -> None:
    model = NamespaceModel()
    states = [model.canonical()]
    a = model.add("a", _Node("f"))
    states.append(model.canonical())
    model.nodes[a].size = 1000
    states.append(model.canonical())
    model.nodes[a].size = 5000
    states.append(model.canonical())
    ops = [NsOp("create a", 10, 20, frozenset({0, a})),
           NsOp("write a 0+1000", 30, 40, frozenset({a})),
           NsOp("fsync a", 50, 60, fsync_of=a),
           NsOp("write a 1000+4000", 70, 80, frozenset({a}))]
    states.insert(3, states[2])  # the fsync changes nothing
    h = NamespaceHistory(ops, states)

    def view(size: int) -> dict[str, FileView]:
        return {"a": FileView("a", "f", 5, size, {})}
    assert h.check(view(0), 45).ok  # the write was not durable yet
    assert h.check(view(4096), 90).ok  # the tail of an unsynced write is lost
    assert h.check(view(5000), 90).ok
    assert h.check(view(500), 90).lost_writes == 1  # shorter than the fsync left it
    assert h.check(view(6000), 90).namespace_errors == 1  # never that long
