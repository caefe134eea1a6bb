"""Fixtures for the pure tier.

The SCSI table tests talk to a device only through ``scsi_device`` (make one) and
``scsi_run`` (submit a CDB, get status/sense/data back).  Here they run on the in-memory
executor of ``tests/scsi_exec.py``; swapping these two fixtures runs the very same tables
through the simulated kernel and a real handler.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# tests/ holds helpers shared by several tiers (scsi_exec); make it importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scsi_exec import MemDevice, Response, execute


@pytest.fixture
def scsi_device() -> Callable[..., MemDevice]:
    """Factory: ``scsi_device(num_lbas=128, block_size=512, caps=None, **DeviceState)``."""
    return MemDevice.make


@pytest.fixture
def scsi_run() -> Callable[..., Response]:
    """``scsi_run(dev, cdb, data_out=b"", alloc_len=0) -> Response(status, sense, data)``."""

    def run(dev: Any, cdb: bytes, data_out: bytes = b"", alloc_len: int = 0) -> Response:
        return execute(dev, cdb, data_out, alloc_len)

    return run
