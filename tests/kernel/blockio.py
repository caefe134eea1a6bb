"""O_DIRECT block I/O on a served disk, for the kernel tests: bypass the page cache so
every byte read or written really crosses the ring."""

from __future__ import annotations

import mmap
import os


def read_direct(disk: str, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
    fd = os.open(disk, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


def write_direct(disk: str, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` with O_DIRECT and fsync it."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(disk, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
