"""CheckConfig is callable by any user on the system bus, so ``parse_config`` must be pure:
no file opened, listed, created or even looked at (an existence oracle is the information
leak of tcmu-runner's 2017 glfs/qcow CheckConfig), no socket, no process.

Every handler the registry loads, plus the documented external example, parses a corpus of
good and hostile strings under a Python audit hook and wrappers of the stat family (which
raises no audit event).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tcmu_py.handler import Handler, check_config
from tcmu_py.registry import load_handlers

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "external_handler.py"
#: audit events that touch the file system, the network or other processes
WATCHED = ("open", "os.", "shutil.", "socket.", "subprocess.", "glob.", "pathlib.", "tempfile.")
_recording: list[str] | None = None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _recording is not None and event.startswith(WATCHED):
        _recording.append(f"{event}{args!r}"[:200])


sys.addaudithook(_hook)  # cannot be removed; it records only while _recording is a list

CORPUS = [
    "", "/", "//", "/tmp/x.img", "/etc/shadow", "/dev/sda", "/proc/self/environ", "../../etc/passwd",
    "/tmp/x;threads=4;direct=1;readonly=1", ";tcmur_cmd_time_out=5;/tmp/x", "pool/image",
    "rbd/image;conf=/etc/ceph/ceph.conf;id=admin;osd_op_timeout=30", "pool/image;conf=relative",
    ";hugepages=1", ";fill=255", ";fill=256", "%s%n%x", "\x00", "\x1b[31m", "\u202e", "é" * 200,
    "x;" * 500, "/" * 1000, "a=b;" * 100, "\n\r\t",
]


def handlers() -> Iterator[type[Handler]]:
    yield from load_handlers(None).values()
    spec = importlib.util.spec_from_file_location("external_handler_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.ExtRamHandler


@pytest.mark.parametrize("handler_cls", list(handlers()), ids=lambda c: c.subtype)
def test_parse_config_touches_no_file_socket_or_process(
    handler_cls: type[Handler], monkeypatch: pytest.MonkeyPatch
) -> None:
    global _recording
    looked_at: list[str] = []
    for name in ("stat", "lstat", "access", "readlink"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _n=name, _r=real, **k: (
            looked_at.append(f"os.{_n}{a!r}"), _r(*a, **k))[1])
    answers = []
    _recording = []
    try:
        for text in CORPUS:
            answers.append(check_config(handler_cls, text))
    finally:
        events, _recording = _recording, None
    assert events == [] and looked_at == [], (events + looked_at)[:5]
    assert any(ok for ok, _ in answers) and any(not ok for ok, _ in answers)
    for ok, reason in answers:
        assert isinstance(ok, bool) and isinstance(reason, str) and "Traceback" not in reason
