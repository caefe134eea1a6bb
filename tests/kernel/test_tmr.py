"""Task management against the real kernel: LUN RESET and ABORT TASK reach the runner.

One runner (``--handler-path tests/kernel/handlers``) serves a ``user:stall`` backstore
with ``tmr_notification=1``, exported as LUN 0 of a tcm_loop target. The stall handler is a
RAM disk whose I/O waits while a control file exists, so a command can be held in the
handler while the initiator gives up on it:

* ``sg_reset -d`` sends a LUN RESET: the runner logs the TMR, the initiator sees at most one
  reset unit attention (LIO's own), and the disk keeps its data.
* a read held in the handler times out in sd (3 s): the SCSI error handler sends ABORT TASK,
  the runner logs it with the command in the handler; once released, the aborted command is
  completed (the kernel drops it), sd retries the read, and it returns the right bytes.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .blockio import read_direct, write_direct
from .conftest import NAME_PREFIX, OP_TIMEOUT, in_background
from .runnerproc import Runner, log_dir, loopback_disk, require_guest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

WWN = "naa.5001405aabbcc200"
NAME = NAME_PREFIX + "tmr-stall"
CONTROL = Path("/tmp") / f"{NAME}.ctl"
STALLED = Path(f"{CONTROL}.stalled")
SIZE = 16 << 20
HANDLERS = Path(__file__).parent / "handlers"


def _run(*cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, encoding="utf-8", errors="backslashreplace",
                          timeout=timeout, check=False)


def _explain(res: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(res.args)} -> rc {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def _wait_log(runner: Runner, offset: int, pattern: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, runner.log()[offset:])
        if m:
            return m.group(0)
        assert runner.alive(), "the runner died"
        assert time.monotonic() < deadline, f"no {pattern!r} in the runner log:\n{runner.log()[offset:]}"
        time.sleep(0.2)


def _set_sd_timeout(disk: str, seconds: int) -> None:
    Path(f"/sys/block/{os.path.basename(disk)}/device/timeout").write_text(str(seconds))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    require_guest("this module resets and aborts commands on a SCSI disk")
    r = Runner(log_dir(tmp_path_factory, "runner-tmr"), lock_file="/run/tcmu-py-tmr.lock",
               extra_args=("--handler-path", str(HANDLERS)), out_name="runner-tmr")
    ready = r.start()
    try:
        assert "stall" in ready, ready
        yield r
    finally:
        CONTROL.unlink(missing_ok=True)  # nothing may stay stalled
        try:
            _remove_everything()
        finally:
            alive = r.alive()
            rc = r.stop() if alive else r.proc.returncode if r.proc else None
            assert alive and rc == 0, f"runner alive={alive}, exit code {rc}"
            STALLED.unlink(missing_ok=True)


def _remove_everything() -> None:
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        loop = FabricModule("loopback")
        if any(t.wwn == WWN for t in loop.targets):
            Target(loop, WWN, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name == NAME:
                so.delete()

    in_background(remove, "remove the TMR test objects").result(OP_TIMEOUT)


@pytest.fixture(scope="module")
def disk(runner: Runner) -> str:
    from rtslib_fb import LUN, TPG, FabricModule, Target, UserBackedStorageObject

    def create() -> None:
        so = UserBackedStorageObject(NAME, config=f"stall/{CONTROL}", size=SIZE)
        so.set_attribute("tmr_notification", "1")
        LUN(TPG(Target(FabricModule("loopback"), WWN), 1), 0, so)

    in_background(create, "create the TMR test objects").result(3 * OP_TIMEOUT)
    return loopback_disk(WWN, 0)


def test_lun_reset_reaches_the_runner_and_the_disk_keeps_its_data(disk: str, runner: Runner) -> None:
    data = os.urandom(64 << 10)
    write_direct(disk, 1 << 20, data)
    offset = len(runner.log())
    res = _run("sg_reset", "--device", disk)
    assert res.returncode == 0, _explain(res)
    _wait_log(runner, offset, r"TMR LUN_RESET: 0 aborted command\(s\)")
    turs = [_run("sg_turs", "-vv", disk) for _ in range(3)]
    (runner.logdir / "lun-reset-turs.txt").write_text("\n".join(map(_explain, turs)))
    ua = [t for t in turs if t.returncode == 6]  # SG_LIB_CAT_UNIT_ATTENTION
    # LIO reports the reset itself (29/03, which Linux may consume); the runner adds none
    # (29/00 would be a second reset the initiator hears of)
    assert len(ua) <= 1, "\n".join(map(_explain, turs))
    for t in ua:
        assert not re.search(r"power on, reset, or bus device reset occurred",
                             t.stdout + t.stderr, re.I), _explain(t)
    assert turs[-1].returncode == 0, "\n".join(map(_explain, turs))
    assert read_direct(disk, 1 << 20, len(data)) == data
    assert runner.alive()


def test_abort_task_of_a_read_held_in_the_handler(disk: str, runner: Runner, tmp_path: Path) -> None:
    block = 4096
    lba_off = 5 << 20
    data = os.urandom(block)
    write_direct(disk, lba_off, data)
    out = tmp_path / "read.bin"
    offset = len(runner.log())
    STALLED.unlink(missing_ok=True)
    CONTROL.touch()
    _set_sd_timeout(disk, 3)  # sd gives up on the held read and sends ABORT TASK
    dd = subprocess.Popen(["dd", f"if={disk}", f"of={out}", f"bs={block}", f"skip={lba_off // block}",
                           "count=1", "iflag=direct"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        deadline = time.monotonic() + 60
        while not STALLED.exists():
            assert dd.poll() is None, f"dd finished without reaching the handler: {dd.communicate()}"
            assert time.monotonic() < deadline, "the read never reached the handler"
            time.sleep(0.1)
        line = _wait_log(runner, offset,
                         r"TMR ABORT_TASK: 1 aborted command\(s\) in the ring, 1 of them in the handler")
        _set_sd_timeout(disk, 30)
        t0 = time.monotonic()
        CONTROL.unlink()  # release: the aborted read completes, the kernel drops it, sd retries
        stdout, stderr = dd.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        CONTROL.unlink(missing_ok=True)
        _set_sd_timeout(disk, 30)
        if dd.poll() is None:
            dd.kill()
            dd.wait(30)
    assert dd.returncode == 0, f"dd rc {dd.returncode}: {stdout} {stderr}"
    assert out.read_bytes() == data
    (runner.logdir / "abort-evidence.txt").write_text(
        f"{line}\nread done {took:.1f} s after the release\n{STALLED.read_text()}")
    assert runner.alive()
    # the device keeps working: fresh I/O, nothing held any more
    more = os.urandom(64 << 10)
    write_direct(disk, 8 << 20, more)
    assert read_direct(disk, 8 << 20, len(more)) == more


def test_the_uevent_signal_runs_and_attached_nothing_twice(disk: str, runner: Runner) -> None:
    """The runner listens to uio uevents too; with netlink working they change nothing."""
    time.sleep(2.5)  # past the runner's grace period for a uio "add"
    log = runner.log()
    assert "uio uevents: listening (kernel events)" in log, log
    assert "without a netlink" not in log, log
    assert len(re.findall(rf"{NAME}: serving ", log)) == 1, log
