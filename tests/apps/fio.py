"""fio (Debian's) with the job files in tests/apps/fio: every job writes with
verify=crc32c and reads everything back; a second pass with --verify_only after a
remount checks what reached the device."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.apps.harness import CheckFailed, run, tail

JOB_DIR = Path(__file__).parent / "fio"


def job_files() -> list[Path]:
    return sorted(JOB_DIR.glob("*.fio"))


@dataclass
class FioResult:
    name: str
    jobs: int
    written: int  # bytes
    verified: int  # bytes read back and checked
    write_kib_s: float
    seconds: float


def size_bytes(size: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].isalpha() else int(size)


def run_fio(jobfile: Path, directory: Path, size: str, aux: Path, verify_only: bool = False,
            timeout: float = 3600) -> FioResult:
    """Run one job file; CheckFailed unless every job ran without error and verified all
    of its data (each job owns size bytes). aux: where fio leaves its verify state files
    (outside the filesystem under test)."""
    directory.mkdir(parents=True, exist_ok=True)
    args = ["fio", f"--directory={directory}", f"--aux-path={aux}", "--output-format=json",
            str(jobfile)]
    if verify_only:
        args.insert(1, "--verify_only")
    res = run(args, env={"FIO_SIZE": size}, check=False, timeout=timeout, cwd=str(aux))
    start = res.stdout.find("{")
    try:
        data = json.loads(res.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        data = None
    what = f"fio {'--verify_only ' if verify_only else ''}{jobfile.name}"
    if data is None:
        raise CheckFailed(f"{what} exited {res.returncode} without a report:\n"
                          f"{tail(res.stdout + res.stderr)}")
    jobs = data["jobs"]
    bad = [f"{j['jobname']}: error {j['error']}" for j in jobs if j["error"]]
    if res.returncode != 0 or bad:
        raise CheckFailed(f"{what} exited {res.returncode}; {'; '.join(bad)}:\n"
                          f"{tail(res.stderr)}")
    want = size_bytes(size)
    short = [j["jobname"] for j in jobs if j["read"]["io_bytes"] != want]
    if short:
        raise CheckFailed(f"{what}: jobs {short} verified less than {size}")
    written = sum(j["write"]["io_bytes"] for j in jobs)
    if not verify_only and written != want * len(jobs):
        raise CheckFailed(f"{what}: wrote {written} bytes, expected {want * len(jobs)}")
    return FioResult(jobfile.stem, len(jobs), written,
                     sum(j["read"]["io_bytes"] for j in jobs),
                     sum(j["write"]["bw"] for j in jobs),
                     max(j["elapsed"] for j in jobs))
