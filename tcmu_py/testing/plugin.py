"""The pytest plugin of tcmu-py: fixtures for testing a handler on the simulated kernel.

Enable it in the ``conftest.py`` at the root of your tests::

    pytest_plugins = ["tcmu_py.testing.plugin"]

``make_sim_target`` serves any handler class on a fresh simulated kernel through the
production engine, and closes every target it made when the test ends, even a failing
one -- a leaked target keeps a loop thread and a memfd alive for the rest of the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from tcmu_py.handler import Handler
from tcmu_py.sim import SimTarget

from ._cases import DEFAULT_SIZE

__all__ = ["MakeSimTarget", "make_sim_target"]

#: ``make_sim_target(handler, dev_config, *, size=8 MiB, **SimTarget options)``
MakeSimTarget = Callable[..., SimTarget]


@pytest.fixture
def make_sim_target() -> Iterator[MakeSimTarget]:
    """A factory of :class:`~tcmu_py.sim.SimTarget`, each closed at teardown.

    ``make_sim_target(MyHandler, "my/config", size=1 << 20)`` serves ``MyHandler`` (or a
    ``{subtype: class}`` mapping) with the kernel's full ``dev_config`` string; other
    keywords (``block_size``, ``hw_max_sectors``, ``write_cache``, ...) go to SimTarget.
    """
    with contextlib.ExitStack() as stack:

        def make(
            handler: type[Handler] | Mapping[str, type[Handler]],
            dev_config: str,
            *,
            size: int = DEFAULT_SIZE,
            **options: Any,
        ) -> SimTarget:
            return stack.enter_context(SimTarget(handler, dev_config, size=size, **options))

        yield make
