"""The rbd handler against a real Ceph cluster, in the guest (issue 7): targetcli, rtslib, fio.

Everything runs inside the throw-away guest: a single-node Ceph (``ceph_guest``: the
service tier's ``scripts/ceph.sh`` cluster, memstore, 127.0.0.1) with two 64 MiB images,
and ``tcmu-py-runner`` on a system bus with our D-Bus policy (the ``runner`` fixture of
``test_targetcli``).  Two ``user:rbd`` backstores are exported through one tcm_loop target:

* LUN 0 made by targetcli (one ``tcli.py`` batch), which asks the runner's ``CheckConfig``
  over D-Bus first: a bad cfgstring is refused with the handler's reason;
* LUN 1 made by rtslib.

On each: a pattern written through ``/dev/sdX`` with O_DIRECT is exactly what ``rbd
export`` reads from the cluster (the whole image, compared byte for byte), and fio 4 KiB
random writes at QD32 with ``verify=crc32c`` pass with no error.  The tests run in file
order on the same state: the pattern test needs images that nothing else wrote.

Ceph under TCG is slow (``rbd bench`` measured 80-90 4 KiB IOPS at QD32 on a loaded
host), so the fio run writes a bounded amount (``FIO_IO_SIZE``) spread over the image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from . import ceph_guest, tcli
from .blockio import read_direct, write_direct
from .conftest import NAME_PREFIX, OP_TIMEOUT, in_background
from .test_targetcli import _loopback_disk, _unavailable, runner  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.guest,
    pytest.mark.ceph,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

WWN = "naa.5001405aabbcc7d0"
TCLI, RTS, BAD = NAME_PREFIX + "rbd-tcli", NAME_PREFIX + "rbd-rts", NAME_PREFIX + "rbd-bad"
IMAGES = {TCLI: "tcli", RTS: "rts"}  # backstore -> image in pool rbd
LUNS = {TCLI: 0, RTS: 1}
SIZE = 64 << 20
FIO_IO_SIZE = "4M"  # 1024 random 4 KiB writes, then as many verifying reads
#: the handler's default (heartbeat grace + interval + 5 = 9 s with the fixture's conf) is
#: short for a cluster under TCG on a loaded host
OPTS = ";osd_op_timeout=60"
SD_TIMEOUT_S = 180  # a slow cluster under TCG must not make the initiator give up
#: (offset, length): the start, across an object boundary (4 MiB objects), 1 MiB inside,
#: and the very end of the image
EXTENTS = [(0, 64 << 10), ((4 << 20) - 4096, 8192), (17 << 20, 1 << 20), (SIZE - 4096, 4096)]


@pytest.fixture(scope="module")
def starting_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Future[Any]]:
    """Start Ceph in the background: the runner's start (D-Bus, imports) overlaps it."""
    if os.environ.get("TCMU_VM_GUEST") != "1":
        _unavailable("this module starts Ceph, a system bus and SCSI disks: only in the guest")
    why = ceph_guest.unavailable()
    if why is not None:
        _unavailable(why)
    directory = tmp_path_factory.mktemp("ceph") / "cluster"
    images = " ".join(f"{img}:{SIZE >> 20}M" for img in IMAGES.values())
    fut = in_background(lambda: ceph_guest.start(directory, lifetime=900, images=images), "ceph")
    try:
        yield fut
    finally:
        try:
            cluster = fut.result(ceph_guest.START_TIMEOUT)
        except Exception:  # noqa: BLE001 - ceph.sh stopped what it started; the test failed
            cluster = None
        if cluster is not None:
            ceph_guest.stop(cluster)


@pytest.fixture(scope="module")
def cluster(starting_cluster: Future[Any], runner: subprocess.Popen[bytes]) -> Any:  # noqa: F811
    """The running cluster (a ``CephCluster``), once the runner is up too."""
    try:
        return starting_cluster.result(ceph_guest.START_TIMEOUT)
    except RuntimeError as e:
        pytest.fail(f"Ceph did not start in the guest: {e}")


@pytest.fixture(scope="module")
def batch(cluster: Any) -> Iterator[dict[str, dict[str, Any]]]:
    """One targetcli process: a refused cfgstring, the rbd backstore, the target and LUN 0."""
    cmds = [
        f"/backstores/user:rbd create name={BAD} size=64M cfgstring=rbd/{IMAGES[TCLI]};conf=ceph.conf",
        f"/backstores/user:rbd create name={TCLI} size=64M "
        f"cfgstring=rbd/{IMAGES[TCLI]};conf={cluster.conf}{OPTS}",
        f"/loopback create {WWN}",
        f"/loopback/{WWN}/luns create /backstores/user:rbd/{TCLI} lun={LUNS[TCLI]}",
    ]
    try:
        res = subprocess.run([sys.executable, str(Path(tcli.__file__)), *cmds], capture_output=True,
                             text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr
        results = {r["cmd"]: r for r in tcli.parse(res.stdout)}
        assert list(results) == cmds, res.stdout + res.stderr
        yield results
    finally:
        _remove_everything()


@pytest.fixture(scope="module")
def disks(batch: dict[str, dict[str, Any]], cluster: Any) -> dict[str, str]:
    """Both backstores' disks (backstore name -> /dev/sdX); LUN 1 made with rtslib."""
    from rtslib_fb import LUN, TPG, FabricModule, Target, UserBackedStorageObject

    def create() -> None:
        so = UserBackedStorageObject(RTS, config=f"rbd/rbd/{IMAGES[RTS]};conf={cluster.conf}{OPTS}",
                                     size=SIZE)
        tpg = TPG(Target(FabricModule("loopback"), WWN), 1)  # targetcli made it: looked up
        LUN(tpg, LUNS[RTS], so)

    in_background(create, "create the rtslib rbd backstore").result(3 * OP_TIMEOUT)
    out = {name: _loopback_disk(WWN, lun) for name, lun in LUNS.items()}
    for dev in out.values():
        Path(f"/sys/block/{os.path.basename(dev)}/device/timeout").write_text(str(SD_TIMEOUT_S))
    return out


def _remove_everything() -> None:
    """rtslib, bounded, while the runner still answers the REMOVED events."""
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        loop = FabricModule("loopback")
        if any(t.wwn == WWN for t in loop.targets):
            Target(loop, WWN, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name.startswith(NAME_PREFIX + "rbd-"):
                so.delete()

    in_background(remove, "remove the rbd objects").result(3 * OP_TIMEOUT)


# ---- creation ------------------------------------------------------------------------------

def test_targetcli_refuses_a_bad_rbd_cfgstring_with_the_handlers_reason(
        batch: dict[str, dict[str, Any]]) -> None:
    from rtslib_fb import RTSRoot

    (refused,) = [r for cmd, r in batch.items() if f"name={BAD}" in cmd]
    assert not refused["ok"], refused
    assert "cfgstring invalid: 'conf=ceph.conf': conf= must be an absolute path" in refused["error"]
    assert BAD not in {so.name for so in RTSRoot().storage_objects}


def test_targetcli_and_rtslib_create_rbd_backstores_the_runner_serves(
        batch: dict[str, dict[str, Any]], disks: dict[str, str], cluster: Any) -> None:
    from rtslib_fb import RTSRoot

    for cmd, outcome in batch.items():
        if f"name={BAD}" not in cmd:
            assert outcome["ok"], outcome
    objs = {so.name: so for so in RTSRoot().storage_objects if so.name in LUNS}
    assert {n: so.status for n, so in objs.items()} == dict.fromkeys(LUNS, "activated")
    assert objs[TCLI].config == f"rbd/rbd/{IMAGES[TCLI]};conf={cluster.conf}{OPTS}"
    assert objs[RTS].config == f"rbd/rbd/{IMAGES[RTS]};conf={cluster.conf}{OPTS}"
    for dev in disks.values():
        assert int(Path(f"/sys/block/{os.path.basename(dev)}/size").read_text()) * 512 == SIZE
    # the runner really opened both images: each has two watchers, its and this open's
    for image in IMAGES.values():
        with cluster.image(image) as img:
            assert len(list(img.watchers_list())) == 2, image


# ---- data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backstore", [TCLI, RTS])
def test_the_image_holds_exactly_what_was_written_through_the_disk(
        backstore: str, disks: dict[str, str], cluster: Any) -> None:
    expected = bytearray(SIZE)  # a new image reads as zeroes
    for offset, length in EXTENTS:
        data = os.urandom(length)
        write_direct(disks[backstore], offset, data)
        expected[offset:offset + length] = data
    exported = cluster.export(IMAGES[backstore])  # `rbd export`: another client, the CLI
    assert len(exported) == SIZE
    if exported != expected:
        first = next(i for i in range(SIZE) if exported[i] != expected[i])
        pytest.fail(f"rbd export differs from what was written, first at byte {first}")
    for offset, length in EXTENTS:  # and the disk reads back the same
        assert read_direct(disks[backstore], offset, length) == expected[offset:offset + length]


@pytest.mark.parametrize("backstore", [TCLI, RTS])
def test_fio_random_writes_verify_with_crc32c(backstore: str, disks: dict[str, str],
                                              tmp_path: Path) -> None:
    out = tmp_path / "fio.json"
    res = subprocess.run(
        ["fio", "--output-format=json", f"--output={out}", f"--filename={disks[backstore]}",
         "--name=rbd-verify", "--ioengine=libaio", "--direct=1", "--rw=randwrite", "--bs=4k",
         "--iodepth=32", f"--size={SIZE}", f"--io_size={FIO_IO_SIZE}", "--verify=crc32c",
         "--verify_fatal=1", "--do_verify=1", "--randrepeat=0"],
        capture_output=True, text=True, timeout=480, check=False)
    text = out.read_text() if out.exists() else ""
    assert res.returncode == 0, f"fio rc {res.returncode}\n{res.stderr}\n{text[-4000:]}"
    (job,) = json.loads(text[text.index("{"):])["jobs"]  # fio may print notes before the JSON
    assert job["error"] == 0, job
    assert job["write"]["total_ios"] == 1024 and job["read"]["total_ios"] == 1024, job
