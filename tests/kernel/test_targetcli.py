"""targetcli against tcmu-py-runner on a system bus, in the guest: list, validate, create, I/O.

targetcli finds ``user:`` backstores only over D-Bus (reference/tcmu.md §2.11).  This
module starts what a host has: a system bus (``dbus-daemon --system``) with *our* policy
installed in ``/etc/dbus-1/system.d`` (and Debian's tcmu-runner.conf removed -- the guest's
root is a throw-away overlay), then ``tcmu-py-runner`` itself, and the documented external
handler process (``docs/examples/external_handler.py``, subtype ``extram``), which
registers over D-Bus and serves its own devices over netlink.  One targetcli process runs
every command (``tcli.py``: about ten seconds per targetcli start under TCG); the tests
then judge its answers, and push I/O through the LUNs it exported over tcm_loop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.registry import load_handlers

from . import tcli
from .blockio import read_direct, write_direct
from .conftest import NAME_PREFIX, OP_TIMEOUT, in_background, kernel_unavailable

pytestmark = [
    pytest.mark.guest,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = Path("/etc/dbus-1/system.d")
BUS_SOCKET = Path("/run/dbus/system_bus_socket")
START_TIMEOUT_S = 180.0  # the runner's imports under TCG take seconds, not milliseconds
WWN = "naa.5001405aabbccd00"
GOOD = NAME_PREFIX + "tcli-file"
BAD = NAME_PREFIX + "tcli-bad"
RAM = NAME_PREFIX + "tcli-ram"
EXT = NAME_PREFIX + "tcli-ext"
IMAGE = Path("/tmp") / f"{GOOD}.img"
EXAMPLE = REPO / "docs" / "examples" / "external_handler.py"
FILL = 171  # the extram example's ;fill=N: every byte of a new device


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel tier cannot run: {why}; run it with tests/vm/run-guest-tests.sh")
    pytest.skip(f"kernel tier: {why}; run it with tests/vm/run-guest-tests.sh")


def _bus_answers() -> bool:
    res = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus.GetId"],
                         capture_output=True, timeout=30, check=False)
    return res.returncode == 0


def _name_owned(name: str) -> bool:
    res = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                          f"string:{name}"], capture_output=True, text=True, timeout=30, check=False)
    return res.returncode == 0 and "boolean true" in res.stdout


def _start_system_bus() -> int | None:
    """A system bus with our policy; the pid of the daemon if this started it."""
    if BUS_SOCKET.exists() and _bus_answers():
        subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                        "/org/freedesktop/DBus", "org.freedesktop.DBus.ReloadConfig"],
                       capture_output=True, timeout=30, check=True)
        return None
    Path("/run/dbus/pid").unlink(missing_ok=True)  # a stale pid file stops a second daemon
    Path("/run/dbus").mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["dbus-daemon", "--system", "--fork", "--print-pid"], capture_output=True,
                         text=True, timeout=60, check=True)
    return int(res.stdout.split()[0])


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    """tcmu-py-runner, owning org.kernel.TCMUService1 on the guest's system bus."""
    why = kernel_unavailable()
    if why is not None:
        _unavailable(why)
    if os.environ.get("TCMU_VM_GUEST") != "1":
        _unavailable("this module installs a D-Bus policy into /etc and starts a system bus: "
                     "only in the throw-away guest")
    for tool in ("dbus-daemon", "dbus-send", "targetcli"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed")
    shutil.copy(REPO / "systemd" / "tcmu-py-runner.conf", POLICY_DIR / "tcmu-py-runner.conf")
    (POLICY_DIR / "tcmu-runner.conf").unlink(missing_ok=True)  # judge our policy alone
    bus_pid = _start_system_bus()
    logdir = Path(os.environ.get("TCMU_VM_RUN_DIR") or tmp_path_factory.mktemp("runner"))
    with open(logdir / "runner-targetcli.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tcmu_py.cli", "-l", str(logdir)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _name_owned("org.kernel.TCMUService1"):
            assert proc.poll() is None, f"tcmu-py-runner exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"the runner owned no name in {START_TIMEOUT_S} s"
            time.sleep(0.5)
        yield proc
    finally:
        assert _stop(proc) == 0
        if bus_pid is not None:
            os.kill(bus_pid, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _listed(subtype: str) -> bool:
    res = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.kernel.TCMUService1",
                          "/org/kernel/TCMUService1", "org.freedesktop.DBus.ObjectManager.GetManagedObjects"],
                         capture_output=True, text=True, timeout=30, check=False)
    return f'"/org/kernel/TCMUService1/{subtype}"' in res.stdout


@pytest.fixture(scope="module")
def external(runner: subprocess.Popen[bytes], tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[subprocess.Popen[bytes]]:
    """The documented external handler process, registered with the runner."""
    logdir = Path(os.environ.get("TCMU_VM_RUN_DIR") or tmp_path_factory.mktemp("external"))
    with open(logdir / "external-handler.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(EXAMPLE)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listed("extram"):
            assert proc.poll() is None, f"the external handler exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"extram was not listed within {START_TIMEOUT_S} s"
            time.sleep(0.5)
        yield proc
    finally:
        assert _stop(proc) == 0


@pytest.fixture(scope="module")
def batch(runner: subprocess.Popen[bytes], external: subprocess.Popen[bytes],
          ) -> Iterator[dict[str, dict[str, Any]]]:
    """One targetcli process runs every command; its outcomes, by command."""
    cmds = [
        "ls /backstores 1",
        "/backstores/user:file help create",
        f"/backstores/user:file create name={BAD} size=64M cfgstring=relative.img",
        f"/backstores/user:file create name={BAD} size=64M cfgstring={IMAGE};threads=0",
        f"/backstores/user:file create name={GOOD} size=64M cfgstring={IMAGE}",
        f"/backstores/user:ram create name={RAM} size=16M cfgstring=;hugepages=9",
        f"/backstores/user:extram create name={BAD} size=16M cfgstring=;fill=300",
        f"/backstores/user:extram create name={EXT} size=16M cfgstring=;fill={FILL}",
        f"/loopback create {WWN}",
        f"/loopback/{WWN}/luns create /backstores/user:file/{GOOD} lun=0",
        f"/loopback/{WWN}/luns create /backstores/user:extram/{EXT} lun=1",
    ]
    res = subprocess.run([sys.executable, str(Path(tcli.__file__)), *cmds], capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    results = {r["cmd"]: r for r in tcli.parse(res.stdout)}
    assert list(results) == cmds, res.stdout + res.stderr
    try:
        yield results
    finally:
        _remove_what_targetcli_made()


def _remove_what_targetcli_made() -> None:
    """rtslib, bounded: the runner is still up and answers the REMOVED events."""
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        for target in FabricModule("loopback").targets:
            if target.wwn == WWN:
                Target(FabricModule("loopback"), WWN, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name.startswith(NAME_PREFIX + "tcli"):
                so.delete()

    in_background(remove, "remove the targetcli objects").result(OP_TIMEOUT)
    IMAGE.unlink(missing_ok=True)


def _outcome(batch: dict[str, dict[str, Any]], starts: str) -> dict[str, Any]:
    return next(r for cmd, r in batch.items() if cmd.startswith(starts))


def test_targetcli_lists_exactly_our_handlers(batch: dict[str, dict[str, Any]]) -> None:
    listing = batch["ls /backstores 1"]
    assert listing["ok"], listing
    user = {line.split("o- ", 1)[1].split()[0] for line in listing["output"].splitlines()
            if "o- user:" in line}
    # the runner's own handlers, and the one an external process registered
    assert user == {f"user:{s}" for s in [*load_handlers(None), "extram"]}
    assert "HandlerManager1" not in listing["output"]


def test_help_create_shows_the_handlers_config_desc(batch: dict[str, dict[str, Any]]) -> None:
    from tcmu_py_handlers.file import FileHandler

    helped = batch["/backstores/user:file help create"]
    assert helped["ok"] and FileHandler.cfg_desc in helped["output"], helped


def test_a_bad_cfgstring_is_refused_with_the_handlers_reason(batch: dict[str, dict[str, Any]]) -> None:
    from rtslib_fb import RTSRoot

    relative = _outcome(batch, f"/backstores/user:file create name={BAD} size=64M cfgstring=relative")
    assert not relative["ok"]
    assert "cfgstring invalid: 'relative.img': the image path must be absolute" in relative["error"]
    threads = _outcome(batch, f"/backstores/user:file create name={BAD} size=64M cfgstring={IMAGE};")
    assert not threads["ok"] and "cfgstring invalid: 'threads=0'" in threads["error"], threads
    ram = _outcome(batch, f"/backstores/user:ram create name={RAM}")
    assert not ram["ok"] and "hugepages" in ram["error"], ram
    # the external handler's own parse_config answered, through the runner
    ext = _outcome(batch, f"/backstores/user:extram create name={BAD}")
    assert not ext["ok"] and "cfgstring invalid: 'fill=300': must be from 0 to 255" in ext["error"], ext
    assert not [so for so in RTSRoot().storage_objects if so.name in (BAD, RAM)]  # never created


def test_a_good_cfgstring_creates_a_backstore_the_runner_serves(batch: dict[str, dict[str, Any]]) -> None:
    from rtslib_fb import RTSRoot

    created = _outcome(batch, f"/backstores/user:file create name={GOOD}")
    assert created["ok"], created
    (so,) = [so for so in RTSRoot().storage_objects if so.name == GOOD]
    assert so.config == f"file/{IMAGE}" and so.status == "activated"
    assert IMAGE.stat().st_size == 64 << 20  # our file handler created it at the device size


def test_the_lun_serves_io_through_tcm_loop(batch: dict[str, dict[str, Any]]) -> None:
    for cmd in (f"/loopback create {WWN}", f"/loopback/{WWN}/luns create /backstores/user:file/{GOOD} lun=0"):
        assert batch[cmd]["ok"], batch[cmd]
    data = os.urandom(1 << 20)
    assert _write_read(_loopback_disk(WWN, 0), 4 << 20, data) == data
    with open(IMAGE, "rb") as f:  # and the bytes are in the file the cfgstring named
        f.seek(4 << 20)
        assert f.read(len(data)) == data


def test_the_external_handler_process_serves_its_lun(batch: dict[str, dict[str, Any]],
                                                      external: subprocess.Popen[bytes]) -> None:
    """Created through targetcli and the runner's forwarded CheckConfig, answered on netlink by
    the external process alone (the runner leaves extram's events to it), served by it."""
    created = _outcome(batch, f"/backstores/user:extram create name={EXT}")
    assert created["ok"], created
    assert batch[f"/loopback/{WWN}/luns create /backstores/user:extram/{EXT} lun=1"]["ok"]
    disk = _loopback_disk(WWN, 1)
    assert read_direct(disk, 0, 4096) == bytes([FILL]) * 4096  # the example's ;fill=171
    data = os.urandom(64 << 10)
    assert _write_read(disk, 1 << 20, data) == data
    assert external.poll() is None


def _write_read(disk: str, offset: int, data: bytes) -> bytes:
    """Write ``data`` at ``offset`` with O_DIRECT, flush, and read it back."""
    write_direct(disk, offset, data)
    return read_direct(disk, offset, len(data))


def _loopback_disk(wwn: str, lun: int, timeout: float = 60.0) -> str:
    """/dev/sdX of a LUN of a tcm_loop target (its tpgt_1/address is host:channel:target)."""
    address = Path(f"/sys/kernel/config/target/loopback/{wwn}/tpgt_1/address").read_text().strip()
    block = Path(f"/sys/bus/scsi/devices/{address}:{lun}/block")
    deadline = time.monotonic() + timeout
    while not (block.is_dir() and any(block.iterdir())):
        assert time.monotonic() < deadline, f"no block device for {address}:{lun} in {timeout} s"
        time.sleep(0.2)
    name = next(block.iterdir()).name
    dev = Path("/dev") / name
    while not dev.exists():
        assert time.monotonic() < deadline, f"{dev} did not appear"
        time.sleep(0.2)
    return str(dev)
