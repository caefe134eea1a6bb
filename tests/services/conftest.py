"""The service tier's D-Bus fixture: a private ``dbus-daemon`` per test, with our policy.

It is a real dbus-daemon, not a mock.  Its config is the system bus's default-deny
policy (Debian's ``system.conf``: nobody owns names or sends method calls unless a
policy file says so) plus ``systemd/tcmu-py-runner.conf`` *included as it is in the
checkout*, so the tests judge the very file that gets installed.  It listens on a unix
socket in a world-traversable temporary directory, so a throwaway unprivileged user can
connect too.  D-Bus activation reads only the two service directories of a private root
(``PrivateBus.root``), in the system bus's order; they start out empty.  Bounded in time:
the address must appear within 10 s, the daemon dies with the pytest process
(PR_SET_PDEATHSIG) and is killed at teardown.

Without ``dbus-daemon`` the D-Bus tests fail under ``CI=true`` and are skipped otherwise,
saying why.  (The Ceph fixture of this tier lives in ``ceph_fixture.py``.)
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbus_client import PrivateBus, unavailable

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "systemd" / "tcmu-py-runner.conf"
START_TIMEOUT_S = 10.0

# The <policy context="default"> of Debian's /usr/share/dbus-1/system.conf (dbus 1.14).
_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <servicedir>{root}/usr/local/share/dbus-1/system-services</servicedir>
  <servicedir>{root}/usr/share/dbus-1/system-services</servicedir>
  <include>{policy}</include>
</busconfig>
"""


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.fixture
def dbus_bus() -> Iterator[PrivateBus]:
    """A private dbus-daemon with the system bus's default policy plus ours."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        unavailable("D-Bus tests", "dbus-daemon is not installed (Debian package dbus-daemon)")
    tmp = Path(tempfile.mkdtemp(prefix="tcmu-py-dbus-"))
    tmp.chmod(0o755)  # an unprivileged test user must reach the socket
    sock = tmp / "system_bus_socket"
    conf = tmp / "bus.conf"
    root = tmp / "root"  # activation looks here only, in the system bus's order (empty)
    for d in ("usr/local/share", "usr/share"):
        (root / d / "dbus-1" / "system-services").mkdir(parents=True)
    conf.write_text(_BUS_CONFIG.format(socket=sock, policy=POLICY, root=root))
    with open(tmp / "stderr.log", "w") as err:
        proc = subprocess.Popen(
            [daemon, "--config-file", str(conf), "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=err, preexec_fn=_die_with_parent,
        )
    try:
        address = _read_address(proc, tmp / "stderr.log")
        yield PrivateBus(address, sock, proc.pid, root)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def _read_address(proc: subprocess.Popen[bytes], stderr: Path) -> str:
    """The first line dbus-daemon prints (--print-address), within START_TIMEOUT_S."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + START_TIMEOUT_S
    out = b""
    while not out.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"dbus-daemon printed no address within {START_TIMEOUT_S} s")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                proc.wait(5)
                raise RuntimeError(f"dbus-daemon exited with {proc.returncode}: {stderr.read_text()}")
            out += chunk
    return out.decode().strip()
