"""A tcmu-py-runner process for the in-guest kernel tests (shared by the test modules that
need a real runner serving real I/O)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import kernel_unavailable

START_TIMEOUT_S = 180.0  # the runner's imports under TCG take seconds, not milliseconds


def unavailable(why: str) -> None:
    """Fail under CI, skip locally: the kernel tier cannot run here."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel tier cannot run: {why}; run it with tests/vm/run-guest-tests.sh")
    pytest.skip(f"kernel tier: {why}; run it with tests/vm/run-guest-tests.sh")


def require_guest(what: str) -> None:
    """Only inside the test guest: ``what`` says why (it changes the machine)."""
    why = kernel_unavailable()
    if why is not None:
        unavailable(why)
    if os.environ.get("TCMU_VM_GUEST") != "1":
        unavailable(f"{what}: only in the guest")


def log_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The runner's log dir: in the run directory when there is one (kept after the run)."""
    run_dir = os.environ.get("TCMU_VM_RUN_DIR")
    logdir = Path(run_dir) / name if run_dir else tmp_path_factory.mktemp(name)
    logdir.mkdir(parents=True, exist_ok=True)
    return logdir


class Runner:
    """One tcmu-py-runner at a time, its log in ``logdir/tcmu-py-runner.log``."""

    def __init__(self, logdir: Path, lock_file: str = "/run/tcmu-py-io.lock",
                 extra_args: tuple[str, ...] = (), out_name: str = "runner-io") -> None:
        self.logdir = logdir
        self.log_path = logdir / "tcmu-py-runner.log"
        self.lock_file = lock_file
        self.extra_args = extra_args
        self.out_name = out_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> str:
        """Start the runner and wait for its ready line; that line."""
        assert self.proc is None or self.proc.poll() is not None, "a runner is still running"
        offset = len(self.log())
        self.starts += 1
        with open(self.logdir / f"{self.out_name}-{self.starts}.out", "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tcmu_py.cli", "-l", str(self.logdir), "--no-dbus",
                 "--lock-file", self.lock_file, *self.extra_args],
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            m = re.search(r"^.*tcmu-py runner ready.*$", self.log()[offset:], re.M)
            if m:
                return m.group(0)
            assert self.proc.poll() is None, f"tcmu-py-runner exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"the runner was not ready in {START_TIMEOUT_S} s"
            time.sleep(0.3)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


def loopback_disk(wwn: str, lun: int, timeout: float = 60.0) -> str:
    """/dev/sdX of a LUN of a tcm_loop target (its tpgt_1/address is host:channel:target)."""
    address = Path(f"/sys/kernel/config/target/loopback/{wwn}/tpgt_1/address").read_text().strip()
    block = Path(f"/sys/bus/scsi/devices/{address}:{lun}/block")
    deadline = time.monotonic() + timeout
    while not (block.is_dir() and any(block.iterdir())):
        assert time.monotonic() < deadline, f"no block device for {address}:{lun} in {timeout} s"
        time.sleep(0.2)
    dev = Path("/dev") / next(block.iterdir()).name
    while not dev.exists():
        assert time.monotonic() < deadline, f"{dev} did not appear"
        time.sleep(0.2)
    return str(dev)
