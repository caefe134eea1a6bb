"""The pure rules of the D-Bus contract: which subtypes may be published, which CheckConfig
strings may reach a handler, and that every refusal says what to change."""

from __future__ import annotations

import pytest

from tcmu_py.dbus_api import (
    KERNEL_CONFIG_MAX_BYTES,
    MAX_CONFIG_CHARS,
    clip,
    config_problem,
    external_name,
    external_path,
    handler_path,
    subtype_problem,
)


def test_names_and_paths_are_tcmu_runners() -> None:
    assert handler_path("rbd") == "/org/kernel/TCMUService1/rbd"
    assert external_name("syn") == "org.kernel.TCMUService1.HandlerManager1.syn"
    assert external_path("syn") == "/org/kernel/TCMUService1/HandlerManager1/syn"


@pytest.mark.parametrize("subtype", ["rbd", "file", "ram", "zbc", "my_disk", "_x", "A" * 64])
def test_ordinary_subtypes_may_be_published(subtype: str) -> None:
    assert subtype_problem(subtype) is None


@pytest.mark.parametrize(
    ("subtype", "why"),
    [("HandlerManager1", "reserved"), ("", "malformed"), ("my-disk", "malformed"),
     ("9lives", "malformed"), ("a/b", "malformed"), ("a.b", "malformed"), ("A" * 65, "malformed"),
     ("é", "malformed"), ("x\n", "malformed")],
)
def test_subtypes_that_cannot_be_a_path_and_name_element_are_refused(subtype: str, why: str) -> None:
    problem = subtype_problem(subtype)
    assert problem is not None and why in problem


@pytest.mark.parametrize(
    ("configstr", "rest"),
    [("file//tmp/x", "/tmp/x"), ("file/", ""), ("file/;tcmur_cmd_time_out=5;/x", ";tcmur_cmd_time_out=5;/x"),
     ("file/" + "a" * (KERNEL_CONFIG_MAX_BYTES - 5), "a" * (KERNEL_CONFIG_MAX_BYTES - 5))],
)
def test_the_handler_gets_what_follows_its_subtype(configstr: str, rest: str) -> None:
    assert config_problem("file", configstr) == (rest, None)


@pytest.mark.parametrize(
    ("configstr", "why"),
    [
        ("x" * (MAX_CONFIG_CHARS + 1), "config string too long: 4097 characters"),
        ("file/" + "a" * (KERNEL_CONFIG_MAX_BYTES - 4), "256 bytes"),
        ("file/" + "€" * 84, "257 bytes"),  # 89 characters, 257 UTF-8 bytes
        ("/tmp/x", "expected 'file/<config>'"),
        ("files//tmp/x", "expected 'file/<config>'"),
        ("file", "expected 'file/<config>'"),
        ("", "expected 'file/<config>'"),
        ("file//a,b", "contains ','"),
        ("file//a\nb", "contains a newline"),
    ],
)
def test_strings_the_kernel_would_cut_or_split_are_refused(configstr: str, why: str) -> None:
    rest, problem = config_problem("file", configstr)
    assert rest == "" and problem is not None and why in problem, problem


def test_refusals_never_echo_an_untrusted_string_in_full() -> None:
    _, problem = config_problem("file", "/" + "z" * 4000)
    assert problem is not None and len(problem) < 250 and "..." in problem
    assert clip("abc", 3) == "abc" and clip("abcd", 3) == "..." and len(clip("x" * 5000)) == 1024
