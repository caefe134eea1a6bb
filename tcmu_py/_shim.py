"""The one module that imports the compiled cffi shim; errno results become OSError.

Keeping every ``lib.*`` call behind this module means the rest of the package never
sees a negative errno or a raw pointer (style.md §6).
"""

from __future__ import annotations

import os
from typing import Any

from tcmu_py._tcmu_native import ffi, lib

__all__ = [
    "BAD_REASONS",
    "DESC_SIZE",
    "IOV_SIZE",
    "KIND_CMD",
    "KIND_MALFORMED",
    "KIND_TMR",
    "KIND_UNKNOWN",
    "ack",
    "ffi",
    "lib",
    "map_region",
    "ring_init",
    "wait",
    "wakeup",
]

KIND_CMD: int = lib.TCMU_PY_KIND_CMD
KIND_TMR: int = lib.TCMU_PY_KIND_TMR
KIND_MALFORMED: int = lib.TCMU_PY_KIND_MALFORMED
KIND_UNKNOWN: int = lib.TCMU_PY_KIND_UNKNOWN
DESC_SIZE: int = ffi.sizeof("struct tcmu_py_desc")
IOV_SIZE: int = ffi.sizeof("struct tcmu_py_iov")

BAD_REASONS = {
    lib.TCMU_PY_BAD_LEN: "entry length is 0, not a multiple of 8, or runs past the ring end",
    lib.TCMU_PY_BAD_IOV_CNT: "iovec count does not fit in the entry",
    lib.TCMU_PY_BAD_CDB_OFF: "cdb_off points outside the entry",
    lib.TCMU_PY_BAD_CDB_LEN: "CDB runs past the entry or is longer than 32 bytes",
    lib.TCMU_PY_BAD_IOV: "an iovec lies outside the data area",
    lib.TCMU_PY_BAD_TMR: "TMR id list does not fit in the entry",
}


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def map_region(fd: int, size: int) -> Any:
    """mmap ``size`` bytes of ``fd`` shared and writable.

    The returned pointer unmaps itself when the last reference goes away.  Memoryviews
    made with ``ffi.buffer(ptr, size)`` keep ``ptr`` alive, so a view can never outlive
    the mapping it points into (no use-after-munmap from Python).
    """
    out = ffi.new("void **")
    _check(lib.tcmu_py_map(fd, size, out), f"mmap of {size} bytes")
    return ffi.gc(ffi.cast("uint8_t *", out[0]), lambda p: lib.tcmu_py_unmap(p, size), size)


def ring_init(ring: Any, ptr: Any, size: int, fd: int) -> None:
    rc = lib.tcmu_py_ring_init(ring, ptr, size, fd)
    if rc == -71:  # EPROTO
        raise OSError(-rc, "mailbox version is not 2 (unsupported target_core_user)")
    _check(rc, "ring mailbox check")


def wakeup(fd: int) -> None:
    _check(lib.tcmu_py_wakeup(fd), "ring wakeup write")


def ack(fd: int) -> int:
    return _check(lib.tcmu_py_ack(fd), "ring event read")


def wait(fd: int, timeout_ms: int) -> bool:
    return _check(lib.tcmu_py_wait(fd, timeout_ms), "ring poll") == 1
