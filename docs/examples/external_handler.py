"""A handler that runs in a process of its own and registers with tcmu-py-runner over D-Bus.

Run it as root next to the runner::

    python3 external_handler.py              # system bus, serves devices over netlink
    targetcli /backstores/user:extram create name=e0 size=64M cfgstring=';fill=255'

targetcli then lists ``user:extram`` next to the runner's own handlers, the runner
forwards ``CheckConfig`` here (so ``cfgstring=';fill=300'`` is refused with this
handler's reason) and leaves the devices' netlink events to this process.  Wait for the
"registered" log line before creating backstores.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from tcmu_py.external import main
from tcmu_py.handler import ConfigError, DeviceInfo, Handler, opt_int, parse_options


@dataclass(frozen=True)
class ExtRamConfig:
    fill: int = 0


class ExtRamHandler(Handler):
    """A RAM disk whose blocks start out as ``fill`` bytes."""

    subtype = "extram"
    cfg_desc = "extram/[;fill=N]: a RAM disk in its own process; every byte starts as N (0-255)"

    @classmethod
    def parse_config(cls, cfgstring: str) -> ExtRamConfig:
        # Pure: the runner forwards D-Bus CheckConfig here, from any user on the bus.
        head, opts = parse_options(cfgstring, {"fill": opt_int(0, 255)})
        if head:
            raise ConfigError(head, "extram takes no path, only ;fill=N")
        return ExtRamConfig(**opts)

    def open(self, dev: DeviceInfo, reopen: bool) -> None:
        self.mem = memoryview(bytearray([dev.config.fill]) * dev.size)

    def close(self) -> None:
        self.mem.release()

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        for buf in bufs:  # the ring's own memory: fill it in place
            n = min(len(buf), length)
            buf[:n] = self.mem[offset : offset + n]
            offset, length = offset + n, length - n

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> None:
        for buf in bufs:
            n = min(len(buf), length)
            self.mem[offset : offset + n] = buf[:n]
            offset, length = offset + n, length - n


if __name__ == "__main__":
    sys.exit(main(ExtRamHandler))
