"""Serve any handler on the simulated kernel, through the production engine.

:class:`SimTarget` is what tests, benchmarks and handler authors use: it builds a
:class:`~tcmu_py.sim.kernel.SimKernel`, maps its ring with the production
:class:`~tcmu_py.ring.Ring`, attaches the handler with
:func:`~tcmu_py.attach.open_device` on an engine loop running in a background thread,
and offers "submit this CDB, get status, sense and data back" plus block helpers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from tcmu_py.attach import Geometry, open_device
from tcmu_py.engine import Device, Engine
from tcmu_py.handler import Handler
from tcmu_py.ring import Ring
from tcmu_py.sim.kernel import SimKernel, SimResult

__all__ = ["ScsiError", "SimTarget"]


class ScsiError(Exception):
    """A block helper's command did not end GOOD."""

    def __init__(self, res: SimResult, what: str) -> None:
        key = res.sense[2] & 0xF if len(res.sense) > 2 else None
        asc = (res.sense[12], res.sense[13]) if len(res.sense) > 13 else None
        super().__init__(f"{what}: status {res.status:#04x} sense key {key} asc/ascq {asc}")
        self.result = res


class _LoopThread:
    """An asyncio loop in a daemon thread, shared by every device of one target."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcmu-loop", daemon=True)
        self.thread.start()

    def call(self, fn: Any, *args: Any, timeout: float = 30) -> Any:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def _run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(_run)
        return fut.result(timeout)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class SimTarget:
    """One handler serving one simulated device.  Use as a context manager."""

    def __init__(
        self,
        handler: type[Handler] | Mapping[str, type[Handler]],
        dev_config: str,
        *,
        size: int,
        block_size: int = 512,
        hw_max_sectors: int = 128,
        unit_serial: str | None = None,
        write_cache: bool = False,
        name: str = "sim0",
        data_size: int = 64 * 1024 * 1024,
        cmdr_size: int | None = None,
        tmr_notification: bool = False,
        engine_loop: _LoopThread | None = None,
    ) -> None:
        handlers = handler if isinstance(handler, Mapping) else {handler.subtype: handler}
        kw: dict[str, Any] = {"data_size": data_size, "tmr_notification": tmr_notification}
        if cmdr_size:
            kw["cmdr_size"] = cmdr_size
        self.kernel = SimKernel(**kw)
        self.kernel.start()
        self._own_loop = engine_loop is None
        self._lt = engine_loop or _LoopThread()
        self.loop = self._lt.loop
        geometry = Geometry(
            size,
            block_size,
            hw_max_sectors,
            unit_serial if unit_serial is not None else str(uuid.uuid4()),
            write_cache,
        )
        self.block_size = block_size
        self.num_lbas = size // block_size

        def _attach() -> Device:
            engine = getattr(self.loop, "_tcmu_engine", None)
            if engine is None:
                engine = Engine(self.loop)
                self.loop._tcmu_engine = engine  # type: ignore[attr-defined]
            ring = Ring(self.kernel.user_fd, self.kernel.map_size, map_fd=self.kernel.memfd)
            try:
                return open_device(
                    engine, ring, handlers, name=name, dev_config=dev_config, geometry=geometry
                )
            except Exception:
                ring.close()
                raise

        try:
            self.device: Device = self._lt.call(_attach)
        except Exception:
            self.kernel.close()
            if self._own_loop:
                self._lt.stop()
            raise
        self.engine: Engine = self.device.engine

    # -- commands ---------------------------------------------------------------------
    def submit_nowait(
        self, cdb: bytes, data_out: bytes | memoryview | None = None, data_in_len: int = 0
    ) -> concurrent.futures.Future[SimResult]:
        fut: concurrent.futures.Future[SimResult] = concurrent.futures.Future()
        self.kernel.queue(cdb, data_out, data_in_len, fut.set_result)
        return fut

    def submit(
        self,
        cdb: bytes,
        data_out: bytes | memoryview | None = None,
        data_in_len: int = 0,
        timeout: float = 30,
    ) -> SimResult:
        """Send one CDB and wait for (status, sense, data-in)."""
        return self.submit_nowait(cdb, data_out, data_in_len).result(timeout)

    async def submit_async(
        self, cdb: bytes, data_out: bytes | memoryview | None = None, data_in_len: int = 0
    ) -> SimResult:
        return await asyncio.wrap_future(self.submit_nowait(cdb, data_out, data_in_len))

    # -- block helpers ----------------------------------------------------------------
    def read(self, lba: int, nblocks: int) -> bytes:
        cdb = struct.pack(">BBQIBB", 0x88, 0, lba, nblocks, 0, 0)
        res = self.submit(cdb, None, nblocks * self.block_size)
        if res.status:
            raise ScsiError(res, f"READ(16) lba {lba} n {nblocks}")
        return res.data

    def write(self, lba: int, data: bytes, fua: bool = False) -> None:
        n = len(data) // self.block_size
        cdb = struct.pack(">BBQIBB", 0x8A, 0x08 if fua else 0, lba, n, 0, 0)
        res = self.submit(cdb, data)
        if res.status:
            raise ScsiError(res, f"WRITE(16) lba {lba} n {n}")

    def flush(self) -> None:
        res = self.submit(struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0))
        if res.status:
            raise ScsiError(res, "SYNCHRONIZE CACHE(16)")

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        dev = self.device

        async def _detach() -> None:
            if not await dev.drain_inflight(10):
                dev.fail_inflight()  # answer BUSY; a late handler result is dropped
            dev.engine.detach(dev)
            dev.ring.flush()
            dev.native_release()
            dev.handler.close()
            if dev.pool is not None:
                dev.pool.shutdown(wait=False)
            dev.ring.close()

        try:
            self._lt.run(_detach())
        finally:
            if self._own_loop:
                self._lt.stop()
            self.kernel.close()

    def __enter__(self) -> SimTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
