"""The handler contract: config strings, capability discovery, class checks, error mapping."""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcmu_py.handler import (
    HANDLER_API,
    ConfigError,
    DeviceInfo,
    Handler,
    capabilities,
    check_config,
    exception_to_sense,
    implemented,
    opt_bool,
    opt_int,
    parse_options,
    pool_size,
    problems,
    split_runner_options,
)
from tcmu_py.scsi._model import Caps, SenseError, SenseKey


class Minimal(Handler):
    subtype = "minimal"

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            b[:] = bytes(len(b))

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> None:
        pass


class Thin(Minimal):
    subtype = "thin"
    native_fua = True
    lbprz = True

    def __init__(self, can_unmap: bool = True) -> None:
        self._can_unmap = can_unmap

    def flush(self) -> None:
        pass

    def unmap(self, offset: int, length: int) -> None:
        pass

    def can_unmap(self) -> bool:
        return self._can_unmap


def _dev(config: Any = None) -> DeviceInfo:
    return DeviceInfo(name="d", cfgstring="", config=config, block_size=512, num_lbas=8)


# ---- split_runner_options: tcmu-runner's dev_config rules (reference/tcmu.md §2.13) -----

SPLIT_CASES = [
    # (dev_config, subtype, handler part, runner options)
    ("file//tmp/x.img", "file", "/tmp/x.img", {}),
    ("file//tmp/x.img;threads=4", "file", "/tmp/x.img;threads=4", {}),
    ("file/;tcmur_cmd_time_out=5;/path", "file", "/path", {"tcmur_cmd_time_out": 5}),
    (
        "rbd/;tcmur_cmd_time_out=20;pool/rbd1;osd_op_timeout=30",
        "rbd",
        "pool/rbd1;osd_op_timeout=30",
        {"tcmur_cmd_time_out": 20},
    ),
    ("rbd/pool/rbd1;osd_op_timeout=30", "rbd", "pool/rbd1;osd_op_timeout=30", {}),
    ("ram/", "ram", "", {}),
    ("ram", "ram", "", {}),
    ("ram/;tcmur_cmd_time_out=7;", "ram", "", {"tcmur_cmd_time_out": 7}),
    ("ram/;tcmur_cmd_time_out=7", "ram", "", {"tcmur_cmd_time_out": 7}),
    # tcmu-runner consumes the option wherever a ';' precedes it
    ("file//p;tcmur_cmd_time_out=5", "file", "/p", {"tcmur_cmd_time_out": 5}),
    ("file//p;threads=4;tcmur_cmd_time_out=5", "file", "/p;threads=4", {"tcmur_cmd_time_out": 5}),
    # ... where it would glue the neighbours ("/pthreads=4"), we keep one separator
    ("file//p;tcmur_cmd_time_out=5;threads=4", "file", "/p;threads=4", {"tcmur_cmd_time_out": 5}),
    # only the exact spelling tcmu-runner's code matches is a runner option
    ("rbd/p/i;tcmur_cmd_timeout=5", "rbd", "p/i;tcmur_cmd_timeout=5", {}),
    ("zbc/model-HM/zsize-128@/var/z.raw", "zbc", "model-HM/zsize-128@/var/z.raw", {}),
]


@pytest.mark.parametrize(("dev_config", "subtype", "handler_cfg", "opts"), SPLIT_CASES)
def test_split_runner_options_matches_tcmu_runner(
    dev_config: str, subtype: str, handler_cfg: str, opts: dict[str, int]
) -> None:
    assert split_runner_options(dev_config) == (subtype, handler_cfg, opts)


_handler_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40).filter(
    lambda s: not any(t.startswith("tcmur_cmd_time_out=") for t in s.split(";"))
)


@given(handler_cfg=_handler_text, timeout=st.integers(0, 10_000))
def test_a_runner_option_prefix_is_removed_and_the_rest_reaches_the_handler_intact(
    handler_cfg: str, timeout: int
) -> None:
    dev_config = f"rbd/;tcmur_cmd_time_out={timeout};{handler_cfg}"
    assert split_runner_options(dev_config) == (
        "rbd",
        handler_cfg,
        {"tcmur_cmd_time_out": timeout},
    )


@given(handler_cfg=_handler_text)
def test_a_config_without_runner_options_passes_through_unchanged(handler_cfg: str) -> None:
    assert split_runner_options(f"file/{handler_cfg}") == ("file", handler_cfg, {})


@pytest.mark.parametrize(
    ("dev_config", "token"),
    [
        ("/x", "/x"),
        ("file/;tcmur_cmd_time_out=abc;/p", "tcmur_cmd_time_out=abc"),
        ("file/;tcmur_cmd_time_out=-1;/p", "tcmur_cmd_time_out=-1"),
    ],
)
def test_split_runner_options_names_the_bad_token(dev_config: str, token: str) -> None:
    with pytest.raises(ConfigError) as info:
        split_runner_options(dev_config)
    assert info.value.token == token
    assert repr(token) in str(info.value)


# ---- option parsing helpers ---------------------------------------------------------

SPEC = {"threads": opt_int(1, 64), "direct": opt_bool}


def test_parse_options_converts_known_options_and_ignores_empty_tokens() -> None:
    assert parse_options("/p;threads=4;;direct=yes;", SPEC) == (
        "/p",
        {"threads": 4, "direct": True},
    )
    assert parse_options("", SPEC) == ("", {})


@pytest.mark.parametrize(
    ("cfg", "token", "words"),
    [
        ("/p;bogus=1", "bogus=1", "unknown option 'bogus'"),
        ("/p;threads", "threads", "needs a value"),
        ("/p;threads=0", "threads=0", "from 1 to 64"),
        ("/p;threads=x", "threads=x", "whole number"),
        ("/p;direct=maybe", "direct=maybe", "1 or 0"),
        ("/p;threads=2;threads=3", "threads=3", "twice"),
    ],
)
def test_parse_options_errors_name_the_token(cfg: str, token: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_options(cfg, SPEC)
    assert info.value.token == token
    assert repr(token) in str(info.value) and words in str(info.value)


def test_config_error_is_a_value_error_carrying_token_and_reason() -> None:
    e = ConfigError("threads=0", "must be positive")
    assert isinstance(e, ValueError)
    assert (e.token, e.reason, str(e)) == (
        "threads=0",
        "must be positive",
        "'threads=0': must be positive",
    )


# ---- the base class and DeviceInfo ------------------------------------------------------


def test_device_info_size_is_block_size_times_lbas() -> None:
    assert DeviceInfo("d", "", None, 4096, 256).size == 1 << 20


def test_base_class_defaults_parse_nothing_keep_dev_and_refuse_writes() -> None:
    assert HANDLER_API == 1 and Minimal.api_version == HANDLER_API
    assert Minimal.thread_model == "inline" and Minimal.threads == 2
    assert Handler.parse_config("anything;at=all") == "anything;at=all"
    h = Minimal()
    dev = _dev()
    h.open(dev, reopen=False)
    assert h.dev is dev
    h.close()
    with pytest.raises(OSError) as info:
        Handler.write(h, 0, 512, [memoryview(bytearray(512))], fua=False)
    assert info.value.errno == errno.EROFS


# ---- capability discovery ---------------------------------------------------------------


def test_optional_methods_are_found_once_per_class() -> None:
    assert implemented(Minimal) == frozenset()
    assert implemented(Thin) == {"flush", "unmap"}
    assert implemented(Thin) is implemented(Thin)


def test_capabilities_follow_methods_and_can_overrides() -> None:
    assert capabilities(Minimal, Minimal()) == Caps()
    assert capabilities(Thin, Thin()) == Caps(flush=True, unmap=True, lbprz=True, fua=True)
    # can_unmap() False hides UNMAP, and LBPRZ with it
    assert capabilities(Thin, Thin(can_unmap=False)) == Caps(flush=True, fua=True)


def test_readonly_comes_from_the_instance_or_the_parsed_config() -> None:
    @dataclass
    class Cfg:
        readonly: bool

    h = Minimal()
    h.open(_dev(Cfg(readonly=True)), reopen=False)
    assert capabilities(Minimal, h).readonly
    assert capabilities(Minimal, Minimal(), {"readonly": True}).readonly
    assert not capabilities(Minimal, Minimal(), {"readonly": False}).readonly
    ro = Minimal()
    ro.readonly = True
    assert capabilities(Minimal, ro).readonly


def test_pool_size_takes_threads_from_the_config_else_the_class() -> None:
    @dataclass
    class Cfg:
        threads: int | None

    assert pool_size(Minimal, Cfg(threads=6)) == 6
    assert pool_size(Minimal, Cfg(threads=None)) == 2
    assert pool_size(Minimal, {"threads": 3}) == 3
    assert pool_size(Minimal, "a string config") == 2


# ---- class checks the registry relies on ------------------------------------------------


def _problems_of(**attrs: Any) -> list[str]:
    return problems(type("Plugin", (Minimal,), attrs))


def test_a_complete_handler_has_no_problems() -> None:
    assert problems(Minimal) == []
    assert problems(Thin) == []


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"api_version": 2}, "api_version is 2"),
        ({"subtype": ""}, "no subtype"),
        ({"subtype": "a/b"}, "may not contain"),
        ({"thread_model": "fibers"}, "thread_model 'fibers'"),
        ({"threads": 0}, "threads must be a positive int"),
        ({"read": Handler.read}, "read() is not implemented"),
        ({"write": Handler.write}, "write() is not implemented"),
        ({"lock": lambda self, tag: None}, "but not get_lock_state, get_lock_tag, unlock"),
    ],
)
def test_problems_name_what_to_fix(attrs: dict[str, Any], words: str) -> None:
    found = _problems_of(**attrs)
    assert len(found) == 1 and words in found[0], found


def test_a_readonly_handler_needs_no_write() -> None:
    assert _problems_of(write=Handler.write, readonly=True) == []


def test_problems_refuse_what_is_not_a_handler_class() -> None:
    assert "not a subclass" in problems(object)[0]
    assert "not a subclass" in problems(Minimal())[0]


# ---- D-Bus CheckConfig ------------------------------------------------------------------


class Strict(Minimal):
    subtype = "strict"

    @classmethod
    def parse_config(cls, cfgstring: str) -> str:
        if cfgstring == "boom":
            raise RuntimeError("bug")
        if cfgstring != "ok":
            raise ConfigError(cfgstring, "expected ok")
        return cfgstring


def test_check_config_answers_like_the_dbus_method(caplog: pytest.LogCaptureFixture) -> None:
    assert check_config(Strict, "ok") == (True, "success")
    assert check_config(Strict, ";tcmur_cmd_time_out=5;ok") == (True, "success")
    assert check_config(Strict, "nope") == (False, "'nope': expected ok")
    with caplog.at_level(logging.ERROR):
        ok, why = check_config(Strict, "boom")
    assert not ok and "RuntimeError: bug" in why
    assert len(caplog.records) == 1


# ---- errors at the boundary -------------------------------------------------------------


def test_a_sense_error_passes_through_unchanged() -> None:
    e = SenseError(SenseKey.MISCOMPARE, 0x1D, info=17)
    assert exception_to_sense(e, "ram", "compare_and_write") is e


def test_an_unexpected_exception_is_one_log_line_and_hardware_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="tcmu_py.handler"):
        sense = exception_to_sense(KeyError("lba"), "myhandler", "read")
    assert (sense.key, sense.asc, sense.ascq) == (SenseKey.HARDWARE_ERROR, 0x44, 0)
    [record] = caplog.records
    assert "myhandler" in record.getMessage() and "read()" in record.getMessage()
    assert record.exc_info is None  # no traceback above debug level


def test_an_oserror_is_mapped_through_the_scsi_errno_table() -> None:
    sense = exception_to_sense(OSError(errno.EIO, "io"), "file", "read")
    assert sense.key == SenseKey.MEDIUM_ERROR
