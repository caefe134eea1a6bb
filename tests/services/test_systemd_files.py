"""The systemd unit, D-Bus activation file, policy and logrotate file, as installed.

``scripts/install-service.sh`` installs them into a temporary root; systemd's own
``systemd-analyze verify`` judges the installed unit (its ExecStart rewritten to this
venv's ``tcmu-py-runner``, which must exist for verify to pass), logrotate parses its file,
and a real dbus-daemon shows which activation file wins when Debian's tcmu-runner's is
installed too -- and that ``--uninstall`` switches back.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from dbus_client import PrivateBus, call, connected, ok, run, unavailable
from dbus_next import MessageType

from tcmu_py.dbus_api import BUS_NAME

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install-service.sh"
SYSTEMD = ROOT / "systemd"
UNIT = "usr/local/lib/systemd/system/tcmu-py-runner.service"
ACTIVATION = "usr/local/share/dbus-1/system-services/org.kernel.TCMUService1.service"
DEBIAN_ACTIVATION = "usr/share/dbus-1/system-services/org.kernel.TCMUService1.service"
POLICY = "etc/dbus-1/system.d/tcmu-py-runner.conf"
LOGROTATE = "etc/logrotate.d/tcmu-py-runner"
VENV_BIN = Path(sys.executable).parent


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(INSTALL), "--root", str(root), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def unit_file(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


# ---- install -----------------------------------------------------------------------------------


def test_install_places_every_file_with_the_command_path_rewritten(tmp_path: Path) -> None:
    res = install(tmp_path, "--bindir", "/opt/tcmu-py/bin")
    assert res.returncode == 0, res.stderr
    for rel in (UNIT, ACTIVATION, POLICY, LOGROTATE):
        assert (tmp_path / rel).is_file(), rel
        assert oct((tmp_path / rel).stat().st_mode & 0o777) == "0o644"
    assert unit_file(tmp_path / UNIT)["Service"]["ExecStart"] == "/opt/tcmu-py/bin/tcmu-py-runner"
    activation = unit_file(tmp_path / ACTIVATION)["D-BUS Service"]
    assert activation["Exec"] == "/opt/tcmu-py/bin/tcmu-py-runner"
    assert (tmp_path / POLICY).read_text() == (SYSTEMD / "tcmu-py-runner.conf").read_text()
    assert "does not exist" in res.stdout  # /opt/tcmu-py/bin/tcmu-py-runner: a warning only
    again = install(tmp_path, "--bindir", "/opt/tcmu-py/bin")
    assert again.returncode == 0, again.stderr  # idempotent


def test_install_with_prefix_usr_puts_the_policy_under_usr_share(tmp_path: Path) -> None:
    res = install(tmp_path, "--prefix", "/usr")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "usr/lib/systemd/system/tcmu-py-runner.service").is_file()
    assert (tmp_path / "usr/share/dbus-1/system.d/tcmu-py-runner.conf").is_file()
    assert (tmp_path / DEBIAN_ACTIVATION).is_file()
    for bad in (["--prefix", "/opt"], ["--bindir", "relative/bin"], ["--bogus"]):
        assert install(tmp_path, *bad).returncode != 0, bad


DEBIAN_FILE = """[D-BUS Service]
Name=org.kernel.TCMUService1
Exec={bindir}/tcmu-runner
User=root
SystemdService=tcmu-runner.service
"""


def test_install_never_overwrites_tcmu_runners_activation_file_unless_forced(tmp_path: Path) -> None:
    debian = tmp_path / DEBIAN_ACTIVATION
    debian.parent.mkdir(parents=True)
    debian.write_text(DEBIAN_FILE.format(bindir="/usr/bin"))
    refused = install(tmp_path, "--prefix", "/usr")
    assert refused.returncode == 1
    assert "use the default --prefix /usr/local, whose file takes precedence" in refused.stderr
    assert debian.read_text() == DEBIAN_FILE.format(bindir="/usr/bin")
    assert install(tmp_path, "--prefix", "/usr", "--force").returncode == 0
    assert "tcmu-py-runner" in debian.read_text()


def test_uninstall_removes_only_our_files(tmp_path: Path) -> None:
    debian = tmp_path / DEBIAN_ACTIVATION
    debian.parent.mkdir(parents=True)
    debian.write_text(DEBIAN_FILE.format(bindir="/usr/bin"))
    res = install(tmp_path)
    assert res.returncode == 0 and "is shadowed by ours" in res.stdout, res.stdout + res.stderr
    foreign = tmp_path / LOGROTATE
    foreign.write_text("/var/log/other.log { rotate 1 }\n")  # someone else's file at our path
    res = install(tmp_path, "--uninstall")
    assert res.returncode == 0, res.stderr
    assert not any((tmp_path / rel).exists() for rel in (UNIT, ACTIVATION, POLICY))
    assert foreign.exists() and "left" in res.stdout
    assert debian.read_text() == DEBIAN_FILE.format(bindir="/usr/bin")


# ---- systemd, logrotate ------------------------------------------------------------------------


def test_systemd_analyze_verify_passes_on_the_installed_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        unavailable("systemd-analyze verify", "systemd-analyze is not installed (Debian package systemd)")
    if not os.access(VENV_BIN / "tcmu-py-runner", os.X_OK):
        unavailable("systemd-analyze verify", f"{VENV_BIN}/tcmu-py-runner is missing (run scripts/setup.sh)")
    assert install(tmp_path, "--bindir", str(VENV_BIN)).returncode == 0
    unit = tmp_path / UNIT

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                              timeout=120, cwd=path.parent, check=False)

    res = verify(unit)
    ours = [line for line in res.stderr.splitlines() if "tcmu-py-runner" in line]
    assert res.returncode == 0 and not ours, res.stderr
    # the control: verify does look at ExecStart (and so can fail this test)
    broken = tmp_path / "tcmu-py-runner.service"
    broken.write_text(unit.read_text().replace(str(VENV_BIN), str(tmp_path / "missing")))
    assert verify(broken).returncode != 0


def test_the_unit_keeps_tcmu_runners_settings_and_the_runners_needs() -> None:
    unit = unit_file(SYSTEMD / "tcmu-py-runner.service")
    service = unit["Service"]
    assert (service["Type"], service["BusName"]) == ("dbus", BUS_NAME)
    assert (service["KillMode"], service["LimitNOFILE"]) == ("process", "1000000")
    assert "Restart" not in service  # tcmu-runner #158: no automatic restart
    assert "AF_NETLINK" in service["RestrictAddressFamilies"].split()
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()
    for breaks_the_runner in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectKernelTunables",
                              "ProtectKernelModules", "PrivateTmp", "ProtectClock"):
        assert breaks_the_runner not in service, breaks_the_runner
    assert service.get("ProtectSystem") in ("full", "yes")  # never strict: backing files anywhere
    assert "Conflicts" not in unit["Unit"]  # would load tcmu-runner.service: one BusName clash
    activation = unit_file(SYSTEMD / "org.kernel.TCMUService1.service")["D-BUS Service"]
    assert (activation["Name"], activation["SystemdService"], activation["User"]) == (
        BUS_NAME, "tcmu-py-runner.service", "root")
    checkout = str(SYSTEMD.resolve().parent.parent)  # the folder this checkout lives in
    for f in SYSTEMD.iterdir():  # nothing of a particular machine in what gets installed
        assert checkout + "/" not in f.read_text() and "/home/" not in f.read_text(), f


def test_the_policy_gives_everyone_read_only_calls_and_root_the_rest() -> None:
    tree = ET.parse(SYSTEMD / "tcmu-py-runner.conf")
    default = [e.attrib for p in tree.iter("policy") if p.get("context") == "default" for e in p]
    assert all(e.tag == "allow" for p in tree.iter("policy") for e in p)
    assert not [a for a in default if any(k.startswith("own") for k in a)]
    assert {a.get("send_destination") for a in default} == {BUS_NAME}
    assert {a.get("send_interface") for a in default} == {
        "org.kernel.TCMUService1", "org.freedesktop.DBus.ObjectManager",
        "org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Peer"}
    assert [a.get("send_member") for a in default if a["send_interface"] == "org.kernel.TCMUService1"] \
        == ["CheckConfig"]
    assert sorted(a.get("send_member") for a in default
                  if a["send_interface"] == "org.freedesktop.DBus.Properties") == ["Get", "GetAll"]
    root = [e.attrib for p in tree.iter("policy") if p.get("user") == "root" for e in p]
    assert {"own": BUS_NAME} in root and {"own_prefix": "org.kernel.TCMUService1.HandlerManager1"} in root


def test_logrotate_accepts_the_file(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate")
    if logrotate is None:
        unavailable("the logrotate check", "logrotate is not installed (Debian package logrotate)")
    conf = (SYSTEMD / "logrotate.conf").read_text()
    assert "/var/log/tcmu-py-runner*.log" in conf and "--kill-whom=main --signal=HUP" in conf

    def debug(text: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "conf").write_text(text)
        return subprocess.run([logrotate, "--debug", "--state", str(tmp_path / "state"),
                               str(tmp_path / "conf")], capture_output=True, text=True, timeout=60,
                              check=False)

    res = debug(conf)
    assert res.returncode == 0 and "error" not in res.stderr.lower(), res.stderr
    assert "tcmu-py-runner" in res.stderr  # it did read the rule (logrotate -d talks on stderr)
    assert debug(conf.replace("rotate 7", "rotate seven")).returncode != 0  # the control


# ---- activation: which file wins, on a real dbus-daemon -----------------------------------------


def test_our_activation_file_shadows_debians_and_uninstall_switches_back(
    dbus_bus: PrivateBus, tmp_path: Path
) -> None:
    """The bus reads ROOT/usr/local/share/... before ROOT/usr/share/..., as the system bus
    does.  Each "runner" is a script that only notes it was started."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("tcmu-runner", "tcmu-py-runner"):
        script = bindir / name
        # exit 1: the bus reports the failed start at once (after exit 0 it would wait 25 s)
        script.write_text(f"#!/bin/sh\necho started > {tmp_path}/started-{name}\nexit 1\n")
        script.chmod(0o755)
    debian = dbus_bus.root / DEBIAN_ACTIVATION
    debian.write_text(DEBIAN_FILE.format(bindir=bindir))

    async def start_service() -> str:
        async with connected(dbus_bus.address) as c:
            ok(await call(c, "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig",
                          destination="org.freedesktop.DBus"))
            reply = await call(c, "/org/freedesktop/DBus", "org.freedesktop.DBus",
                               "StartServiceByName", "su", [BUS_NAME, 0],
                               destination="org.freedesktop.DBus")
        # the scripts exit without owning the name: the bus reports that
        assert reply.message_type == MessageType.ERROR, reply.body
        started = sorted(p.name for p in tmp_path.glob("started-*"))
        for p in tmp_path.glob("started-*"):
            p.unlink()
        return ",".join(started)

    assert run(start_service()) == "started-tcmu-runner"  # only Debian's file: its runner
    assert install(dbus_bus.root, "--bindir", str(bindir)).returncode == 0
    assert run(start_service()) == "started-tcmu-py-runner"  # ours wins
    assert install(dbus_bus.root, "--uninstall").returncode == 0
    assert run(start_service()) == "started-tcmu-runner"  # switched back
