"""The Ceph fixture of the service tier: one throw-away cluster per test module.

``scripts/ceph.sh`` starts it (memstore, mon + mgr + one OSD, cephx, 127.0.0.1 only,
pool ``rbd``) and stops it by PID at the end of the module; a lifetime watchdog stops
it even if pytest dies first.  Without the Ceph packages, or if the cluster cannot
start, the module's tests fail under ``CI=true`` and are skipped (with the reason)
otherwise.

The conf's ``[client]`` section lowers ``osd_heartbeat_grace`` and
``osd_heartbeat_interval`` to 3 + 1 s, so that (by tcmu-runner's rule, which reads them
on the client) an ``osd_op_timeout`` of 5 s is honoured and the fault tests stay short.
``TCMU_CEPH_KEEP=1`` keeps the cluster's directory (its logs) after the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CEPH_SH = ROOT / "scripts" / "ceph.sh"
POOL = "rbd"
#: tcmu-runner forces osd_op_timeout above grace + interval; these make 5 s legal
HEARTBEAT_GRACE, HEARTBEAT_INTERVAL = 3, 1
START_TIMEOUT = 120


def ceph_unavailable() -> str | None:
    """Why no cluster can start here (packages, bindings), or None."""
    for binary in ("ceph-mon", "ceph-osd", "ceph-mgr", "rbd"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed (run scripts/setup.sh)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return "Debian's python3-rados/python3-rbd are not importable from this interpreter"
    from tcmu_py_handlers import _librbd

    if not _librbd.available():
        return "librbd.so.1/librados.so.2 cannot be loaded"
    return None


def _fail_or_skip(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Ceph service tier cannot run: {why}", pytrace=False)
    pytest.skip(f"no Ceph cluster: {why}")


class CephCluster:
    """A running cluster: its conf, fault injection, and admin-side helpers for tests."""

    def __init__(self, directory: Path, conf: str) -> None:
        self.dir = directory
        self.conf = conf
        self._admin: Any = None

    # -- the admin connection (python-rados: tests only, never the handler) -----------------
    @property
    def admin(self) -> Any:
        if self._admin is None:
            import rados

            cluster = rados.Rados(conffile=self.conf)
            for key in ("rados_osd_op_timeout", "rados_mon_op_timeout"):
                cluster.conf_set(key, "30")
            cluster.connect(timeout=30)
            self._admin = cluster
        return self._admin

    def mon(self, **cmd: Any) -> Any:
        """A mon command as admin; JSON-decoded output (the first document of it)."""
        cmd.setdefault("format", "json")
        ret, out, err = self.admin.mon_command(json.dumps(cmd), b"", timeout=30)
        if ret < 0:
            raise OSError(-ret, f"mon command {cmd['prefix']!r}: {err}")
        text = out.decode().strip()
        # `osd blocklist ls` prints two JSON arrays back to back (plain, then ranges)
        return json.JSONDecoder().raw_decode(text)[0] if text else None

    def blocklist(self) -> list[str]:
        return [e["addr"] for e in self.mon(prefix="osd blocklist ls") or []]

    # -- images ---------------------------------------------------------------------------------
    def create_image(self, size: int, name: str | None = None) -> str:
        import rbd

        name = name or f"img-{uuid.uuid4().hex[:12]}"
        with self.admin.open_ioctx(POOL) as io:
            rbd.RBD().create(io, name, size)
        return name

    def remove_image(self, name: str, wait: float = 0.0) -> bool:
        """Remove an image; a handler's watch may linger for a moment, so retry up to ``wait``."""
        import rbd

        deadline = time.monotonic() + wait
        with self.admin.open_ioctx(POOL) as io:
            while True:
                try:
                    rbd.RBD().remove(io, name)
                    return True
                except rbd.ImageNotFound:
                    return True
                except rbd.ImageBusy:
                    if time.monotonic() >= deadline:
                        return False
                    time.sleep(0.2)

    def image(self, name: str) -> Any:
        """An ``rbd.Image`` opened by the admin client (a second client of the image)."""
        import rbd

        io = self.admin.open_ioctx(POOL)
        return rbd.Image(io, name)

    def export(self, name: str) -> bytes:
        """The image's contents as ``rbd export`` (the CLI) sees them."""
        out = self.dir / f"export-{name}"
        self.cli("rbd", "export", f"{POOL}/{name}", str(out))
        try:
            return out.read_bytes()
        finally:
            out.unlink()

    def cli(self, *argv: str, timeout: float = 60) -> str:
        res = subprocess.run([argv[0], "-c", self.conf, *argv[1:]], capture_output=True,
                             text=True, timeout=timeout)
        if res.returncode:
            raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    # -- users and broken configurations --------------------------------------------------------
    def make_user(self, name: str) -> Path:
        """A client.NAME with rbd's standard caps; returns its keyring file."""
        self.mon(prefix="auth get-or-create", entity=f"client.{name}",
                 caps=["mon", "profile rbd", "osd", f"profile rbd pool={POOL}", "mgr", "profile rbd"])
        ret, out, err = self.admin.mon_command(
            json.dumps({"prefix": "auth get", "entity": f"client.{name}"}), b"", timeout=30)
        assert ret == 0, err
        path = self.dir / f"client.{name}.keyring"
        path.write_bytes(out)
        return path

    def variant_conf(self, name: str, **overrides: str) -> str:
        """A copy of the conf with keys replaced (``mon_host="..."``, ``keyring=...``): each
        is dropped from every section and set in ``[global]``."""
        keys = {k.replace("_", " "): v for k, v in overrides.items()}
        out = []
        for line in Path(self.conf).read_text().splitlines():
            if line.strip().split("=")[0].strip() in keys:
                continue
            out.append(line)
            if line.strip() == "[global]":
                out.extend(f"{k} = {v}" for k, v in keys.items())
        path = self.dir / f"{name}.conf"
        path.write_text("\n".join(out) + "\n")
        return str(path)

    # -- faults ---------------------------------------------------------------------------------
    def osd(self, action: str, osd_id: int = 0) -> None:
        """``scripts/ceph.sh osd ACTION``: pause, resume, kill, stop, start."""
        subprocess.run([str(CEPH_SH), "osd", action, str(self.dir), str(osd_id)], check=True,
                       timeout=90, stdout=subprocess.DEVNULL)

    @contextlib.contextmanager
    def paused_osd(self, osd_id: int = 0) -> Iterator[None]:
        self.osd("pause", osd_id)
        try:
            yield
        finally:
            self.osd("resume", osd_id)

    def wait_for_mgr(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.mon(prefix="mgr stat")["available"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no active mgr after {timeout:g} s")
            time.sleep(0.2)

    def service_map(self) -> dict[str, Any]:
        """``ceph service dump`` (a mgr command) as a dict."""
        ret, out, err = self.admin.mgr_command(
            json.dumps({"prefix": "service dump", "format": "json"}), b"", timeout=30)
        if ret < 0:
            raise OSError(-ret, f"service dump: {err}")
        return dict(json.loads(out))

    def service_status(self) -> dict[str, Any]:
        """``ceph service status`` (a mgr command): each daemon's last reported status."""
        ret, out, err = self.admin.mgr_command(
            json.dumps({"prefix": "service status", "format": "json"}), b"", timeout=30)
        if ret < 0:
            raise OSError(-ret, f"service status: {err}")
        return dict(json.loads(out))

    def close(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.shutdown()
            self._admin = None


def free_port() -> int:
    """A loopback port nobody listens on (for a conf whose monitor is unreachable)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env(lifetime: int = 900, **settings: str) -> dict[str, str]:
    """The environment ``scripts/ceph.sh start`` gets: this tier's settings, then ``settings``
    (``CEPH_MGR="0"``, ``CEPH_IMAGES="a:64M"`` ...)."""
    return {
        **os.environ,
        "CEPH_OSD_SIZE": "2G",
        "CEPH_LIFETIME": str(lifetime),  # a safety net if the caller dies before its teardown
        # clients only: the OSD's own grace also sets its PGs' read lease (0.8 x grace);
        # a lease shorter than an OSD pause leaves a lone OSD's PGs "laggy" after it
        "CEPH_CLIENT_CONF_EXTRA": f"osd heartbeat grace = {HEARTBEAT_GRACE}\n"
                                  f"osd heartbeat interval = {HEARTBEAT_INTERVAL}",
        **settings,
    }


def start_cluster(directory: Path, timeout: float = START_TIMEOUT, lifetime: int = 900,
                  **settings: str) -> CephCluster:
    """Start a cluster in ``directory`` (bounded by ``timeout``); RuntimeError says why not."""
    try:
        res = subprocess.run([str(CEPH_SH), "start", str(directory)], capture_output=True,
                             text=True, env=cluster_env(lifetime, **settings), timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_cluster(directory)
        raise RuntimeError(f"scripts/ceph.sh start did not finish within {timeout:g} s") from None
    if res.returncode != 0:
        raise RuntimeError(f"scripts/ceph.sh start failed:\n{res.stderr[-3000:]}")
    return CephCluster(directory, res.stdout.strip())


def stop_cluster(directory: Path, keep: bool = False, stop_timeout: int = 10) -> None:
    """Stop by the recorded PIDs (``stop_timeout``: seconds from SIGTERM to SIGKILL)."""
    subprocess.run([str(CEPH_SH), "stop", str(directory), *(["--keep"] if keep else [])],
                   timeout=60 + 4 * stop_timeout, check=False, stderr=subprocess.DEVNULL,
                   env={**os.environ, "STOP_TIMEOUT": str(stop_timeout)})


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A cluster for this test module, started by ``scripts/ceph.sh`` and stopped by PID."""
    why = ceph_unavailable()
    if why is not None:
        _fail_or_skip(why)
    directory = tmp_path_factory.mktemp("ceph") / "cluster"
    try:
        cluster = start_cluster(directory)
    except RuntimeError as e:
        _fail_or_skip(str(e))
    try:
        yield cluster
    finally:
        cluster.close()
        # TCMU_CEPH_KEEP=1 keeps the stopped cluster's directory (logs) for a post-mortem
        stop_cluster(directory, keep=os.environ.get("TCMU_CEPH_KEEP") == "1")
