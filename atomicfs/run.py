"""`atomicfs run -- CMD [ARGS]`: start a program with the preload library, which gives it
RWF_ATOMIC, RWF_WRITETHROUGH and statx atomic-write limits on atomicfs files (see
native/preload.c and README "Atomic writes from unmodified programs")."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

from atomicfs.errors import UserError


LIBRARY = "libatomicfs-preload.so"


def preload_library() -> Path:
    """The library: next to the `atomicfs` command (as installed), else in the package
    (as built in a source tree)."""
    here = Path(__file__).resolve().parent
    command = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else here
    for candidate in (command / LIBRARY, command.parent / "lib" / "atomicfs" / LIBRARY,
                      here / LIBRARY):
        if candidate.is_file():
            return candidate
    raise UserError(f"{LIBRARY} not found next to {command} or in {here} (run `make native`)")


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of env (default: this process's) whose LD_PRELOAD starts with the library."""
    out = dict(os.environ if env is None else env)
    lib = str(preload_library())
    old = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p != lib]
    out["LD_PRELOAD"] = " ".join([lib] + old)
    return out


def run(argv: Sequence[str]) -> NoReturn:
    """Replace this process with the command, under the library (exit 127 if the command
    does not exist, 126 if it cannot be executed, as a shell answers)."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise UserError("run: no command given (atomicfs run -- CMD [ARGS])", 2)
    env = preload_env()
    try:
        os.execvpe(args[0], args, env)
    except FileNotFoundError:
        raise UserError(f"run: {args[0]}: command not found", 127) from None
    except PermissionError:
        raise UserError(f"run: {args[0]}: permission denied", 126) from None
    except OSError as exc:
        raise UserError(f"run: {args[0]}: {exc.strerror}", 126) from None
