"""A handler process of its own (tcmu_py.external) serves its devices with the same Runner,
in non-exclusive mode, next to the host's runner -- on the simulated kernel.

The kernel takes the first reply to each netlink event (tcmu-runner #516, #678), so each
process must answer exactly its own devices: the external one only its subtype, the
host's runner everything except the subtypes registered as external.  And a runner that
(re)starts must not re-attach another process's live device: that would reset its ring.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import FakeHost, event, run, submit

from tcmu_py.control.configfs import ConfigFS
from tcmu_py.control.netlink import TcmuCmd
from tcmu_py.daemon import Runner
from tcmu_py.handler import Handler
from tcmu_py.registry import load_handlers

MiB = 1024 * 1024
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "external_handler.py"


def example_handler() -> type[Handler]:
    spec = importlib.util.spec_from_file_location("external_handler_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls: type[Handler] = module.ExtRamHandler
    return cls


@pytest.fixture
def two_runners(tmp_path: Path) -> Iterator[tuple[FakeHost, Runner, Runner, asyncio.AbstractEventLoop]]:
    """The host's runner (every built-in handler, ``extram`` registered as external) and an
    external process's runner (only ``extram``), on one simulated host."""
    h = FakeHost(tmp_path)
    add = h.add

    def add_with_actions(minor: int, name: str, dev_config: str, size: int) -> object:
        k = add(minor, name, dev_config, size)
        for action in ("block_dev", "reset_ring"):  # configfs has them; a plain tree needs them made
            (h.cfs_root / "user_1" / name / "action" / action).write_text("")
        return k

    h.add = add_with_actions  # type: ignore[method-assign,assignment]
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()

    def runner(handlers: dict[str, type[Handler]], exclusive: bool) -> Runner:
        return Runner(loop, handlers, configfs=ConfigFS(str(h.cfs_root), str(h.params)),
                      uio_root=str(h.uio_root), use_netlink=False, ring_factory=h.ring_factory,
                      exclusive=exclusive)

    host_runner = runner(load_handlers(None), exclusive=True)
    host_runner.external.add("extram")  # what a successful RegisterHandler does
    ext_runner = runner({"extram": example_handler()}, exclusive=False)
    yield h, host_runner, ext_runner, loop
    for r in (host_runner, ext_runner):
        asyncio.run_coroutine_threadsafe(r.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    h.close()


def test_each_process_answers_exactly_its_own_devices(two_runners) -> None:  # type: ignore[no-untyped-def]
    h, host_runner, ext_runner, loop = two_runners
    k_ext = h.add(0, "e0", "extram/;fill=171", 4 * MiB)
    k_ram = h.add(1, "r0", "ram/", 4 * MiB)
    added_ext = event(TcmuCmd.ADDED_DEVICE, 0, "e0", "extram/;fill=171")
    added_ram = event(TcmuCmd.ADDED_DEVICE, 1, "r0", "ram/")
    assert run(loop, host_runner.handle_event(added_ext)) is None
    assert run(loop, ext_runner.handle_event(added_ram)) is None
    assert run(loop, ext_runner.handle_event(added_ext)) == 0
    assert run(loop, host_runner.handle_event(added_ram)) == 0
    # the external process serves its device through the same engine and SCSI layer
    read10 = struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0)
    assert submit(k_ext, read10, None, 4096).data == bytes([171]) * 4096
    data = bytes(range(256)) * 16
    assert submit(k_ext, struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 8, 0), data).status == 0
    assert submit(k_ext, read10, None, 4096).data == data
    assert submit(k_ram, bytes(6)).status == 0
    assert list(ext_runner.served) == [(1, "e0")] and list(host_runner.served) == [(1, "r0")]
    removed_ext = event(TcmuCmd.REMOVED_DEVICE, 0, "e0", "extram/;fill=171")
    assert run(loop, host_runner.handle_event(removed_ext)) is None
    assert run(loop, ext_runner.handle_event(removed_ext)) == 0


def test_the_host_runner_still_fails_a_subtype_nobody_serves(two_runners) -> None:  # type: ignore[no-untyped-def]
    """Without a reply the configfs write would hang: the exclusive runner answers it."""
    h, host_runner, ext_runner, loop = two_runners
    h.add(0, "n0", "nobody/x", 4 * MiB)
    ev = event(TcmuCmd.ADDED_DEVICE, 0, "n0", "nobody/x")
    assert run(loop, ext_runner.handle_event(ev)) is None
    assert run(loop, host_runner.handle_event(ev)) == -errno.EINVAL


def test_a_starting_runner_leaves_another_processs_live_device_alone(two_runners) -> None:  # type: ignore[no-untyped-def]
    h, host_runner, ext_runner, loop = two_runners
    h.add(0, "e0", "extram/", 4 * MiB)
    h.add(1, "r0", "ram/", 4 * MiB)
    host_runner.external.clear()  # a restarted runner: nobody has registered yet
    e0 = h.cfs_root / "user_1/e0/action"
    run(loop, host_runner.start())
    assert list(host_runner.served) == [(1, "r0")]
    assert (e0 / "reset_ring").read_text() == "" and (e0 / "block_dev").read_text() == ""  # untouched
    run(loop, ext_runner.start())  # the external process re-attaches its own device
    assert list(ext_runner.served) == [(1, "e0")]
    assert (e0 / "reset_ring").read_text() == "1" and (e0 / "block_dev").read_text() == "0"
