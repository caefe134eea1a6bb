"""Ceph inside the qemu guest: the service tier's cluster, with settings for TCG.

The same ``scripts/ceph.sh`` and ``CephCluster`` as ``tests/services/ceph_fixture.py``
(loaded from there, not copied): memstore, one OSD, cephx, 127.0.0.1, pool ``rbd``.  In the
guest it differs only in bounds and in leaving out the mgr (nothing here needs it, and
under TCG its Python modules cost CPU the runner and the OSD want): measured under TCG on
a loaded host, a start takes about a minute.  The cluster is stopped by the PIDs
``ceph.sh`` recorded; its lifetime watchdog stops it even if the caller dies.

Used by ``tests/kernel/test_rbd.py`` and ``bench/guest_rbd.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
#: a start measured 65 s under TCG with the host's load average at 9
START_TIMEOUT = 300.0
POOL = "rbd"


def fixture_module() -> ModuleType:
    """``tests/services/ceph_fixture.py`` (a rootdir module of the service tier, not a package)."""
    mod = sys.modules.get("ceph_fixture")
    if mod is None:
        path = REPO / "tests" / "services" / "ceph_fixture.py"
        spec = importlib.util.spec_from_file_location("ceph_fixture", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["ceph_fixture"] = mod
        spec.loader.exec_module(mod)
    return mod


def unavailable() -> str | None:
    """Why no cluster can start here, or None."""
    why: str | None = fixture_module().ceph_unavailable()
    return why


def start(directory: Path, lifetime: int, images: str = "", osd_size: str = "1G") -> Any:
    """A running cluster (a ``CephCluster``) in ``directory``; ``images`` as ``"a:64M b:64M"``.

    RuntimeError (with ceph.sh's log tail) if it does not start within ``START_TIMEOUT``.
    """
    return fixture_module().start_cluster(
        directory, timeout=START_TIMEOUT, lifetime=lifetime,
        CEPH_MGR="0", CEPH_OSD_SIZE=osd_size, CEPH_IMAGES=images,
        CEPH_TIMEOUT=str(int(START_TIMEOUT) - 30))


def stop(cluster: Any) -> None:
    """Close the admin connection and stop the daemons by PID (the data is thrown away)."""
    cluster.close()
    fixture_module().stop_cluster(cluster.dir, stop_timeout=3)
