"""Attaching one device: config string → handler instance → SCSI state → engine.

The daemon (netlink ADDED, re-attach after a restart) and the simulated-kernel harness
both come through :func:`open_device`, so what tests exercise is what production runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tcmu_py.engine import Device, Engine
from tcmu_py.handler import (
    ConfigError,
    DeviceInfo,
    Handler,
    capabilities,
    pool_size,
    split_runner_options,
)
from tcmu_py.ring import Ring
from tcmu_py.scsi._model import Caps, DeviceState

log = logging.getLogger("tcmu_py.attach")

__all__ = ["AttachError", "Geometry", "Prepared", "open_device", "prepare", "start"]


class AttachError(Exception):
    """A device that cannot be served; the message is the one log line an admin reads."""


class Geometry:
    """What configfs says about a device (§2.2: hw_block_size, info Size, hw_max_sectors)."""

    __slots__ = ("block_size", "max_xfer_len", "size", "unit_serial", "write_cache")

    def __init__(
        self,
        size: int,
        block_size: int = 512,
        max_xfer_len: int = 128,
        unit_serial: str = "",
        write_cache: bool = False,
    ) -> None:
        if block_size <= 0 or size % block_size:
            raise AttachError(f"size {size} is not a multiple of the block size {block_size}")
        self.size = size
        self.block_size = block_size
        self.max_xfer_len = max_xfer_len
        self.unit_serial = unit_serial
        self.write_cache = write_cache


@dataclass
class Prepared:
    """A handler opened for a device, not yet serving (the blocking half of an attach)."""

    cls: type[Handler]
    inst: Handler
    config: Any
    info: DeviceInfo
    caps: Caps
    runner_opts: dict[str, Any]
    name: str
    dev_config: str
    geometry: Geometry


def prepare(
    handlers: Mapping[str, type[Handler]],
    *,
    name: str,
    dev_config: str,
    geometry: Geometry,
    reopen: bool = False,
) -> Prepared:
    """Parse the config string and open the handler.  May block (rbd connects), so the
    daemon runs it on a worker thread; it touches no ring and no loop state.

    Raises :class:`AttachError` with a one-line reason (unknown subtype, bad config
    string, handler open failure); nothing is left open.
    """
    try:
        subtype, handler_cfg, runner_opts = split_runner_options(dev_config)
    except ConfigError as e:
        raise AttachError(f"{name}: bad config string {dev_config!r}: {e}") from None
    cls = handlers.get(subtype)
    if cls is None:
        known = ", ".join(sorted(handlers)) or "none"
        raise AttachError(f"{name}: no handler for subtype {subtype!r} (loaded: {known})")
    try:
        config = cls.parse_config(handler_cfg)
    except ConfigError as e:
        raise AttachError(f"{name}: {subtype} config string refused: {e}") from None
    info = DeviceInfo(
        name=name,
        cfgstring=handler_cfg,
        config=config,
        block_size=geometry.block_size,
        num_lbas=geometry.size // geometry.block_size,
        max_xfer_len=geometry.max_xfer_len,
        write_cache=geometry.write_cache,
        unit_serial=geometry.unit_serial,
    )
    inst = cls()
    try:
        inst.open(info, reopen)
    except Exception as e:
        raise AttachError(f"{name}: {subtype} handler could not open {handler_cfg!r}: {e}") from e
    try:
        caps = capabilities(cls, inst, config)
    except Exception:
        inst.close()
        raise
    return Prepared(
        cls=cls, inst=inst, config=config, info=info, caps=caps, runner_opts=runner_opts,
        name=name, dev_config=dev_config, geometry=geometry,
    )


def start(engine: Engine, ring: Ring, p: Prepared) -> Device:
    """Wire a prepared handler to its ring and start serving (loop thread only)."""
    try:
        g = p.geometry
        wce = getattr(p.inst, "write_cache", None)
        state = DeviceState(
            name=p.name,
            cfgstring=p.dev_config,
            block_size=g.block_size,
            num_lbas=p.info.num_lbas,
            max_xfer_len=g.max_xfer_len,
            unit_serial=g.unit_serial,
            write_cache=g.write_cache if wce is None else bool(wce),
            solid_state=bool(getattr(p.inst, "solid_state", False)),
            caps=p.caps,
        )
        dev = Device(
            engine,
            ring,
            state,
            p.inst,
            thread_model=p.cls.thread_model,
            threads=pool_size(p.cls, p.config),
        )
        dev.runner_opts = p.runner_opts
        dev.info = p.info
        dev.cmd_time_out = float(p.runner_opts.get("tcmur_cmd_time_out") or 0)
        state.lookup_by_naa = engine.lookup_by_naa
        engine.add_device(dev)
        dev.native_acquire()
    except Exception:
        p.inst.close()
        raise
    log.info("%s: serving %s (%d bytes, block %d)", p.name, p.dev_config, g.size, g.block_size)
    return dev


def open_device(
    engine: Engine,
    ring: Ring,
    handlers: Mapping[str, type[Handler]],
    *,
    name: str,
    dev_config: str,
    geometry: Geometry,
    reopen: bool = False,
) -> Device:
    """:func:`prepare` then :func:`start`, in the calling (loop) thread."""
    p = prepare(handlers, name=name, dev_config=dev_config, geometry=geometry, reopen=reopen)
    return start(engine, ring, p)
