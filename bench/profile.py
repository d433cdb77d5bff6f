"""`make profile`: where the atomicfs daemon's time goes, sampled with py-spy.

For the 16 KiB durable atomic write (O_DSYNC on a 16 KiB-unit file, one fio job and four),
the 16 KiB write + fsync (PostgreSQL's WAL flush cycle in shape), the cached 16 KiB random
write and the buffered 1 MiB sequential write, on atomicfs on the bench's loop device
(software path; --target atomicfs-hw for the hardware path, nullfs or nullfs-xattr for the
transport alone), fio runs for a while and `py-spy record` samples the daemon meanwhile. The
raw samples (collapsed stacks, for flamegraph.pl or speedscope) and a summary of the largest
costs go to bench/results/profile-DATE/ and, unless --no-latest, to bench/latest/profile/
(bench/latest/profile-nullfs/ etc. for the other targets).

    python -m bench.profile [--seconds 8] [--rate 250] [--target atomicfs-sw] [--no-native]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench.sysutil import (REPO, VENV_BIN, BenchError, Environment, kill_group, need_tools,
                           run)
from bench.targets import Target, make_target
from bench.workloads import (CACHED, DSYNC, FSYNC, SEQ_SIZE, Spec, Timing, fio_cmd, prepare,
                             cpu_seconds, prewrite)
from bench.run import BACKING_SIZE

log = logging.getLogger(__name__)

CASES: tuple[tuple[str, str, Spec], ...] = (
    ("durable", "16K durable atomic random write (O_DSYNC, 16 KiB unit, 1 job)", DSYNC[1]),
    ("durable4", "16K durable atomic random write (O_DSYNC, 16 KiB unit, 4 jobs)", DSYNC[4]),
    ("fsync", "16K random write + fsync (16 KiB unit, 1 job: the shape of PostgreSQL's WAL "
     "flush cycle, a FUSE write and a FUSE fsync)", FSYNC),
    ("cached", "16K random write, cached (16 KiB unit, 1 job)", CACHED),
    ("seqwrite", "1M sequential write, buffered (plain file, 1 job)",
     Spec("seq1m-write-loop", "fio", "buffered, overwrite", where="plain", stem="seq",
          args=("--rw=write", "--bs=1m", f"--size={SEQ_SIZE}"), prep=("seqfile",))),
)
_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="sampled seconds per workload")
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--target", default="atomicfs-sw",
                   choices=("atomicfs-sw", "atomicfs-hw", "nullfs", "nullfs-xattr"),
                   help="nullfs and nullfs-xattr give the transport's own profile")
    p.add_argument("--no-native", dest="native", action="store_false",
                   help="Python frames only (py-spy --nonblocking: the daemon is never paused)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / ".work")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--no-latest", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pyspy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    out = args.out / ("profile-" + datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    try:
        need_tools("fio", "losetup", "fusermount3")
        if not os.path.exists(pyspy):
            raise BenchError("py-spy is missing (make profile installs it)")
        with Environment(args.workdir, BACKING_SIZE) as env:
            target = make_target(env, args.target)
            try:
                target.setup()
                prewrite(target)
                for name, title, spec in CASES:
                    summaries.append(profile_case(target, name, title, spec, args, pyspy, out))
            finally:
                target.teardown()
    except BenchError as exc:
        log.error("profile failed: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; everything is unmounted and detached")
        return 130
    text = summary_markdown(summaries, args)
    (out / "profile.md").write_text(text)
    (out / "profile.json").write_text(json.dumps(summaries, indent=1))
    print(text)
    if not args.no_latest:
        latest = REPO / "bench" / "latest" / (
            "profile" if args.target == "atomicfs-sw" else f"profile-{args.target}")
        if latest.exists():
            shutil.rmtree(latest)
        shutil.copytree(out, latest)
        log.info("copied to %s", latest)
    log.info("profile in %s", out)
    return 0


def profile_case(target: Target, name: str, title: str, spec: Spec, args: argparse.Namespace,
                 pyspy: str, out: Path) -> dict[str, Any]:
    """Run fio for the sampled seconds plus margins, with py-spy on the daemon meanwhile."""
    ramp = 1.0
    timing = Timing(runtime=args.seconds + 1.0, ramp=ramp)
    prepare(target, spec)
    directory = target.atomic_dir if spec.where == "atomic" else target.plain_dir
    fio = subprocess.Popen(fio_cmd(directory, spec, timing), cwd=directory,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        time.sleep(ramp + 0.3)
        pid = target.daemon_pid()
        cpu0, main0, t0 = cpu_seconds(pid) or 0, cpu_seconds(pid, True) or 0, time.monotonic()
        raw = out / f"{name}.collapsed.txt"
        cmd = [pyspy, "record", "-p", str(pid), "-d", f"{int(args.seconds)}",
               "-r", str(args.rate), "-f", "raw", "-o", str(raw)]
        # --native needs the process paused for each sample; without it, do not pause
        cmd.append("--native" if args.native else "--nonblocking")
        run(cmd, timeout=args.seconds + 60, quiet=True)
        wall = time.monotonic() - t0
        cpu = ((cpu_seconds(pid) or 0) - cpu0) / wall
        cpu_main = ((cpu_seconds(pid, True) or 0) - main0) / wall
        stdout, _ = fio.communicate(timeout=args.seconds + 120)
    finally:
        if fio.poll() is None:
            kill_group(fio)
    job = json.loads(stdout[stdout.find("{"):])["jobs"][0]["write"]
    stacks = read_collapsed(raw)
    summary = summarize(stacks)
    per = 1e6 / job["iops"] if job["iops"] else 0.0
    summary.update({"case": name, "title": title, "iops": job["iops"], "daemon_cpu": cpu,
                    "cpu_us_per_write": cpu * per, "loop_cpu_us_per_write": cpu_main * per})
    log.info("%s: %.0f IOPS, daemon at %.0f%% of a core, %d samples", name, job["iops"],
             cpu * 100, summary["samples"])
    return summary


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one line per distinct stack, root first, then a count. Only the
    trio loop's thread is kept: Python threads started by `threading` (trio's worker threads,
    idle in a lock wait nearly always) would count as busy samples of the loop."""
    stacks = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            frames = [f for f in m.group(1).split(";") if not f.startswith("process ")
                      and not f.startswith("thread ")]
            if any(f.startswith("Thread._bootstrap") for f in frames):
                continue
            stacks.append((frames, int(m.group(2))))
    return stacks


def _name(frame: str) -> str:
    """'write (/x/atomicfs/fs.py:123)' -> 'atomicfs/fs.py:write'; native frames keep their
    library: 'writev (libc.so.6)'."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path, fn = m.group("file"), m.group("fn")
    if not path.endswith((".py", ".pyx", ".pxi")) and "<" not in path:
        return f"{fn} ({path})"
    if "/atomicfs/" in "/" + path:
        path = "atomicfs/" + ("/" + path).split("/atomicfs/", 1)[1]
    elif "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path}:{fn}"


ENTRY = ("<frozen runpy>", "atomicfs/__main__.py", "atomicfs/cli.py", "atomicfs/daemon.py",
         "trio/_core/_run.py:run", "trio/_core/_run.py:unrolled_run")


def category(names: list[str]) -> str:
    """Where a sample is, from the innermost frame outwards: idle in epoll, the FUSE
    transport (libfuse replies, /dev/fuse reads), atomicfs (by module), pyfuse3, trio."""
    leaf = names[-1] if names else ""
    if leaf.startswith("epoll_wait"):
        return "idle: trio waits in epoll_wait"
    for nm in reversed(names):
        if nm.startswith("fuse_reply_err"):  # also the empty replies (fsync, flush)
            return "FUSE reply to the kernel: fuse_reply_err (fsync, flush, errors)"
        if nm.startswith("fuse_reply_"):
            return f"FUSE reply to the kernel: {nm.split()[0]}"
        if nm.startswith("fuse_session_receive_buf") or nm.startswith("fuse_session_process"):
            return "FUSE request read from /dev/fuse"
        if nm.startswith("atomicfs/") and not nm.startswith(ENTRY):
            return f"atomicfs: {nm.split(':')[0]}"
        if nm.startswith("trio/") or nm.startswith("outcome/") or \
                nm.startswith("_pyfuse3.py") or ".pyx:" in nm or ".pxi:" in nm:
            if ".pyx:" in nm or ".pxi:" in nm or nm.startswith("_pyfuse3.py"):
                return "pyfuse3: request dispatch (Cython)"
            return "trio: scheduler"
    return "other (interpreter, libc)"


def summarize(stacks: list[tuple[list[str], int]], top: int = 15) -> dict[str, Any]:
    """Shares of all samples per category, and of busy samples (not idle in epoll) per
    atomicfs function (inclusive) and per innermost frame (self)."""
    total = sum(n for _, n in stacks) or 1
    cats: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    busy = 0
    for frames, n in stacks:
        names = [_name(f) for f in frames]
        cat = category(names)
        cats[cat] += n
        if cat.startswith("idle"):
            continue
        busy += n
        if names:
            own[names[-1]] += n
        for nm in set(names):
            if nm.startswith("atomicfs/") and not nm.startswith(ENTRY):
                incl[nm] += n
    busy = busy or 1
    return {"samples": total, "busy_samples": busy,
            "categories": [(k, v / total) for k, v in cats.most_common()],
            "inclusive": [(k, v / busy) for k, v in incl.most_common(top)],
            "self": [(k, v / busy) for k, v in own.most_common(top)]}


def summary_markdown(summaries: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"# atomicfs daemon profile: {datetime.date.today().isoformat()}", "",
             f"`python -m bench.profile` on {args.target}: `py-spy record` of the daemon at "
             f"{args.rate} Hz for {args.seconds:g} s per workload"
             f"{', native frames included' if args.native else ''}. Categories are shares "
             "of all samples of the daemon's Python thread (the trio loop); functions are "
             "shares of its busy samples (all but idle in epoll_wait). Device I/O runs on "
             "the native core's C threads, which py-spy does not sample.", ""]
    for s in summaries:
        lines += [f"## {s['title']}", "",
                  f"{s['iops']:,.0f} IOPS while sampled; daemon CPU (all threads) "
                  f"{s['daemon_cpu'] * 100:.0f}% of one core, {s['cpu_us_per_write']:,.0f} µs "
                  f"per write, of which the trio loop's thread "
                  f"{s.get('loop_cpu_us_per_write', 0):,.0f} µs; {s['samples']:,} samples, "
                  f"{s['busy_samples']:,} busy.", "",
                  "| where | share of samples |", "|---|---:|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in s["categories"][:12]]
        lines += ["", "| atomicfs function (inclusive) | share of busy |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.1%} |" for k, v in s["inclusive"][:12]]
        lines += ["", "| innermost frame (self) | share of busy |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.1%} |" for k, v in s["self"][:12]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
