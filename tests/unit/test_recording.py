"""Device recordings: the native recorder and atomicfs.crashtest.recording, the one reader,
agree on the format; a torn last record (what a crash leaves) ends the recording at the
last whole record, damage before it is an error."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from atomicfs.crashtest.recording import Recording, RecordingError, read_writes
from atomicfs.device import Device, DeviceOptions, Recorder
from atomicfs.native import Buffer


def _recorded(path: Path, records: list[bytes]) -> Path:
    path.write_bytes(Recorder.MAGIC + b"".join(records))
    return path


def _write(seq: int, offset: int, data: bytes) -> list[bytes]:
    """A write's submission (seq) and completion (seq + 1) with its data."""
    flags = Recorder.KIND_FLAGS["log"]
    return [Recorder.pack(Recorder.WRITE_SUBMIT, seq, offset, len(data), flags),
            Recorder.pack(Recorder.WRITE, seq + 1, offset, len(data), flags, ref=seq) + data]


def _flush(seq: int) -> list[bytes]:
    return [Recorder.pack(Recorder.FLUSH_START, seq),
            Recorder.pack(Recorder.FLUSH_END, seq + 1, ref=seq)]


def test_the_native_recorder_writes_what_the_reader_reads(tmp_path: Path) -> None:
    img, rec = tmp_path / "dev.img", tmp_path / "rec"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    dev = Device.open(str(img), options=DeviceOptions(record=str(rec)))
    try:
        buf = Buffer(8192)
        buf.write(0, b"x" * 8192)
        dev.writev_sync(4096, [(buf, 0, 8192)], "data")
        dev.flush_sync()
        dev.writev_sync(65536, [(buf, 0, 4096)], "log", dsync=True)
    finally:
        dev.close()
    with Recording(str(rec)) as r:
        assert [e.type for e in r.events] == [
            Recorder.WRITE_SUBMIT, Recorder.WRITE, Recorder.FLUSH_START, Recorder.FLUSH_END,
            Recorder.WRITE_SUBMIT, Recorder.WRITE]
        assert [e.seq for e in r.events] == [1, 2, 3, 4, 5, 6]
        assert r.flush_pairs == [(2, 3)] and r.torn_tail == 0
        w0, w1 = r.writes
        assert (w0.offset, w0.length, w0.kind, w0.submit, w0.dsync) == (4096, 8192, "data", 0,
                                                                          False)
        assert (w1.offset, w1.length, w1.kind, w1.dsync) == (65536, 4096, "log", True)
        assert bytes(r.data(w0)) == b"x" * 8192
        assert r.durable_writes(r.n_events) == [0]


@pytest.mark.parametrize("cut", [1, 20, 41, 41 + 100])
@pytest.mark.daemon_log(allow=[
    r"the last record \((record header|data of write \d+)\) is cut short; the recording ends"])
def test_a_torn_last_record_ends_the_recording(tmp_path: Path, cut: int,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Cut anywhere into the last write (its header or its data): the recording is the
    whole records before it, and says that it was torn."""
    whole = _write(1, 0, b"a" * 512) + _flush(3)
    last = _write(5, 4096, b"b" * 512)
    path = _recorded(tmp_path / "rec", whole + [last[0], last[1][:cut]])
    with caplog.at_level(logging.WARNING, "atomicfs.crashtest.recording"):
        with Recording(str(path)) as r:
            assert r.n_events == 5  # the last submission is whole: that write is in flight
            assert len(r.writes) == 1 and r.flush_pairs == [(2, 3)]
            assert r.torn_tail == cut
            assert r.in_flight_writes(r.n_events) == []
    assert "cut short" in caplog.text
    assert [w.offset for w, _ in read_writes(str(path))] == [0]


def test_a_whole_recording_is_not_torn(tmp_path: Path) -> None:
    path = _recorded(tmp_path / "rec", _write(1, 0, b"a" * 512))
    with Recording(str(path)) as r:
        assert r.torn_tail == 0 and len(r.writes) == 1


def test_a_torn_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    """A record cut short and then more records (a recorder that went on appending) is
    damage a crash cannot cause: the reader refuses it rather than read garbage."""
    first = _write(1, 0, b"a" * 512)
    path = _recorded(tmp_path / "rec", [first[0], first[1][:41 + 100]]
                     + _write(3, 4096, b"b" * 1024) + _flush(5))
    with pytest.raises(RecordingError):
        Recording(str(path))


def test_a_missing_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    records = _write(1, 0, b"a" * 512) + _flush(3)
    path = _recorded(tmp_path / "rec", records[:2] + records[3:])  # flush start lost
    with pytest.raises(RecordingError, match="follows"):
        Recording(str(path))


def test_a_recorder_opened_again_appends_a_new_sequence(tmp_path: Path) -> None:
    """Recorder.open appends: a second mount's records start again at seq 1."""
    path = _recorded(tmp_path / "rec", _write(1, 0, b"a" * 512) + _write(1, 512, b"b" * 512))
    with Recording(str(path)) as r:
        assert [(w.offset, w.submit) for w in r.writes] == [(0, 0), (512, 2)]


def test_not_a_recording(tmp_path: Path) -> None:
    path = tmp_path / "rec"
    path.write_bytes(os.urandom(100))
    with pytest.raises(RecordingError, match="not a recording"):
        Recording(str(path))
