"""The rbd handler's config string, as tcmu-runner and ceph-iscsi write it (pure: no
librbd, no cluster -- D-Bus CheckConfig runs this on hosts without Ceph)."""

from __future__ import annotations

import pytest

from tcmu_py.handler import ConfigError, check_config, split_runner_options
from tcmu_py_handlers.rbd import RbdConfig, RbdHandler

parse = RbdHandler.parse_config


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ("rbd/img0", RbdConfig("rbd", "img0")),
        # targetcli's README example and ceph-iscsi's exact string
        ("pool/rbd1;osd_op_timeout=30", RbdConfig("pool", "rbd1", osd_op_timeout=30.0)),
        ("rbd/disk_1;osd_op_timeout=30;conf=/etc/ceph/ceph2.conf",
         RbdConfig("rbd", "disk_1", 30.0, "/etc/ceph/ceph2.conf")),
        ("p/i;id=iscsi", RbdConfig("p", "i", user="iscsi")),
        ("p/i;id=client.iscsi", RbdConfig("p", "i", user="iscsi")),  # librados adds "client."
        ("p/i;conf=/x.conf;id=u;osd_op_timeout=2.5", RbdConfig("p", "i", 2.5, "/x.conf", "u")),
        ("/p/i", RbdConfig("p", "i")),  # README's "/pool_name/image_name": strtok skips it
        ("p/i;;", RbdConfig("p", "i")),  # empty tokens are ignored, as by strtok
    ],
)
def test_config_strings_tcmu_runner_accepts_parse(cfg: str, expected: RbdConfig) -> None:
    assert parse(cfg) == expected


@pytest.mark.parametrize(
    ("cfg", "token", "says"),
    [
        ("", "", "expected pool/image"),
        ("rbd", "rbd", "expected pool/image"),
        ("rbd/", "rbd/", "no image name"),
        ("/img", "img", "expected pool/image"),
        ("p/ns/img", "p/ns/img", "may not contain '/'"),
        ("p/i;osd_op_timeout=", "osd_op_timeout=", "needs a value"),
        ("p/i;osd_op_timeout=soon", "osd_op_timeout=soon", "number of seconds"),
        ("p/i;osd_op_timeout=-3", "osd_op_timeout=-3", "positive"),
        ("p/i;conf=ceph.conf", "conf=ceph.conf", "absolute path"),
        ("p/i;id=", "id=", "needs a value"),
        ("p/i;id=a b", "id=a b", "Ceph user name"),
        ("p/i;cache=1", "cache=1", "unknown option 'cache'"),
        ("p/i;conf=/a;conf=/b", "conf=/b", "given twice"),
    ],
)
def test_bad_config_strings_name_the_bad_token(cfg: str, token: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(cfg)
    assert info.value.token == token
    assert says in str(info.value)


def test_runner_options_are_removed_before_the_handler_sees_the_string() -> None:
    subtype, handler_cfg, opts = split_runner_options(
        "rbd/;tcmur_cmd_time_out=20;pool/rbd1;osd_op_timeout=30")
    assert (subtype, opts) == ("rbd", {"tcmur_cmd_time_out": 20})
    assert parse(handler_cfg) == RbdConfig("pool", "rbd1", osd_op_timeout=30.0)


def test_check_config_answers_like_dbus_checkconfig_without_touching_ceph() -> None:
    assert check_config(RbdHandler, "pool/rbd1;osd_op_timeout=30") == (True, "success")
    ok, why = check_config(RbdHandler, "pool/rbd1;bogus=1")
    assert not ok and "bogus" in why
