"""cffi builder for the ring shim (out-of-line API mode).

Registered through ``cffi_modules`` in setup.py; produces ``tcmu_py._tcmu_native``.
The cdef is read from the same header the C file includes, minus preprocessor lines,
so the two can never drift apart.
"""

from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADER = (HERE / "tcmu_shim.h").read_text()


def _cdef(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    lines = []
    for line in text.splitlines():
        if line.startswith("#include") or line.startswith("#if") or line.startswith("#endif"):
            continue
        if line.startswith("#define"):
            # cffi accepts integer constant defines as "#define NAME ..."
            parts = line.split()
            if len(parts) >= 3:  # skip the include guard
                lines.append(f"#define {parts[1]} ...")
            continue
        lines.append(line)
    out = "\n".join(lines)
    # array sizes given by macros must be spelled out for cdef
    return out.replace("[TCMU_PY_CDB_MAX]", "[32]").replace("[TCMU_PY_HIST]", "[32]")


ffibuilder = FFI()
ffibuilder.cdef(_cdef(HEADER))
ffibuilder.set_source(
    "tcmu_py._tcmu_native",
    '#include "tcmu_shim.h"',
    # setuptools insists on paths relative to the project root (its working directory)
    sources=[os.path.relpath(HERE / "tcmu_shim.c")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
