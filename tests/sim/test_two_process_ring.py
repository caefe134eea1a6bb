"""The ring shared across two processes, as with the real kernel: the simulated kernel
in a forked process keeps 32 commands in flight against the production engine (the ram
handler's in-line C path and the file handler's C worker threads).

This is where ordering bugs show (a torn cmd_head once made the runner walk into
unwritten entries): concurrency that the single-process tests cannot produce.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_ring", Path(__file__).resolve().parents[2] / "bench" / "ring.py"
)
assert _spec is not None and _spec.loader is not None
bench_ring = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ring)


@pytest.mark.parametrize("handler", ["ram", "file-tmpfs"])
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_a_kernel_in_another_process_never_sees_a_lost_or_failed_command(
    handler: str, write: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    commands = batches = 0.0
    for _ in range(6):
        row = bench_ring.run_case(handler, 32, 4096, write, 0.3, str(tmp_path))
        assert row["errors"] == 0
        assert row["commands"] > 0  # liveness; the rate depends on the machine's load
        commands += row["commands"]
        batches += row["commands"] / row["cmds_per_batch"]
    assert commands / batches > 1.5  # completions are batched: one wakeup each
    assert not [r for r in caplog.records if "ring walk stopped" in r.getMessage()]
