"""Every handler found passes the conformance suite on the simulated kernel.

The default cases are every handler ``load_handlers(None)`` finds (``ram``; ``file`` on
a regular file in a temporary folder, on tmpfs and read-only).  One more case is added
here the way a third party adds theirs: a RAM disk that cannot unmap, so the "UNMAP
refused without LBPME" and emulated WRITE SAME paths run on a writable device too.
"""

from __future__ import annotations

from tcmu_py.testing import ConformanceCase, ConformanceSuite, default_cases
from tcmu_py_handlers.ram import RamHandler


class RamWithoutUnmap(RamHandler):
    """The ram handler on a store that cannot deallocate (``can_unmap`` False)."""

    def can_unmap(self) -> bool:
        return False

    def can_write_same(self) -> bool:
        return False


class TestConformance(ConformanceSuite):
    cases = [*default_cases(), ConformanceCase("ram-no-unmap", RamWithoutUnmap, "ram/")]
