"""A test-only handler (``--handler-path tests/kernel/handlers``): a RAM disk whose reads and
writes wait while a control file exists, so the kernel tests can hold commands in flight.

Config string ``stall/<control file>``.  While the file exists, each read or write appends a
line to ``<control file>.stalled`` and waits (at most MAX_STALL_S) for the file to go away.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tcmu_py.handler import ConfigError, DeviceInfo, Handler
from tcmu_py_handlers.ram import RamHandler

MAX_STALL_S = 120.0


@dataclass(frozen=True)
class StallConfig:
    control: str


class StallHandler(RamHandler):
    subtype = "stall"
    cfg_desc = "stall/<file>: a RAM disk whose I/O waits while <file> exists (tests only)"
    thread_model = "threads"  # a stalled command must not stop the loop
    threads = 4

    @classmethod
    def parse_config(cls, cfgstring: str) -> StallConfig:
        path = cfgstring.split(";", 1)[0]
        if not path.startswith("/"):
            raise ConfigError(cfgstring, f"stall takes an absolute control file path, got {path!r}")
        return StallConfig(path)

    def open(self, dev: DeviceInfo, reopen: bool) -> None:
        Handler.open(self, dev, reopen)
        cfg = dev.config if isinstance(dev.config, StallConfig) else self.parse_config(dev.cfgstring)
        self._control = cfg.control
        self._hugepages = False
        self._map(dev.size)

    def _stall(self, what: str, offset: int) -> None:
        if not os.path.exists(self._control):
            return
        with open(self._control + ".stalled", "a") as f:
            f.write(f"{what} {offset}\n")
        deadline = time.monotonic() + MAX_STALL_S
        while os.path.exists(self._control) and time.monotonic() < deadline:
            time.sleep(0.05)

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        self._stall("read", offset)
        super().read(offset, length, bufs)

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> None:
        self._stall("write", offset)
        super().write(offset, length, bufs, fua)
