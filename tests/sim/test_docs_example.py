"""The third-party handler of docs/examples/zero_handler.py, installed as a distribution
with an entry point, is found by ``load_handlers`` and served on the simulated kernel.

This is the documented path for a plugin author, end to end: entry point → registry →
attach → SCSI → handler.  The example is read-only, so it also passes the read-only
half of the conformance suite.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.handler import Handler
from tcmu_py.registry import load_handlers
from tcmu_py.scsi._model import SenseKey
from tcmu_py.sim import SimTarget
from tcmu_py.testing import ConformanceCase, ConformanceSuite, cdb
from tcmu_py.testing.plugin import MakeSimTarget

pytest_plugins = ["tcmu_py.testing.plugin"]

DOCS_EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "zero_handler.py"
SIZE = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def installed_zero(tmp_path_factory: pytest.TempPathFactory) -> Iterator[type[Handler]]:
    """The example installed as distribution ``zero-handler`` with the entry point
    ``zero = "zero_handler:ZeroHandler"`` (a .dist-info next to its module on sys.path),
    and the class ``load_handlers`` then returns for ``zero``."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "zero_handler-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zero-handler\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text('[tcmu_py.handlers]\nzero = zero_handler:ZeroHandler\n')
    shutil.copy(DOCS_EXAMPLE, site / "zero_handler.py")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        handlers = load_handlers(None)
        assert "zero" in handlers, f"the entry point was not found: {sorted(handlers)}"
        yield handlers["zero"]
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("zero_handler", None)
        importlib.invalidate_caches()


@pytest.fixture
def zero(installed_zero: type[Handler], make_sim_target: MakeSimTarget) -> SimTarget:
    return make_sim_target(installed_zero, "zero/", size=SIZE)


def test_the_entry_point_provides_the_example_class(installed_zero: type[Handler]) -> None:
    assert installed_zero.__module__ == "zero_handler"
    assert installed_zero.__name__ == "ZeroHandler" and installed_zero.readonly


def test_inquiry_and_read_capacity_describe_the_zero_device(zero: SimTarget) -> None:
    res = zero.submit(cdb.inquiry(96), data_in_len=96)
    cdb.expect_good(res, "INQUIRY")
    assert res.data[8:16] == b"LIO-ORG "
    res = zero.submit(cdb.read_capacity16(), data_in_len=32)
    cdb.expect_good(res, "READ CAPACITY (16)")
    assert cdb.Capacity.parse(res.data).num_lbas * 512 == SIZE


def test_every_read_returns_zeroes(zero: SimTarget) -> None:
    for lba in range(0, zero.num_lbas, 128):
        assert zero.read(lba, 128) == bytes(128 * 512)
    assert zero.read(zero.num_lbas - 1, 1) == bytes(512)


def test_writes_answer_data_protect(zero: SimTarget) -> None:
    res = zero.submit(cdb.write16(0, 1), b"\x01" * 512)
    cdb.expect_sense(res, SenseKey.DATA_PROTECT, 0x27, what="WRITE (16) to the zero device")
    res = zero.submit(cdb.write10(8, 2), b"\x01" * 1024)
    cdb.expect_sense(res, SenseKey.DATA_PROTECT, 0x27, what="WRITE (10) to the zero device")


def test_a_config_string_the_example_refuses_stops_the_attach(
    installed_zero: type[Handler], make_sim_target: MakeSimTarget
) -> None:
    with pytest.raises(Exception, match="the zero handler takes no options"):
        make_sim_target(installed_zero, "zero/size=1", size=SIZE)


def _found_zero(request: pytest.FixtureRequest) -> type[Handler]:
    """The class the registry found, after ``installed_zero`` installed the entry point."""
    cls: type[Handler] = request.getfixturevalue("installed_zero")
    return cls


class TestZeroConformance(ConformanceSuite):
    """The suite on the handler found through its entry point: the read-only half runs."""

    cases = [ConformanceCase("zero", _found_zero, "zero/", size=SIZE, readonly=True)]
