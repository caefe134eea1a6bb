"""Fixtures for the simulated-kernel tier: a SimKernel and the production Ring over it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tcmu_py.ring import Ring
from tcmu_py.sim.kernel import SimKernel


class Pair:
    """A simulated kernel and the runner-side ring mapped from it (same process)."""

    def __init__(self, **kw: object) -> None:
        self.kernel = SimKernel(**kw)  # type: ignore[arg-type]
        self.ring = Ring(self.kernel.user_fd, self.kernel.map_size, map_fd=self.kernel.memfd)
        self.results: dict[int, object] = {}

    def submit(self, cdb: bytes, data_out: bytes | None = None, data_in_len: int = 0, tag: int = 0):
        return self.kernel.queue(cdb, data_out, data_in_len, lambda r, t=tag: self.results.__setitem__(t, r))

    def close(self) -> None:
        self.ring.close()
        self.kernel.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair(cmdr_size=4096, data_size=256 * 1024)
    yield p
    p.close()


@pytest.fixture
def make_pair() -> Iterator[object]:
    made: list[Pair] = []

    def _make(**kw: object) -> Pair:
        p = Pair(**kw)
        made.append(p)
        return p

    yield _make
    for p in made:
        p.close()
