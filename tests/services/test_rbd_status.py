"""The status an rbd device reports: its counters (async thread model: every command timed
when librbd calls back) and whether this runner holds the image's exclusive lock."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tcmu_py.sim import SimTarget
from tcmu_py.status import collect
from tcmu_py.testing import cdb
from tcmu_py_handlers.rbd import RbdHandler

try:  # a package if tests/services gets an __init__.py, a rootdir module otherwise
    from .ceph_fixture import POOL, CephCluster, ceph  # noqa: F401, RUF100
except ImportError:
    from ceph_fixture import (  # type: ignore[no-redef]
        POOL,
        CephCluster,
        ceph,  # noqa: F401
    )

pytestmark = pytest.mark.ceph

IMAGE_SIZE = 16 << 20
BS = 512


@pytest.fixture
def image(ceph: CephCluster) -> Iterator[str]:
    name = ceph.create_image(IMAGE_SIZE)
    yield name
    ceph.remove_image(name, wait=10)


def test_an_rbd_device_reports_exact_counts_and_its_lock(ceph: CephCluster, image: str) -> None:
    cfg = f"rbd/{POOL}/{image};conf={ceph.conf}"
    with SimTarget(RbdHandler, cfg, size=IMAGE_SIZE) as t:  # type: ignore[arg-type]
        data = os.urandom(8 * BS)
        for i in range(6):
            cdb.expect_good(t.submit(cdb.write16(i * 8, 8), data), "WRITE (16)")
        for i in range(4):
            res = t.submit(cdb.read16(i * 8, 8), None, 8 * BS)
            assert (res.status, res.data) == (0, data)
        cdb.expect_good(t.submit(cdb.synchronize_cache16()), "SYNCHRONIZE CACHE")
        reply = t._lt.run(collect(t.engine))
    [dev] = reply["devices"]
    assert dev["handler"] == "rbd" and not dev["native"]
    assert dev["commands"] == {"read": 4, "write": 6, "flush": 1, "unmap": 0, "other": 0}
    assert dev["bytes"]["write"] == 6 * 8 * BS
    assert sum(dev["latency_hist_log2_us"]) == 11
    assert dev["errors_total"] == 0 and dev["inflight"] == 0
    assert dev["lock_owner"] is True  # the first write took the exclusive lock
    assert dev["handler_status"]["lock_lost_cnt"] == "0"
