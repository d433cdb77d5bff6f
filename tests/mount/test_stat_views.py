"""`atomicfs stat MOUNTPOINT --prometheus` (the text exposition format, read back by a
small strict parser) and `--watch SECONDS` (refreshes until Ctrl-C, exit 0)."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time

from atomicfs.statview import prometheus
from tests.conftest import ATOMICFS, Mount, cli
from tests.mount.test_badinput import refused

UNIT = 16384
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_exposition(text: str) -> dict[str, dict]:
    """Families by name: their help, type and samples [(labels, value)]. Fails on anything
    the format (version 0.0.4) does not allow: samples before their HELP and TYPE, a
    family split in two, a bad name, label or value; a histogram's samples other than
    NAME_bucket (with `le`), NAME_sum and NAME_count."""
    families: dict[str, dict] = {}
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"family {name} appears twice"
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and families[name]["type"] is None, line
            assert kind in ("counter", "gauge", "histogram", "untyped"), line
            families[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels_text, value = m.groups()
            if current and families[current]["type"] == "histogram":
                suffix = name[len(current):]
                assert name.startswith(current) and suffix in ("_bucket", "_sum", "_count"), \
                    f"{name} in histogram {current}"
                assert (suffix == "_bucket") == ('le="' in (labels_text or "")), line
                name = current
            assert name == current and families[name]["type"], f"{name} before HELP/TYPE"
            labels: dict[str, str] = {}
            pos = 0
            while labels_text and pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = re.sub(r"\\(.)", lambda x: {"n": "\n"}.get(
                    x.group(1), x.group(1)), lm.group(2))
                pos = lm.end()
            families[name]["samples"].append((labels, float(value)))
    return families


def _value(families: dict[str, dict], name: str, **labels: str) -> float:
    for lab, value in families[name]["samples"]:
        if all(lab.get(k) == v for k, v in labels.items()):
            return value
    raise KeyError(f"{name} {labels}")


def test_prometheus_exposition(mnt: Mount) -> None:
    db = mnt / "db"
    os.mkdir(db)
    os.setxattr(db, "user.atomicfs.atomic_unit", str(UNIT).encode())
    fd = os.open(os.path.join(db, "t"), os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"a" * 4 * UNIT, 0)
    os.fsync(fd)  # four atomic writebacks
    os.pwrite(fd, b"b" * 2 * UNIT, 8 * UNIT)  # two dirty atomic folios, left in the cache
    os.close(fd)
    res = cli("stat", mnt.path, "--prometheus")
    fam = parse_exposition(res.stdout)
    data = mnt.stat()
    mp = os.path.realpath(mnt.path)
    for name, f in fam.items():
        assert name.startswith("atomicfs_") and f["help"] and f["samples"], name
        assert f["type"] != "counter" or name.endswith("_total"), name
        assert all(lab["mountpoint"] == mp for lab, _ in f["samples"]), name
    assert _value(fam, "atomicfs_info", atomic_path="software", device=mnt.target) == 1
    assert _value(fam, "atomicfs_atomic_writebacks_software_total") == \
        data["counters"]["atomic_writebacks_software"] >= 4
    assert fam["atomicfs_atomic_writebacks_software_total"]["type"] == "counter"
    assert _value(fam, "atomicfs_folios", state="dirty") == 2
    assert _value(fam, "atomicfs_folios", state="atomic") == 2
    assert _value(fam, "atomicfs_folios", state="cached") >= 6
    assert _value(fam, "atomicfs_cache_dirty_bytes") == 2 * UNIT
    assert fam["atomicfs_cache_dirty_bytes"]["type"] == "gauge"
    assert _value(fam, "atomicfs_cache_limit_bytes") == data["cache"]["limit"]


def test_prometheus_escapes_label_values() -> None:
    data = {"pid": 7, "device": {"path": 'a"b\\c\nd', "atomic_path": "software"},
            "counters": {"stable_waits": 3}, "cache": {"bytes": 1}}
    fam = parse_exposition(prometheus('/mnt/x "y"', data))
    labels, value = fam["atomicfs_info"]["samples"][0]
    assert labels == {"mountpoint": '/mnt/x "y"', "device": 'a"b\\c\nd',
                      "atomic_path": "software", "pid": "7"} and value == 1
    assert _value(fam, "atomicfs_stable_waits_total") == 3


def _read_until(proc: subprocess.Popen[str], marker: str, count: int,
                timeout: float = 60) -> str:
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + timeout
    while out.count(marker) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {out.count(marker)} refreshes in {timeout} s:\n{out}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            line = proc.stdout.readline()
            assert line, f"stat --watch ended early:\n{out}"
            out += line
    return out


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def test_watch_refreshes_until_ctrl_c(mnt: Mount) -> None:
    proc = subprocess.Popen(ATOMICFS + ["stat", mnt.path, "--watch", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = _read_until(proc, "\n\n", 1)  # a frame ends with an empty line
        with open(mnt / "f", "wb") as f:
            f.write(b"x" * 3 * 4096)  # one dirty 64 KiB folio, seen by the next refreshes
        out = first + _read_until(proc, "\n\n", 3)
    finally:
        code, err = _stop(proc)
    assert code == 0 and "Traceback" not in err, err
    assert first.count("Ctrl-C ends") == 1 and "folios: 0 cached, 0 dirty" in first
    assert out.count("Ctrl-C ends") == 4 and "1 dirty" in out and "dirty 12K" in out
    assert "rate over the last" in out and "writeback_ios" in out


def test_watch_json_lines(mnt: Mount) -> None:
    proc = subprocess.Popen(ATOMICFS + ["stat", mnt.path, "--watch", "0.1", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = _read_until(proc, "\n", 3)
    finally:
        code, err = _stop(proc)
    assert code == 0, err
    views = [json.loads(line) for line in out.splitlines()]
    assert all("counters" in v and "folio_states" in v and v["time"] for v in views)


def test_stat_modes_bad_input(mnt: Mount) -> None:
    with open(mnt / "f", "wb") as f:
        f.write(b"x")
    for seconds in ("0", "-1", "abc", "nan", "inf"):
        refused(cli("stat", mnt.path, "--watch", seconds, check=False), "seconds")
    refused(cli("stat", mnt / "f", "--prometheus", check=False), "mountpoint")
    refused(cli("stat", mnt.path, "--prometheus", "--watch", "1", check=False), "--watch")
    refused(cli("stat", mnt.path, "--prometheus", "--json", check=False), "not allowed")
    refused(cli("stat", "/", "--watch", "1", check=False, timeout=30), "not on an atomicfs")
