"""tcmu-py-runner serving real I/O in the guest: tcm_loop LUNs, fio, sg3_utils, restarts.

The in-guest acceptance of issue 5.  One runner process (``--no-dbus``, its own lock file and
log dir) serves three rtslib-made backstores exported through one tcm_loop target:

* LUN 0 ``user:file`` on an image in /tmp (``cmd_time_out`` raised, for the kill -9 test),
* LUN 1 ``user:ram`` with ``hw_max_sectors=1024``,
* LUN 2 a small ``user:ram`` (``cmd_time_out=5``) that sg_format wipes and SIGTERM strands.

The tests run in file order and share that state: creation, fio verify, sg3_utils,
resize, a refused config, kill -9 and restart, and last SIGTERM with I/O in flight (after
which the module's teardown starts a fresh runner only to delete what is left).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.control import ConfigFS, bounded_write

from .blockio import read_direct, write_direct
from .conftest import NAME_PREFIX, OP_TIMEOUT, in_background
from .runnerproc import Runner, log_dir, loopback_disk, require_guest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

WWN = "naa.5001405aabbcc100"
FILE = NAME_PREFIX + "io-file"
RAM = NAME_PREFIX + "io-ram"
SMALL = NAME_PREFIX + "io-small"
BAD = NAME_PREFIX + "io-bad"
IMAGE = Path("/tmp") / f"{FILE}.img"
SIZES = {FILE: 64 << 20, RAM: 64 << 20, SMALL: 8 << 20}
LUNS = {FILE: 0, RAM: 1, SMALL: 2}
SD_TIMEOUT_S = 180  # the initiator's per-command timeout: longer than a runner restart


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    require_guest("this module creates SCSI disks and runs fio/sg_format")
    r = Runner(log_dir(tmp_path_factory, "runner-io"))
    r.start()
    try:
        yield r
    finally:
        if not r.alive():  # SIGTERM/kill tests: a runner must answer the REMOVED events
            r.start()
        try:
            _remove_everything()
        finally:
            assert r.stop() == 0
            IMAGE.unlink(missing_ok=True)


def _remove_everything() -> None:
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        loop = FabricModule("loopback")
        if any(t.wwn == WWN for t in loop.targets):
            Target(loop, WWN, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name.startswith(NAME_PREFIX + "io-"):
                so.delete()

    in_background(remove, "remove the runner-io objects").result(OP_TIMEOUT)


@pytest.fixture(scope="module")
def disks(runner: Runner) -> dict[str, str]:
    """The three backstores, exported as LUNs of one tcm_loop target: name -> /dev/sdX."""
    from rtslib_fb import LUN, TPG, FabricModule, Target, UserBackedStorageObject

    def create() -> None:
        objs = {
            FILE: UserBackedStorageObject(FILE, config=f"file/{IMAGE}", size=SIZES[FILE]),
            RAM: UserBackedStorageObject(RAM, config="ram/", size=SIZES[RAM], hw_max_sectors=1024),
            SMALL: UserBackedStorageObject(SMALL, config="ram/", size=SIZES[SMALL]),
        }
        # The kill -9 test stops the runner for longer than the default 30 s command timeout
        # may allow under TCG; only settable while the device has no LUN.
        objs[FILE].set_attribute("cmd_time_out", "300")
        # SIGTERM test: what the initiator queues after the runner exited expires in 5 s.
        objs[SMALL].set_attribute("cmd_time_out", "5")
        tpg = TPG(Target(FabricModule("loopback"), WWN), 1)
        for name, so in objs.items():
            LUN(tpg, LUNS[name], so)

    in_background(create, "create the runner-io objects").result(3 * OP_TIMEOUT)
    out = {name: loopback_disk(WWN, lun) for name, lun in LUNS.items()}
    for dev in out.values():
        Path(f"/sys/block/{os.path.basename(dev)}/device/timeout").write_text(str(SD_TIMEOUT_S))
    return out


# ---- helpers ---------------------------------------------------------------------------------

def _roundtrip(disk: str, offset: int = 1 << 20) -> None:
    data = os.urandom(64 << 10)
    write_direct(disk, offset, data)
    assert read_direct(disk, offset, len(data)) == data


def _run(*cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, encoding="utf-8", errors="backslashreplace",
                          timeout=timeout, check=False)


def _explain(res: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(res.args)} -> rc {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def _writes_done(disk: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(disk)}/stat").read_text().split()[4])


def _fio(disk: str, out: Path, *job: str) -> list[str]:
    return ["fio", "--output-format=json", f"--output={out}", f"--filename={disk}",
            "--ioengine=libaio", "--direct=1", "--verify=crc32c", "--verify_fatal=1", *job]


def _fio_jobs(res: subprocess.CompletedProcess[str], out: Path) -> list[dict[str, Any]]:
    text = out.read_text() if out.exists() else ""
    assert res.returncode == 0, _explain(res) + "\njson:\n" + text[-4000:]
    report = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    return report["jobs"]


# ---- 1. creation --------------------------------------------------------------------------

def test_two_handlers_serve_scsi_disks_at_once(disks: dict[str, str], runner: Runner) -> None:
    from rtslib_fb import RTSRoot

    objs = {so.name: so for so in RTSRoot().storage_objects if so.name in disks}
    assert {n: objs[n].status for n in disks} == dict.fromkeys(disks, "activated")
    assert objs[FILE].config == f"file/{IMAGE}" and objs[RAM].config == "ram/"
    assert "HwMaxSectors: 1024" in Path(objs[RAM].path, "info").read_text()
    assert IMAGE.stat().st_size == SIZES[FILE]
    for name, dev in disks.items():
        sectors = int(Path(f"/sys/block/{os.path.basename(dev)}/size").read_text())
        assert sectors * 512 == SIZES[name], name
        _roundtrip(dev)
    # the handler limit reaches the initiator: Block Limits VPD, MAXIMUM TRANSFER LENGTH
    bl = _run("sg_vpd", "--page=bl", disks[RAM])
    assert bl.returncode == 0, _explain(bl)
    assert re.search(r"Maximum transfer length: 1024 blocks", bl.stdout), bl.stdout
    assert runner.alive()


# ---- 2. fio verify ------------------------------------------------------------------------

@pytest.mark.parametrize("name", [FILE, RAM])
def test_fio_random_and_sequential_writes_verify(disks: dict[str, str], name: str,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "fio.json"
    cmd = _fio(disks[name], out,
               "--name=rand4k", "--rw=randwrite", "--bs=4k", "--iodepth=32",
               "--offset=0", "--size=4M",
               "--name=seq1m", "--stonewall", "--rw=write", "--bs=1M", "--iodepth=4",
               "--offset=32M", "--size=16M")
    res = _run(*cmd, timeout=600)
    jobs = _fio_jobs(res, out)
    assert [j["jobname"] for j in jobs] == ["rand4k", "seq1m"]
    for job, size in zip(jobs, (4 << 20, 16 << 20), strict=True):
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == size, job["write"]
        assert job["read"]["io_bytes"] == size, job["read"]  # the verify pass read it all


# ---- 3. sg3_utils -------------------------------------------------------------------------

SG_OK = [
    ("sg_inq",),
    ("sg_vpd", "-a"),
    ("sg_readcap", "-l"),
    ("sg_modes", "-a"),
    ("sg_requests",),
    ("sg_opcodes",),  # REPORT SUPPORTED OPERATION CODES (sg3_utils 1.46 name)
    ("sg_unmap", "--force", "--lba=4096", "--num=64"),  # --force: no 15 s cooling-off pause
    ("sg_write_same", "--lba=8192", "--num=32"),
    ("sg_write_same", "--unmap", "--lba=8192", "--num=32"),
    ("sg_sync",),
    ("sg_verify", "--lba=0", "--count=64"),
]


@pytest.mark.parametrize("cmd", SG_OK, ids=[" ".join(c) for c in SG_OK])
def test_sg3_utils_command_succeeds(disks: dict[str, str], cmd: tuple[str, ...]) -> None:
    res = _run(*cmd, disks[FILE])
    assert res.returncode == 0, _explain(res)


def test_sg_write_same_writes_the_pattern_and_unmap_reads_zeroes(disks: dict[str, str]) -> None:
    dev = disks[FILE]
    write_direct(dev, 8192 * 512, os.urandom(32 * 512))
    res = _run("sg_write_same", "--lba=8192", "--num=32", dev)  # a block of zeroes
    assert res.returncode == 0, _explain(res)
    assert read_direct(dev, 8192 * 512, 32 * 512) == bytes(32 * 512)
    write_direct(dev, 4096 * 512, os.urandom(64 * 512))
    res = _run("sg_unmap", "--force", "--lba=4096", "--num=64", dev)
    assert res.returncode == 0, _explain(res)
    vpd = _run("sg_vpd", "--page=lbpv", dev)
    if re.search(r"LBPRZ=[1-7]|Logical block provisioning read zeros \(LBPRZ\)=[1-7]", vpd.stdout):
        assert read_direct(dev, 4096 * 512, 64 * 512) == bytes(64 * 512)


def test_vpd_unit_serial_is_the_configfs_serial(disks: dict[str, str]) -> None:
    from rtslib_fb import RTSRoot

    (so,) = [so for so in RTSRoot().storage_objects if so.name == FILE]
    res = _run("sg_vpd", "--page=sn", disks[FILE])
    assert res.returncode == 0, _explain(res)
    assert so.wwn and f"Unit serial number: {so.wwn}" in res.stdout, (so.wwn, _explain(res))


def test_sg_rtpg_answers_as_inquiry_tpgs_says(disks: dict[str, str]) -> None:
    inq = _run("sg_inq", disks[FILE])
    m = re.search(r"TPGS=(\d)", inq.stdout)
    assert inq.returncode == 0 and m, _explain(inq)
    res = _run("sg_rtpg", disks[FILE])
    if int(m.group(1)):  # SPC: REPORT TARGET PORT GROUPS is mandatory when TPGS != 0
        assert res.returncode == 0, _explain(res)
    else:  # not claimed: success or a clean ILLEGAL REQUEST (5) / INVALID OPCODE (9)
        assert res.returncode in (0, 5, 9), _explain(res)


def test_sg_compare_and_write_matches_and_miscompares(disks: dict[str, str], tmp_path: Path) -> None:
    dev, lba = disks[FILE], 2048
    a, b, c = (os.urandom(512) for _ in range(3))
    write_direct(dev, lba * 512, a + bytes(4096 - 512))
    match = tmp_path / "match.bin"
    match.write_bytes(a + b)
    res = _run("sg_compare_and_write", f"--in={match}", f"--lba={lba}", "--num=1", dev)
    assert res.returncode == 0, _explain(res)
    assert read_direct(dev, lba * 512, 4096)[:512] == b
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(a + c)  # compares against a, but the disk now holds b
    res = _run("sg_compare_and_write", f"--in={wrong}", f"--lba={lba}", "--num=1", dev)
    assert res.returncode == 14, _explain(res)  # SG_LIB_CAT_MISCOMPARE
    assert "miscompare" in (res.stdout + res.stderr).lower(), _explain(res)
    assert read_direct(dev, lba * 512, 4096)[:512] == b  # nothing written


def test_sg_get_lba_status_answers_cleanly(disks: dict[str, str]) -> None:
    res = _run("sg_get_lba_status", "--lba=0", disks[FILE], timeout=60)
    # A handler that cannot tell may answer ILLEGAL REQUEST (5) / INVALID OPCODE (9).
    assert res.returncode in (0, 5, 9), _explain(res)


def test_sg_format_zeroes_a_small_device(disks: dict[str, str], runner: Runner) -> None:
    dev = disks[SMALL]
    write_direct(dev, 0, b"\xa5" * 4096)
    # --wait: IMMED=0, the command completes when the fill does (sg_format's IMMED polling
    # reports only once a minute)
    res = _run("sg_format", "--format", "--quick", "--wait", dev, timeout=300)
    assert res.returncode == 0, _explain(res)
    # evidence only: sg_format printed an empty unit serial and undecodable "LU name" bytes
    evidence = [res] + [_run("sg_vpd", f"--page={p}", dev) for p in ("sn", "di")]
    (runner.logdir / "sg-format-evidence.txt").write_text("\n".join(map(_explain, evidence)))
    assert read_direct(dev, 0, 4096) == bytes(4096)
    cap = _run("sg_readcap", "-l", dev)
    assert cap.returncode == 0 and f"Number of logical blocks={SIZES[SMALL] // 512}" in cap.stdout, \
        _explain(cap)


# ---- 6. resize ----------------------------------------------------------------------------

def test_resize_through_configfs_shows_in_read_capacity(disks: dict[str, str], runner: Runner) -> None:
    from rtslib_fb import RTSRoot

    (so,) = [so for so in RTSRoot().storage_objects if so.name == RAM]
    new = 96 << 20
    in_background(lambda: bounded_write(os.path.join(so.path, "attrib", "dev_size"), str(new),
                                        OP_TIMEOUT), "resize").result(OP_TIMEOUT)
    assert f"Size: {new}" in Path(so.path, "info").read_text()
    answers = []
    for _ in range(5):  # the first command after the resize may meet the unit attention
        res = _run("sg_readcap", "-l", disks[RAM])
        answers.append(res)
        if res.returncode == 0:
            break
    assert res.returncode == 0, "\n".join(_explain(r) for r in answers)
    assert f"Number of logical blocks={new // 512}" in res.stdout, _explain(res)
    for r in answers[:-1]:  # anything before success must be that unit attention
        assert r.returncode == 6 and "capacity data has changed" in r.stderr.lower(), _explain(r)


# ---- 7. a bad config ----------------------------------------------------------------------

def test_a_bad_config_is_refused_with_the_reason_logged(disks: dict[str, str], runner: Runner) -> None:
    from rtslib_fb import RTSRoot, UserBackedStorageObject

    offset = len(runner.log())
    creating = in_background(
        lambda: UserBackedStorageObject(BAD, config="file//nonexistent-dir/x", size=16 << 20), "bad")
    with pytest.raises(OSError):
        creating.result(OP_TIMEOUT)
    log = runner.log()[offset:]
    assert re.search(r"add refused.*nonexistent-dir", log), log
    assert not [so for so in RTSRoot().storage_objects if so.name == BAD]
    assert runner.alive()
    _roundtrip(disks[FILE], 6 << 20)  # and the other devices are still served
    _roundtrip(disks[SMALL], 1 << 20)


# ---- 4. kill -9 and restart ---------------------------------------------------------------

def test_kill_9_during_fio_then_restart_loses_nothing(disks: dict[str, str], runner: Runner,
                                                      tmp_path: Path) -> None:
    dev, out = disks[FILE], tmp_path / "fio.json"
    cmd = _fio(dev, out, "--name=killed", "--rw=randwrite", "--bs=4k", "--iodepth=32",
               "--offset=0", "--size=4M", "--rate_iops=200")
    before = _writes_done(dev)
    fio = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _writes_done(dev) < before + 200:
            assert fio.poll() is None, f"fio ended before the kill: {fio.communicate()}"
            assert time.monotonic() < deadline, "fio wrote nothing"
            time.sleep(0.1)
        assert runner.stop(signal.SIGKILL, timeout=30) == -signal.SIGKILL
        assert fio.poll() is None, "fio finished before the runner was killed"
        ready = runner.start()
        stdout, stderr = fio.communicate(timeout=600)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait(30)
    assert re.search(r"ready: [3-9] device", ready), ready  # all three re-attached
    res = subprocess.CompletedProcess(cmd, fio.returncode, stdout, stderr)
    (job,) = _fio_jobs(res, out)
    assert job["error"] == 0 and job["write"]["io_bytes"] == 4 << 20, job
    assert job["read"]["io_bytes"] == 4 << 20, job["read"]  # every block verified
    _roundtrip(disks[RAM])
    _roundtrip(disks[SMALL])


# ---- 5. SIGTERM with I/O in flight (last: it leaves no runner) ------------------------------

def test_sigterm_with_io_in_flight_exits_promptly_and_delete_completes(
        disks: dict[str, str], runner: Runner, tmp_path: Path) -> None:
    from rtslib_fb import LUN, TPG, FabricModule, RTSRoot, Target

    dev = disks[SMALL]
    before = _writes_done(dev)
    fio = subprocess.Popen(["fio", f"--filename={dev}", "--name=inflight", "--ioengine=libaio",
                            "--direct=1", "--rw=randwrite", "--bs=4k", "--iodepth=32",
                            "--size=8M", "--time_based", "--runtime=60"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while _writes_done(dev) < before + 200:
            assert fio.poll() is None and time.monotonic() < deadline, "fio wrote nothing"
            time.sleep(0.1)
        t0 = time.monotonic()
        rc = runner.stop(signal.SIGTERM, timeout=60)
        took = time.monotonic() - t0
        assert rc == 0, f"exit code {rc} after SIGTERM"
        assert took <= 10.0, f"the runner took {took:.1f} s to exit after SIGTERM"
    finally:
        fio.kill()

    def delete_lun() -> None:
        tpg = TPG(Target(FabricModule("loopback"), WWN, mode="lookup"), 1, mode="lookup")
        LUN(tpg, LUNS[SMALL]).delete()  # no storage object: look the LUN up

    def delete_backstore() -> None:
        (so,) = [so for so in RTSRoot().storage_objects if so.name == SMALL]
        so.delete()

    t0 = time.monotonic()
    in_background(delete_lun, "delete the LUN").result(OP_TIMEOUT)
    lun_s = time.monotonic() - t0
    t0 = time.monotonic()
    in_background(delete_backstore, "delete the backstore").result(10.0)
    so_s = time.monotonic() - t0
    assert lun_s + so_s <= 10.0, f"LUN delete {lun_s:.1f} s, backstore delete {so_s:.1f} s"
    assert not ConfigFS().block_netlink()
