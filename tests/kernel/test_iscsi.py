"""iSCSI on the guest's own 127.0.0.1: a tcmu-py-runner backstore behind LIO's iSCSI target.

One runner serves a ``user:file`` backstore (an image in /tmp). rtslib exports it as LUN 0 of
an iSCSI target: one TPG, portal 127.0.0.1:3260, CHAP enforced, an ACL for the initiator's
IQN only. The guest's open-iscsi (``iscsid`` started here, ``iscsiadm``) discovers the target
with SendTargets, logs in with one-way and then mutual CHAP, and puts an ext4 file system on
the disk: mkfs, mount, files written and synced, umount, ``e2fsck -fn`` clean, logout. Wrong
secrets (either direction) must be refused.

The tests run in file order and share that state. Every iscsiadm call has a timeout, and the
module's teardown logs out, deletes the node records, the target and the backstore whatever
happened.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import NAME_PREFIX, OP_TIMEOUT, in_background
from .runnerproc import Runner, log_dir, require_guest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

TARGET = "iqn.2003-01.org.linux-iscsi.tcmu-py:iscsi-test"
INITIATOR = "iqn.1994-05.org.tcmu-py:guest-initiator"
PORTAL = "127.0.0.1:3260"
BACKSTORE = NAME_PREFIX + "iscsi-file"
IMAGE = Path("/tmp") / f"{BACKSTORE}.img"
SIZE = 64 << 20
USER, SECRET = "tcmupy-initiator", "initiator-secret-1"
MUTUAL_USER, MUTUAL_SECRET = "tcmupy-target", "target-secret-22"
WRONG = "not-the-secret-3"
ISCSIADM_TIMEOUT = 60.0
ISCSI_ERR_ISCSID_NOTCONN = 20
ISCSI_ERR_NO_OBJS_FOUND = 21

#: the files the one-way CHAP test wrote: name -> sha256, checked again over mutual CHAP
WRITTEN: dict[str, str] = {}


def _run(*cmd: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, encoding="utf-8", errors="backslashreplace",
                          timeout=timeout, check=False)


def _explain(res: subprocess.CompletedProcess[str]) -> str:
    return f"{' '.join(res.args)} -> rc {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


def _iscsiadm(*args: str, timeout: float = ISCSIADM_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return _run("iscsiadm", *args, timeout=timeout)


def _node(*args: str, timeout: float = ISCSIADM_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return _iscsiadm("-m", "node", "-T", TARGET, "-p", PORTAL, *args, timeout=timeout)


def _node_set(**settings: str) -> None:
    for name, value in settings.items():
        res = _node("-o", "update", "-n", name, "-v", value)
        assert res.returncode == 0, _explain(res)


def _chap(user: str, secret: str, user_in: str = "", secret_in: str = "") -> None:
    """The initiator's CHAP settings in the node record (``*_in``: the target's, mutual)."""
    _node_set(**{
        "node.session.auth.authmethod": "CHAP",
        "node.session.auth.username": user,
        "node.session.auth.password": secret,
        "node.session.auth.username_in": user_in,
        "node.session.auth.password_in": secret_in,
    })


def _sessions() -> list[str]:
    """The sysfs names of our target's sessions (``sessionN``)."""
    out = []
    for tn in glob.glob("/sys/class/iscsi_session/session*/targetname"):
        if Path(tn).read_text().strip() == TARGET:
            out.append(Path(tn).parent.name)
    return out


def _session_disk(session: str, timeout: float = 60.0) -> str:
    """/dev/sdX of LUN 0 of ``session`` (the SCSI scan after login is asynchronous)."""
    pattern = f"/sys/class/iscsi_session/{session}/device/target*/*:0/block/*"
    deadline = time.monotonic() + timeout
    while True:
        found = glob.glob(pattern)
        if found:
            dev = Path("/dev") / os.path.basename(found[0])
            if dev.exists():
                return str(dev)
        assert time.monotonic() < deadline, f"no disk for {session} in {timeout} s: {pattern}"
        time.sleep(0.2)


def _login() -> subprocess.CompletedProcess[str]:
    return _node("--login", timeout=120.0)


def _logout() -> None:
    res = _node("--logout")
    assert res.returncode == 0, _explain(res)
    deadline = time.monotonic() + 60
    while _sessions():
        assert time.monotonic() < deadline, f"sessions left after logout: {_sessions()}"
        time.sleep(0.2)


def _refused_login(iscsid_log: Path) -> None:
    """A login that must fail on authentication (iscsid says so), leaving no session."""
    offset = iscsid_log.stat().st_size
    res = _login()
    assert res.returncode != 0, "login succeeded with a wrong secret:\n" + _explain(res)
    deadline = time.monotonic() + 10  # iscsid may log just after iscsiadm returned
    while True:
        said = iscsid_log.read_bytes()[offset:].decode(errors="replace")
        if re.search(r"authenticat", said) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert re.search(r"authenticat", said), _explain(res) + "\niscsid:\n" + said
    assert not _sessions(), _sessions()


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    require_guest("this module starts iscsid and logs in to an iSCSI target")
    r = Runner(log_dir(tmp_path_factory, "runner-iscsi"), lock_file="/run/tcmu-py-iscsi.lock",
               out_name="runner-iscsi")
    r.start()
    try:
        yield r
    finally:
        try:
            assert r.alive(), "the runner died during the iSCSI tests"
        finally:
            if r.alive():
                assert r.stop() == 0
            IMAGE.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def target(runner: Runner) -> Iterator[str]:
    """Backstore, iSCSI target, TPG with CHAP enforced, portal, LUN 0 and the ACL."""
    from rtslib_fb import (
        LUN,
        TPG,
        FabricModule,
        MappedLUN,
        NetworkPortal,
        NodeACL,
        Target,
        UserBackedStorageObject,
    )

    def create() -> None:
        so = UserBackedStorageObject(BACKSTORE, config=f"file/{IMAGE}", size=SIZE)
        tpg = TPG(Target(FabricModule("iscsi"), TARGET), 1)
        tpg.set_attribute("authentication", "1")
        tpg.set_attribute("generate_node_acls", "0")
        tpg.set_attribute("demo_mode_write_protect", "0")
        NetworkPortal(tpg, "127.0.0.1", 3260)
        lun = LUN(tpg, 0, so)
        acl = NodeACL(tpg, INITIATOR)
        acl.chap_userid = USER
        acl.chap_password = SECRET
        MappedLUN(acl, 0, lun)
        tpg.enable = True

    try:
        in_background(create, "create the iSCSI target").result(3 * OP_TIMEOUT)
        yield TARGET
    finally:
        _remove_target()


def _remove_target() -> None:
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        iscsi = FabricModule("iscsi")
        if any(t.wwn == TARGET for t in iscsi.targets):
            Target(iscsi, TARGET, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name == BACKSTORE:
                so.delete()

    in_background(remove, "remove the iSCSI target").result(3 * OP_TIMEOUT)


@pytest.fixture(scope="module")
def iscsid(runner: Runner, target: str) -> Iterator[Path]:
    """The guest's initiator: its name set, iscsid running (its log), no node records left
    after. iscsid gets its own session: on SIGTERM it signals its whole process group."""
    Path("/etc/iscsi/initiatorname.iscsi").write_text(f"InitiatorName={INITIATOR}\n")
    conf = Path("/etc/iscsi/iscsid.conf")
    text = conf.read_text()
    # No systemd in the guest: iscsiadm must not try to start iscsid itself. One login
    # attempt only, so a refused login is reported at once.
    text = re.sub(r"^iscsid\.startup\s*=.*$", "iscsid.startup = /bin/true", text, flags=re.M)
    text = re.sub(r"^node\.session\.initial_login_retry_max\s*=.*$",
                  "node.session.initial_login_retry_max = 1", text, flags=re.M)
    conf.write_text(text)
    for d in ("/run/lock/iscsi", "/etc/iscsi/nodes", "/etc/iscsi/send_targets"):
        os.makedirs(d, exist_ok=True)
    log = runner.logdir / "iscsid.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["iscsid", "-f", "-n"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # up once iscsiadm can talk to it ("no session" instead of "no daemon")
            res = _iscsiadm("-m", "session")
            if res.returncode != ISCSI_ERR_ISCSID_NOTCONN:
                break
            assert proc.poll() is None, f"iscsid exited with {proc.returncode}"
            assert time.monotonic() < deadline, "iscsid did not answer in 60 s\n" + _explain(res)
            time.sleep(0.3)
        assert res.returncode == ISCSI_ERR_NO_OBJS_FOUND, _explain(res)  # no session yet
        yield log
    finally:
        try:
            if _sessions():
                _node("--logout")
            _node("-o", "delete")
            _iscsiadm("-m", "discoverydb", "-t", "sendtargets", "-p", PORTAL, "-o", "delete")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "mnt"
    d.mkdir()
    try:
        yield d
    finally:
        if os.path.ismount(d):
            _run("umount", str(d), timeout=60)


# ---- helpers for the file system ---------------------------------------------------------------

def _write_files(root: Path, tag: str) -> dict[str, str]:
    """A directory of files of a few sizes; name -> sha256 of its content."""
    d = root / tag
    d.mkdir()
    out = {}
    for i, size in enumerate((1, 4096, 300_000, 3 << 20)):
        data = os.urandom(size)
        name = f"{tag}/f{i}"
        (root / name).write_bytes(data)
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _check_files(root: Path, files: dict[str, str]) -> None:
    for name, digest in files.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def _mount(disk: str, mnt: Path, *opts: str) -> None:
    res = _run("mount", "-t", "ext4", *opts, disk, str(mnt), timeout=60)
    assert res.returncode == 0, _explain(res)


def _umount(mnt: Path) -> None:
    res = _run("umount", str(mnt), timeout=120)
    assert res.returncode == 0, _explain(res)


def _fsck_clean(disk: str) -> None:
    res = _run("e2fsck", "-f", "-n", disk, timeout=180)
    assert res.returncode == 0, _explain(res)


def _reread_and_check(disk: str, mnt: Path, files: dict[str, str]) -> None:
    """Mount read-only with cold caches: the bytes come from the runner again."""
    Path("/proc/sys/vm/drop_caches").write_text("3")
    _mount(disk, mnt, "-o", "ro")
    try:
        _check_files(mnt, files)
    finally:
        _umount(mnt)


# ---- 1. discovery ------------------------------------------------------------------------------

def test_sendtargets_discovery_finds_the_target(iscsid: Path) -> None:
    res = _iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", PORTAL)
    assert res.returncode == 0, _explain(res)
    assert re.search(rf"^{re.escape(PORTAL)},1 {re.escape(TARGET)}$", res.stdout, re.M), _explain(res)
    res = _node("-o", "show")  # discovery made the node record
    assert res.returncode == 0 and f"node.name = {TARGET}" in res.stdout, _explain(res)


# ---- 2. one-way CHAP ---------------------------------------------------------------------------

def test_one_way_chap_with_a_wrong_secret_is_refused(iscsid: Path, runner: Runner) -> None:
    _chap(USER, WRONG)
    _refused_login(iscsid)
    _node_set(**{"node.session.auth.authmethod": "None"})
    _refused_login(iscsid)  # CHAP is enforced: no authentication is no login either
    assert runner.alive()


def test_one_way_chap_login_mkfs_mount_write_fsck(iscsid: Path, runner: Runner, mnt: Path) -> None:
    _chap(USER, SECRET)
    res = _login()
    assert res.returncode == 0, _explain(res)
    try:
        (session,) = _sessions()
        disk = _session_disk(session)
        sectors = int(Path(f"/sys/block/{os.path.basename(disk)}/size").read_text())
        assert sectors * 512 == SIZE
        res = _run("mkfs.ext4", "-F", "-q", "-L", "tcmupy", disk, timeout=300)
        assert res.returncode == 0, _explain(res)
        _mount(disk, mnt)
        try:
            WRITTEN.update(_write_files(mnt, "oneway"))
            os.sync()
        finally:
            _umount(mnt)
        _fsck_clean(disk)
        _reread_and_check(disk, mnt, WRITTEN)
    finally:
        _logout()
    # the bytes went through the runner into its image: the ext4 superblock magic is there
    with open(IMAGE, "rb") as f:
        f.seek(1024 + 0x38)
        assert f.read(2) == b"\x53\xef"
    assert runner.alive()


# ---- 3. mutual CHAP ----------------------------------------------------------------------------

def _set_mutual() -> None:
    from rtslib_fb import TPG, FabricModule, NodeACL, Target

    def set_mutual() -> None:
        tpg = TPG(Target(FabricModule("iscsi"), TARGET, mode="lookup"), 1, mode="lookup")
        acl = NodeACL(tpg, INITIATOR, mode="lookup")
        acl.chap_mutual_userid = MUTUAL_USER
        acl.chap_mutual_password = MUTUAL_SECRET

    in_background(set_mutual, "mutual CHAP").result(OP_TIMEOUT)


def test_mutual_chap_with_a_wrong_secret_is_refused(iscsid: Path, runner: Runner) -> None:
    _set_mutual()
    _chap(USER, WRONG, MUTUAL_USER, MUTUAL_SECRET)  # the target refuses the initiator
    _refused_login(iscsid)
    _chap(USER, SECRET, MUTUAL_USER, WRONG)  # the initiator refuses the target
    _refused_login(iscsid)
    assert runner.alive()


def test_mutual_chap_login_mount_write_fsck(iscsid: Path, runner: Runner, mnt: Path) -> None:
    _chap(USER, SECRET, MUTUAL_USER, MUTUAL_SECRET)
    res = _login()
    assert res.returncode == 0, _explain(res)
    try:
        (session,) = _sessions()
        disk = _session_disk(session)
        if not WRITTEN:  # the one-way test failed before writing: start from scratch
            res = _run("mkfs.ext4", "-F", "-q", disk, timeout=300)
            assert res.returncode == 0, _explain(res)
        _mount(disk, mnt)
        try:
            _check_files(mnt, WRITTEN)  # what the first session wrote survived the logout
            WRITTEN.update(_write_files(mnt, "mutual"))
            os.sync()
        finally:
            _umount(mnt)
        _fsck_clean(disk)
        _reread_and_check(disk, mnt, WRITTEN)
    finally:
        _logout()
    assert runner.alive()
