"""The rbd handler against a real Ceph cluster (issue 7), on the simulated kernel.

One cluster serves the whole module (``ceph_fixture``); each test gets fresh images.
What is checked, as an initiator and as the cluster see it:

* the handler conformance suite on a real image, with 512- and 4096-byte blocks;
* what is written through the handler is what ``rbd export`` reads; scattered buffers
  go through librbd's vectored calls; UNMAP frees whole objects and reads back zeroes;
* the device shows up in the service map as tcmu-runner's do, with its status keys;
* faults: a paused OSD, an unreachable cluster, wrong pool / image / key / size, a
  blocklisted client and another client holding the lock;
* ``osd_op_timeout`` follows tcmu-runner's rule, and resize goes through ``reconfig``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tcmu_py.attach import AttachError, Geometry, prepare
from tcmu_py.handler import DeviceInfo
from tcmu_py.scsi._model import SenseKey
from tcmu_py.sim import SimTarget
from tcmu_py.sim.kernel import SimResult
from tcmu_py.testing import DEFAULT_SIZE, ConformanceCase, ConformanceSuite, cdb
from tcmu_py_handlers.ram import RamHandler
from tcmu_py_handlers.rbd import RbdHandler

# ``ceph`` is the module-scoped cluster fixture: importing it here makes it this module's
try:  # a package if tests/services gets an __init__.py, a rootdir module otherwise
    from .ceph_fixture import POOL, CephCluster, ceph, free_port  # noqa: F401, RUF100
except ImportError:
    from ceph_fixture import (  # type: ignore[no-redef]
        POOL,
        CephCluster,
        ceph,  # noqa: F401
        free_port,
    )

pytestmark = pytest.mark.ceph

IMAGE_SIZE = 16 << 20
BS = 512
#: legal on the fixture's cluster (heartbeat grace 3 + interval 1 < 5)
OP_TIMEOUT = 5
NOT_READY, FENCED = SenseKey.NOT_READY, (0x04, 0x0B)  # LUN not accessible, port in standby


def dev_config(cluster: CephCluster, image: str, options: str = "") -> str:
    return f"rbd/{POOL}/{image};conf={cluster.conf}{options}"


@pytest.fixture
def image(ceph: CephCluster) -> Iterator[str]:
    name = ceph.create_image(IMAGE_SIZE)
    yield name
    ceph.remove_image(name, wait=10)


@contextlib.contextmanager
def serve(cluster: CephCluster, image: str, options: str = "", size: int = IMAGE_SIZE,
          **kw: object) -> Iterator[SimTarget]:
    with SimTarget(RbdHandler, dev_config(cluster, image, options), size=size, **kw) as t:  # type: ignore[arg-type]
        yield t


def handler_of(t: SimTarget) -> RbdHandler:
    h = t.device.handler
    assert isinstance(h, RbdHandler)
    return h


def sense_of(res: SimResult) -> tuple[int, int, int]:
    assert len(res.sense) >= 14, f"status {res.status:#x} without sense data"
    return res.sense[2] & 0x0F, res.sense[12], res.sense[13]


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def wait_for_good(t: SimTarget, lba: int, data: bytes, within: float) -> float:
    """Retry a WRITE (as an initiator does after BUSY) until it is GOOD; the time it took."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < within:
        last = t.submit(cdb.write16(lba, len(data) // t.block_size), data, timeout=within)
        if last.status == 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"no GOOD write within {within:g} s; last status {last and last.status:#x}")


# ---- the handler conformance suite on real images ----------------------------------------


def _conformance_image(size: int) -> Callable[[pytest.FixtureRequest], str]:
    def make(request: pytest.FixtureRequest) -> str:
        cluster: CephCluster = request.getfixturevalue("ceph")
        name = cluster.create_image(size)
        request.addfinalizer(lambda: cluster.remove_image(name, wait=5))
        return dev_config(cluster, name)

    return make


#: the suite's UNMAP ranges reach block 2153: 8 MiB holds only 2048 blocks of 4 KiB
SIZE_4K = 4 * DEFAULT_SIZE


class TestRbdConformance(ConformanceSuite):
    cases = [
        ConformanceCase("rbd-512", RbdHandler, _conformance_image(DEFAULT_SIZE)),
        # librbd's compare-and-write takes 512 bytes only: here the runner emulates it
        ConformanceCase("rbd-4096", RbdHandler, _conformance_image(SIZE_4K), size=SIZE_4K,
                        block_size=4096),
    ]


# ---- data and the cluster's view of it ------------------------------------------------------


def test_data_written_through_the_handler_is_what_rbd_export_reads(
    ceph: CephCluster, image: str
) -> None:
    rnd = random.Random(20)
    content = bytearray(rnd.randbytes(IMAGE_SIZE))
    with serve(ceph, image) as t:
        futures, lba, total = [], 0, IMAGE_SIZE // BS
        while lba < total:  # odd sizes, up to the transfer limit, 16 in flight
            n = min(rnd.randint(1, t.device.state.max_xfer_len), total - lba)
            futures.append(t.submit_nowait(cdb.write16(lba, n), bytes(content[lba * BS:(lba + n) * BS])))
            if len(futures) >= 16:
                cdb.expect_good(futures.pop(0).result(30), "WRITE (16)")
            lba += n
        for f in futures:
            cdb.expect_good(f.result(30), "WRITE (16)")
        cdb.expect_good(t.submit(cdb.synchronize_cache16()), "SYNCHRONIZE CACHE")
    exported = ceph.export(image)
    assert len(exported) == IMAGE_SIZE
    assert exported == content, f"rbd export differs from byte {first_difference(exported, content)}"


def test_scattered_buffers_go_through_librbd_vectored_calls_and_read_back(
    ceph: CephCluster, image: str
) -> None:
    cfg = dev_config(ceph, image)[len("rbd/"):]
    h = RbdHandler()
    h.open(DeviceInfo("vec", cfg, RbdHandler.parse_config(cfg), BS, IMAGE_SIZE // BS), False)
    rnd = random.Random(21)

    def pieces(buf: bytearray, cuts: list[int]) -> list[memoryview]:
        view = memoryview(buf)
        return [view[a:b] for a, b in itertools.pairwise([0, *cuts, len(buf)])]

    async def run() -> None:
        # uneven pieces, as a ring command's iovecs can be
        src = bytearray(rnd.randbytes(96 * 1024))
        await h.write(4096, len(src), pieces(src, [100, 4096, 5000, 65536]), False)
        dst = bytearray(len(src))
        await h.read(4096, len(dst), pieces(dst, [7, 30000, 90000]))
        assert dst == src
        # more pieces than librbd accepts in one vector: gathered, then scattered
        many = bytearray(rnd.randbytes(1100 * BS))
        await h.write(1 << 20, len(many), pieces(many, list(range(BS, len(many), BS))), False)
        back = bytearray(len(many))
        await h.read(1 << 20, len(back), pieces(back, list(range(BS, len(back), BS))))
        assert back == many
        # buffers longer than the transfer: only ``length`` bytes move
        long = bytearray(b"\xab" * 8192)
        await h.write(0, 4096, [memoryview(long)], False)
        out = bytearray(8192)
        await h.read(0, 4096, [memoryview(out)])
        assert out == b"\xab" * 4096 + bytes(4096)

    try:
        asyncio.run(run())
    finally:
        h.close()


def test_unmap_of_whole_objects_frees_them_and_reads_back_zeroes(
    ceph: CephCluster, image: str
) -> None:
    obj = 4 << 20  # the default object size
    with ceph.image(image) as img:
        prefix = img.block_name_prefix()
    objects = [f"{prefix}.{i:016x}" for i in range(2)]
    with serve(ceph, image) as t:
        rnd = random.Random(22)
        for lba in range(0, 2 * obj // BS, 128):
            t.write(lba, rnd.randbytes(128 * BS))
        with ceph.admin.open_ioctx(POOL) as io:
            for o in objects:
                io.stat(o)  # both objects exist
            # all of object 0, and 4 KiB of object 1 (less than rbd_discard_granularity_bytes)
            unmap_cdb, params = cdb.unmap([(0, obj // BS), (obj // BS + 8, 8)])
            cdb.expect_good(t.submit(unmap_cdb, params), "UNMAP")
            assert t.read(0, 128) == bytes(128 * BS)
            assert t.read(obj // BS + 8, 8) == bytes(8 * BS)  # zeroes even below the granularity
            assert t.read(obj // BS, 8) != bytes(8 * BS)  # its neighbours are untouched
            import rados

            with pytest.raises(rados.ObjectNotFound):
                io.stat(objects[0])


def test_the_device_is_in_the_service_map_as_tcmu_runner_with_its_status(
    ceph: CephCluster, image: str
) -> None:
    ceph.wait_for_mgr()
    daemon = f"{os.uname().nodename}:{POOL}/{image}"
    with serve(ceph, image) as t:
        t.write(0, b"\x01" * BS)  # takes the exclusive lock: lock_owner becomes true
        deadline, status, entry = time.monotonic() + 30, {}, {}
        while time.monotonic() < deadline and not (status.get("lock_owner") == "true" and entry):
            time.sleep(0.5)
            status = ceph.service_status().get("tcmu-runner", {}).get(daemon, {}).get("status", {})
            entry = ceph.service_map()["services"].get("tcmu-runner", {}).get("daemons", {}).get(daemon, {})
        assert entry, f"{daemon} is not in the service map"
        with ceph.image(image) as img:
            image_id = img.id()
        meta = entry["metadata"]
        assert (meta["pool_name"], meta["image_name"], meta["image_id"]) == (POOL, image, image_id)
        assert status == {"lock_owner": "true", "lock_lost_cnt": "0", "conn_lost_cnt": "0",
                          "cmd_timed_out_cnt": "0"}
        # `ceph -s` shows the mgr's digest of the service map, refreshed on its own tick
        summary = ""
        while time.monotonic() < deadline + 30:
            summary = ceph.cli("ceph", "-s")
            if "tcmu-runner: 1 daemon active" in summary:
                break
            time.sleep(1)
        assert "tcmu-runner: 1 daemon active" in summary, summary


# ---- open-time errors: one clear line each ---------------------------------------------------


def open_error(dev_cfg: str, size: int = IMAGE_SIZE) -> AttachError:
    with pytest.raises(AttachError) as info:
        prepare({"rbd": RbdHandler}, name="bad0", dev_config=dev_cfg, geometry=Geometry(size))
    return info.value


def test_wrong_pool_image_key_user_and_size_each_fail_with_their_own_line(
    ceph: CephCluster, image: str, tmp_path: object
) -> None:
    bad_key = ceph.variant_conf("badkey", keyring=str(ceph.dir / "bad.keyring"))
    (ceph.dir / "bad.keyring").write_text(
        "[client.admin]\n\tkey = AQBx2CBmAAAAABAAcD1w3p5Q0o1Yd0Rk0J8m3w==\n")
    errors = {
        "pool": open_error(f"rbd/nosuchpool/{image};conf={ceph.conf}"),
        "image": open_error(dev_config(ceph, "nosuchimage")),
        "key": open_error(f"rbd/{POOL}/{image};conf={bad_key}"),
        "user": open_error(dev_config(ceph, image, ";id=nosuchuser")),
        "size": open_error(dev_config(ceph, image), size=IMAGE_SIZE // 2),
        "conf": open_error(f"rbd/{POOL}/{image};conf={ceph.dir}/missing.conf"),
    }
    expect = {
        "pool": "pool 'nosuchpool' does not exist",
        "image": "image 'nosuchimage' does not exist in pool 'rbd'",
        "key": "the Ceph monitors refused client.admin: unknown user or wrong key",
        "user": "the Ceph monitors refused client.nosuchuser",
        "size": f"is {IMAGE_SIZE} bytes but the device is {IMAGE_SIZE // 2} bytes",
        "conf": "cannot read the Ceph config",
    }
    for what, err in errors.items():
        text = str(err)
        assert "\n" not in text and "Traceback" not in text, text
        assert expect[what] in text, f"{what}: {text}"
    assert len({str(e) for e in errors.values()}) == len(errors)
    causes = {what: getattr(err.__cause__, "errno", None) for what, err in errors.items()}
    assert causes == {"pool": errno.ENOENT, "image": errno.ENOENT, "key": errno.EACCES,
                      "user": errno.EACCES, "size": errno.EINVAL, "conf": errno.ENOENT}


def test_an_unreachable_cluster_fails_the_open_in_bounded_time_while_other_devices_serve(
    ceph: CephCluster, image: str
) -> None:
    dead = ceph.variant_conf("nomon", mon_host=f"127.0.0.1:{free_port()}", client_mount_timeout="3")
    with SimTarget(RamHandler, "ram/", size=1 << 20) as ram:
        failure: list[BaseException] = []

        def attach() -> None:  # the daemon opens handlers on a worker thread, like this
            try:
                prepare({"rbd": RbdHandler}, name="dead0", dev_config=dev_config(ceph, image)
                        .replace(ceph.conf, dead), geometry=Geometry(IMAGE_SIZE))
            except BaseException as e:  # noqa: BLE001 - inspected below
                failure.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=attach)
        worker.start()
        served = 0
        while worker.is_alive():  # the loop keeps serving the ram device meanwhile
            s0 = time.monotonic()
            ram.write(served % 2048, b"\x5a" * BS)
            assert ram.read(served % 2048, 1) == b"\x5a" * BS
            assert time.monotonic() - s0 < 1.0
            served += 1
        elapsed = time.monotonic() - t0
    assert served > 10
    assert elapsed < 10, f"the failed open took {elapsed:.1f} s"
    [err] = failure
    assert isinstance(err, AttachError)
    assert "no answer from the Ceph monitors" in str(err) and "within 3 s" in str(err), str(err)
    assert "\n" not in str(err)


# ---- faults while serving ----------------------------------------------------------------------


def test_a_paused_osd_fails_commands_within_osd_op_timeout_and_io_resumes_after(
    ceph: CephCluster, image: str
) -> None:
    rnd = random.Random(30)
    with serve(ceph, image, f";osd_op_timeout={OP_TIMEOUT}") as t:
        h = handler_of(t)
        assert h.osd_op_timeout == OP_TIMEOUT
        acked = {lba: rnd.randbytes(64 * BS) for lba in range(0, 1024, 64)}
        for lba, data in acked.items():
            t.write(lba, data)
        with ceph.paused_osd():
            t0 = time.monotonic()
            stuck = [t.submit_nowait(cdb.write16(lba, 64), rnd.randbytes(64 * BS))
                     for lba in range(4096, 4096 + 8 * 64, 64)]
            stuck += [t.submit_nowait(cdb.read16(lba, 64), None, 64 * BS) for lba in (0, 64)]
            # the runner answers what it can without the cluster, at once
            for _ in range(3):
                s0 = time.monotonic()
                cdb.expect_good(t.submit(bytes(6), timeout=2), "TEST UNIT READY")
                cdb.expect_good(t.submit(cdb.inquiry(96), data_in_len=96, timeout=2), "INQUIRY")
                assert time.monotonic() - s0 < 1.0
                time.sleep(0.5)
            results = [f.result(OP_TIMEOUT + 10) for f in stuck]
            waited = time.monotonic() - t0
            assert waited < OP_TIMEOUT + 5, f"commands took {waited:.1f} s to fail"
            for res in results:  # BUSY (ETIMEDOUT) or a CHECK CONDITION: never GOOD, never lost
                assert res.status in (0x08, 0x02), f"status {res.status:#x}"
            assert h.counters["cmd_timed_out_cnt"] >= 1
        # after the resume the initiator's retries get through, and nothing acked is lost
        wait_for_good(t, 8192, b"\x77" * (8 * BS), within=30)
        for lba, data in acked.items():
            assert t.read(lba, 64) == data, f"acknowledged write at lba {lba} lost"
        assert t.read(8192, 8) == b"\x77" * (8 * BS)


def test_a_blocklisted_client_is_fenced_then_recovers_by_reopening(
    ceph: CephCluster, image: str
) -> None:
    with serve(ceph, image) as t:
        h = handler_of(t)
        t.write(0, b"\x11" * (8 * BS))  # takes the exclusive lock
        import rbd

        with ceph.image(image) as other:  # another gateway takes over: breaks our lock
            [owner] = other.lock_get_owners()
            other.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, owner["owner"])
        assert any(addr in owner["owner"] or owner["owner"] in addr for addr in ceph.blocklist())

        res = t.submit(cdb.write16(8, 8), b"\x22" * (8 * BS))
        assert res.status == 0x02 and sense_of(res) == (NOT_READY, *FENCED), res
        recovered_in = wait_for_good(t, 8, b"\x33" * (8 * BS), within=60)
        assert t.read(0, 16) == b"\x11" * (8 * BS) + b"\x33" * (8 * BS)
        assert h.counters["lock_lost_cnt"] == 1 and h.counters["conn_lost_cnt"] == 1
        assert recovered_in < 30
        # the reopened client removed its fenced predecessor from the blocklist
        assert not any(owner["owner"].split("/")[-1] in a for a in ceph.blocklist())


def test_another_client_holding_the_lock_fences_writes_until_it_lets_go(
    ceph: CephCluster, image: str
) -> None:
    import rbd

    with serve(ceph, image) as t:
        t.write(0, b"\x44" * BS)
        with ceph.image(image) as other:
            other.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)  # asked for, handed over
            res = t.submit(cdb.write16(1, 1), b"\x55" * BS)
            assert res.status == 0x02 and sense_of(res) == (NOT_READY, *FENCED), res
            assert t.read(0, 1) == b"\x44" * BS  # reads still work
            other.lock_release()
        wait_for_good(t, 1, b"\x66" * BS, within=30)
        assert t.read(0, 2) == b"\x44" * BS + b"\x66" * BS
        assert handler_of(t).counters["conn_lost_cnt"] == 0  # fenced, not reopened


# ---- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (f";osd_op_timeout={OP_TIMEOUT}", OP_TIMEOUT),
        # not above heartbeat grace + interval: forced to grace + interval + 5, as tcmu-runner
        (";osd_op_timeout=2", 3 + 1 + 5),
        ("", 3 + 1 + 5),
    ],
)
def test_osd_op_timeout_follows_tcmu_runners_rule(
    ceph: CephCluster, image: str, option: str, expected: int
) -> None:
    with serve(ceph, image, option) as t:
        assert handler_of(t).osd_op_timeout == expected


def test_a_user_given_by_id_opens_the_image_with_its_own_key(ceph: CephCluster, image: str) -> None:
    keyring = ceph.make_user("iscsi")
    conf = ceph.variant_conf("iscsi", keyring=str(keyring))
    with SimTarget(RbdHandler, f"rbd/{POOL}/{image};conf={conf};id=iscsi", size=IMAGE_SIZE) as t:
        t.write(3, b"\x99" * BS)
        assert t.read(3, 1) == b"\x99" * BS


def test_resize_by_reconfig_grows_the_image_and_refuses_to_shrink_it(
    ceph: CephCluster, image: str
) -> None:
    with serve(ceph, image) as t:
        h = handler_of(t)
        h.reconfig("size", IMAGE_SIZE)  # unchanged: fine
        h.reconfig("size", 2 * IMAGE_SIZE)
        with ceph.image(image) as img:
            assert img.size() == 2 * IMAGE_SIZE
        assert h.dev.num_lbas == 2 * IMAGE_SIZE // BS  # a reopen now expects the new size
        with pytest.raises(OSError) as info:
            h.reconfig("size", IMAGE_SIZE)
        assert info.value.errno == errno.EINVAL and "shrink" in str(info.value)
        with pytest.raises(OSError):
            h.reconfig("write_cache", True)
        h.reconfig("write_cache", False)
