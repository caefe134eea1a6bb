"""The ``ram`` handler: a disk held in a sparse anonymous mapping (tcmu-py's own; the C
runner has none -- the kernel's rd_mcp is its RAM disk).

Config string: ``ram/`` with optional ``;hugepages=1`` (transparent huge pages).  Pages
are only allocated when written; UNMAP gives them back with MADV_DONTNEED, so unmapped
blocks read as zeroes (LBPRZ).  Data moves by memoryview slice assignment between the
ring and the mapping: one memcpy, no intermediate objects.  Runs inline in the loop
thread -- a memcpy is cheaper than any thread hop.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tcmu_py.handler import ConfigError, DeviceInfo, Handler
from tcmu_py.scsi._model import SenseError, SenseKey

_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class RamConfig:
    hugepages: bool = False


class RamHandler(Handler):
    subtype = "ram"
    cfg_desc = "ram/[;hugepages=1] -- a RAM disk of the device's size (contents lost on close)"
    thread_model = "inline"
    lbprz = True

    @classmethod
    def parse_config(cls, cfgstring: str) -> RamConfig:
        hugepages = False
        for tok in filter(None, cfgstring.split(";")[1:]):
            key, sep, val = tok.partition("=")
            if key == "hugepages" and sep and val in ("0", "1"):
                hugepages = val == "1"
            else:
                raise ConfigError(tok, f"unknown or malformed option {tok!r} (known: hugepages=0|1)")
        head = cfgstring.split(";", 1)[0]
        if head.strip("/"):
            raise ConfigError(head, f"ram takes no path, got {head!r}")
        return RamConfig(hugepages)

    def open(self, dev: DeviceInfo, reopen: bool) -> None:
        super().open(dev, reopen)
        cfg = dev.config if isinstance(dev.config, RamConfig) else self.parse_config(dev.cfgstring)
        self._hugepages = cfg.hugepages
        self._map(dev.size)

    def _map(self, size: int) -> None:
        self._mm = mmap.mmap(-1, max(size, _PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # a forked child (a helper process) must not turn the disk copy-on-write
        self._mm.madvise(mmap.MADV_DONTFORK)
        if self._hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            self._mm.madvise(mmap.MADV_HUGEPAGE)
        self._mem = memoryview(self._mm)
        self._size = size

    def close(self) -> None:
        self._mem.release()
        self._mm.close()

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        mem = self._mem
        if len(bufs) == 1:
            bufs[0][:length] = mem[offset : offset + length]
            return
        for b in bufs:
            n = min(len(b), length)
            b[:n] = mem[offset : offset + n]
            offset += n
            length -= n

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> None:
        mem = self._mem
        if len(bufs) == 1:
            mem[offset : offset + length] = bufs[0][:length]
            return
        for b in bufs:
            n = min(len(b), length)
            mem[offset : offset + n] = b[:n]
            offset += n
            length -= n

    def native_memory(self) -> memoryview:
        """The mapping itself: the engine serves plain READ/WRITE from it in C (one memcpy
        per command, no Python call).  It is remapped only by reconfig("size"), and the
        engine takes it back before that and before close."""
        return self._mem

    def flush(self) -> None:
        """Nothing is cached between the ring and the mapping."""

    def unmap(self, offset: int, length: int) -> None:
        # whole pages go back to the kernel; partial pages at the edges are zeroed
        start = -(-offset // _PAGE) * _PAGE
        end = (offset + length) // _PAGE * _PAGE
        if start < end:
            self._mem[offset:start] = bytes(start - offset)
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            self._mem[end : offset + length] = bytes(offset + length - end)
        else:
            self._mem[offset : offset + length] = bytes(length)

    def write_same(self, offset: int, length: int, pattern: bytes, unmap: bool) -> None:
        if not any(pattern):
            self.unmap(offset, length)
            return
        chunk = pattern * max(1, (1 << 20) // len(pattern))
        mem = self._mem
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            mem[offset : offset + n] = chunk[:n]
            offset += n

    def compare_and_write(self, offset: int, compare: bytes, write: bytes) -> None:
        # The view is released before raising: the traceback would otherwise keep it,
        # and an exported view makes close() fail with BufferError.
        with self._mem[offset : offset + len(compare)] as cur:
            first = -1 if cur == compare else next(
                i for i in range(len(compare)) if cur[i] != compare[i]
            )
        if first >= 0:
            raise SenseError(SenseKey.MISCOMPARE, 0x1D, 0x00, info=first)
        self._mem[offset : offset + len(write)] = write

    def reconfig(self, what: str, value: Any) -> None:
        if what == "write_cache":
            return  # nothing sits between the ring and the mapping: any setting is true
        if what != "size":
            raise ValueError(f"ram cannot change {what}")
        old_mm, old_mem, old = self._mm, self._mem, self._size
        self._map(int(value))
        n = min(old, self._size)
        self._mem[:n] = old_mem[:n]
        old_mem.release()
        old_mm.close()
