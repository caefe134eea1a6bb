"""``tcmu-py status`` against a real runner in the guest, while fio drives a tcm_loop disk.

One runner (``--no-dbus``, its own lock file and status socket) serves a ``user:file``
backstore on a tcm_loop LUN.  fio runs 4k random reads for 30 s while
``tcmu-py status --json --watch`` reports every 4 s; its IOPS must agree
with fio's own figure within a sane factor (fio averages its whole run, status the
windows inside it).  A second runner is refused by the lock and the first one's socket keeps answering.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import NAME_PREFIX, OP_TIMEOUT, in_background, kernel_unavailable
from .runnerproc import START_TIMEOUT_S
from .runnerproc import loopback_disk as _loopback_disk
from .runnerproc import unavailable as _unavailable
from .test_runner_io import _explain, _fio_jobs

pytestmark = [
    pytest.mark.guest,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

WWN = "naa.5001405aabbcc200"
NAME = NAME_PREFIX + "status-file"
IMAGE = Path("/tmp") / f"{NAME}.img"
SIZE = 64 << 20
LOCK = "/run/tcmu-py-status-test.lock"
SOCK = "/run/tcmu-py-status-test/status.sock"
CLI = str(Path(sys.executable).parent / "tcmu-py")  # the console script, as installed
FIO_S = 30
WATCH_S = 4  # seconds per status window


def _reads_done(disk: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(disk)}/stat").read_text().split()[0])


def _runner_cmd(logdir: Path) -> list[str]:
    return [sys.executable, "-m", "tcmu_py.cli", "-l", str(logdir), "--no-dbus",
            "--lock-file", LOCK, "--status-socket", SOCK]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A running runner and the /dev/sdX of its user:file LUN."""
    why = kernel_unavailable()
    if why is not None:
        _unavailable(why)
    if os.environ.get("TCMU_VM_GUEST") != "1":
        _unavailable("this module creates a SCSI disk and runs fio: only in the guest")
    run_dir = os.environ.get("TCMU_VM_RUN_DIR")
    logdir = Path(run_dir) / "status" if run_dir else tmp_path_factory.mktemp("status")
    logdir.mkdir(parents=True, exist_ok=True)
    log_path = logdir / "tcmu-py-runner.log"
    with open(logdir / "runner.out", "wb") as out:
        proc = subprocess.Popen(_runner_cmd(logdir), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "tcmu-py runner ready" not in (log_path.read_text() if log_path.exists() else ""):
            assert proc.poll() is None, f"tcmu-py-runner exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"the runner was not ready in {START_TIMEOUT_S} s"
            time.sleep(0.3)

        from rtslib_fb import LUN, TPG, FabricModule, Target, UserBackedStorageObject

        def create() -> None:
            so = UserBackedStorageObject(NAME, config=f"file/{IMAGE}", size=SIZE)
            LUN(TPG(Target(FabricModule("loopback"), WWN), 1), 0, so)

        in_background(create, "create the status LUN").result(3 * OP_TIMEOUT)
        yield _loopback_disk(WWN, 0), logdir
    finally:
        try:
            if proc.poll() is None:
                _remove()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            IMAGE.unlink(missing_ok=True)


def _remove() -> None:
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        loop = FabricModule("loopback")
        if any(t.wwn == WWN for t in loop.targets):
            Target(loop, WWN, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name == NAME:
                so.delete()

    in_background(remove, "remove the status objects").result(OP_TIMEOUT)


def _status(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "status", "--socket", SOCK, *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_status_shows_the_fio_workloads_iops(served: tuple[str, Path], tmp_path: Path) -> None:
    disk, _ = served
    assert stat.S_IMODE(os.stat(SOCK).st_mode) == 0o600
    # `tcmu-py status --watch` runs first (its start-up under TCG takes seconds); its
    # windows that lie wholly inside fio's run are compared with fio's figure
    watch = subprocess.Popen([CLI, "status", "--socket", SOCK, "--json", "--watch", str(WATCH_S)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    out = tmp_path / "fio.json"
    cmd = ["fio", "--output-format=json", f"--output={out}", f"--filename={disk}",
           "--name=status", "--ioengine=libaio", "--direct=1", "--rw=randread", "--bs=4k",
           "--iodepth=16", "--time_based=1", f"--runtime={FIO_S}", "--size=64m"]
    fio: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not lines:
            assert watch.poll() is None, f"tcmu-py status --watch exited: {watch.communicate()}"
            assert time.monotonic() < deadline, "tcmu-py status --watch printed nothing"
            time.sleep(0.2)
        fio = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        reads0 = _reads_done(disk)
        while _reads_done(disk) < reads0 + 100:  # fio is past its start-up, reading
            assert fio.poll() is None, f"fio ended early: {fio.communicate()}"
            assert time.monotonic() < deadline, "fio read nothing in 60 s"
            time.sleep(0.2)
        t_reading, reads_before = time.time(), _reads_done(disk)
        stdout, stderr = fio.communicate(timeout=FIO_S + 120)
        t_done = time.time()
    finally:
        for p in (watch, fio):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(30)
    (job,) = _fio_jobs(subprocess.CompletedProcess(cmd, fio.returncode, stdout, stderr), out)
    fio_iops = job["read"]["iops"]
    assert fio_iops > 0 and job["error"] == 0
    reports = [json.loads(line) for line in list(lines)]
    inside = []
    for rep in reports:
        [dev] = [d for d in rep["devices"] if d["name"] == NAME]
        if dev["interval_s"] and t_reading <= rep["time"] - dev["interval_s"] and rep["time"] <= t_done - 2:
            inside.append(dev)
    assert len(inside) >= 2, f"only {len(inside)} status window(s) inside fio's run: {reports}"
    secs = sum(d["interval_s"] for d in inside)
    iops = sum(d["iops"] * d["interval_s"] for d in inside) / secs
    dev = inside[-1]
    print(f"fio {fio_iops:.0f} IOPS, tcmu-py status {iops:.0f} IOPS over {len(inside)} windows "
          f"({secs:.1f} s; last p50 {dev['interval_p50_us']} us, p99 {dev['interval_p99_us']} us, "
          f"native {dev['native']})")
    assert dev["handler"] == "file" and dev["config"] == f"file/{IMAGE}" and dev["size"] == SIZE
    assert 0.5 * fio_iops < iops < 2 * fio_iops
    assert dev["read_iops"] == pytest.approx(dev["iops"], rel=0.05)  # a read workload
    assert dev["mb_s"] == pytest.approx(dev["iops"] * 4096 / 1e6, rel=0.1)
    assert dev["interval_p50_us"] is not None and dev["errors_total"] == 0
    # every read the block layer had completed went through the runner (the C path here)
    assert dev["commands"]["read"] >= reads_before
    table = _status("--interval", "0")
    assert table.returncode == 0, _explain(table)
    assert any(line.split()[:2] == [NAME, "file"] for line in table.stdout.splitlines())


def test_a_second_runner_is_refused_and_the_status_socket_still_answers(
        served: tuple[str, Path], tmp_path: Path) -> None:
    second = subprocess.run(_runner_cmd(tmp_path), capture_output=True, text=True,
                            timeout=START_TIMEOUT_S, check=False)
    assert second.returncode == 1, _explain(second)
    assert "another runner" in second.stderr and "Traceback" not in second.stderr
    res = _status("--json", "--interval", "0")
    assert res.returncode == 0, _explain(res)
    assert NAME in [d["name"] for d in json.loads(res.stdout)["devices"]]


def test_status_without_a_runner_says_so(tmp_path: Path) -> None:
    res = subprocess.run([CLI, "status", "--socket", str(tmp_path / "none.sock")],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 3, _explain(res)
    assert res.stderr.startswith("tcmu-py: no tcmu-py-runner is running")


