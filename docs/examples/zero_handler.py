"""A read-only disk of zeroes: a complete tcmu-py handler (docs/handlers.md)."""

from collections.abc import Sequence

from tcmu_py.handler import ConfigError, Handler


class ZeroHandler(Handler):
    subtype = "zero"  # targetcli: /backstores/user:zero create name=z0 size=1G cfgstring=
    cfg_desc = "zero/ (no options): every block reads as zeroes, writes are refused"
    readonly = True  # the runner answers writes with DATA PROTECT; no write() needed

    @classmethod
    def parse_config(cls, cfgstring: str) -> None:
        if cfgstring:
            raise ConfigError(cfgstring, "the zero handler takes no options")

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        for buf in bufs:  # the views are the ring's memory: fill them in place
            buf[:] = bytes(len(buf))
