"""cffi build script for the native core: ``python native/build.py`` builds it in place.

Also referenced from setup.py (``cffi_modules``) so that wheels carry the compiled module.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _cdef() -> str:
    text = (HERE / "atomicfs_native.h").read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # cffi's cdef does not evaluate macros; give it the constant as a plain int.
    return re.sub(r"#define AFS_MAX_IOV (\d+)", r"#define AFS_MAX_IOV \1", text)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "atomicfs._native",
    '#include <stdint.h>\n#include "atomicfs_native.h"\n',
    sources=[str((HERE / "atomicfs_native.c").relative_to(ROOT))],
    include_dirs=[str(HERE.relative_to(ROOT))],
    libraries=["isal"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11",
                        "-pthread"],
    extra_link_args=["-pthread"],
)

PRELOAD = ROOT / "atomicfs" / "libatomicfs-preload.so"


def build_preload(out: Path = PRELOAD) -> Path:
    """The LD_PRELOAD library of `atomicfs run` (plain C, no Python): libatomicfs-preload.so
    in the package, next to the module that starts it."""
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fPIC",
                    "-shared", "-pthread", "-o", str(out), str(HERE / "preload.c"), "-ldl"],
                   check=True)
    return out


FUSECONN = ROOT / "atomicfs" / "libatomicfs-fuseconn.so"


def build_fuseconn(out: Path = FUSECONN) -> Path:
    """The wrapper of libfuse's fuse_session_new that sets the FUSE connection's
    capabilities pyfuse3 cannot (atomicfs/fuseconn.py loads it)."""
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-fPIC",
                    "-shared", "-o", str(out), str(HERE / "fuseconn.c"), "-ldl"], check=True)
    return out


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    build_preload()
    build_fuseconn()
    built = Path(ffibuilder.compile(verbose=False)).resolve()
    # An older build for another ABI tag (e.g. from `pip install -e`) would shadow nothing
    # but confuse; keep only the module just built.
    for stale in (ROOT / "atomicfs").glob("_native*.so"):
        if stale.resolve() != built:
            stale.unlink()
