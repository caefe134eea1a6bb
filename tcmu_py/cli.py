"""``tcmu-py-runner``: the command line, compatible with tcmu-runner's flags.

tcmu-runner's flags (§2.2): ``-d/--debug``, ``--handler-path DIR``, ``-l/--tcmu-log-dir
DIR``, ``-f/--nofile N``, ``-V/--version``, ``-h/--help``; ours follow.  Every failure a
person can fix is one line on stderr and exit status 1 -- never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import resource
import signal
import sys
from typing import Any

from tcmu_py import __version__
from tcmu_py.config import DEFAULT_PATH, ConfigWatcher, RunnerConfig
from tcmu_py.logs import LogSetup
from tcmu_py.status import DEFAULT_SOCKET

log = logging.getLogger("tcmu_py")

__all__ = ["main"]

LOCK_FILE = "/run/tcmu.lock"  # tcmu-runner's: the two runners exclude each other
DEFAULT_LOG_DIR = "/var/log"


class Fatal(Exception):
    """An error to report as one line and exit 1."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tcmu-py-runner",
        description="Serve LIO user: backstores (target_core_user) -- a drop-in tcmu-runner.",
    )
    p.add_argument("-d", "--debug", action="store_true", help="log at debug level")
    p.add_argument("--handler-path", metavar="DIR",
                   help="also load handlers from *.py files in DIR (tcmu-runner's flag)")
    p.add_argument("-l", "--tcmu-log-dir", metavar="DIR",
                   help=f"log directory (default $TCMU_LOGDIR or {DEFAULT_LOG_DIR})")
    p.add_argument("-f", "--nofile", type=int, metavar="N",
                   help="raise RLIMIT_NOFILE to N (65536..1048576)")
    p.add_argument("-V", "--version", action="version", version=f"tcmu-py-runner {__version__}")
    p.add_argument("--config", default=DEFAULT_PATH, metavar="FILE",
                   help=f"config file with log_level and log_dir (default {DEFAULT_PATH})")
    p.add_argument("--lock-file", default=LOCK_FILE, metavar="FILE",
                   help=f"host-wide single-runner lock (default {LOCK_FILE})")
    p.add_argument("--configfs-root", default="/sys/kernel/config/target/core", metavar="DIR")
    p.add_argument("--no-dbus", action="store_true",
                   help="do not own org.kernel.TCMUService1 (targetcli then cannot see us)")
    p.add_argument("--dbus-address", metavar="ADDR",
                   help="D-Bus bus address (default: the system bus)")
    p.add_argument("--status-socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"root-only socket `tcmu-py status` asks (default {DEFAULT_SOCKET})")
    p.add_argument("--no-status-socket", action="store_true", help="do not serve the status socket")
    p.add_argument("--no-metrics", action="store_true",
                   help="keep no per-device counters (status then shows devices only)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT|unix:PATH",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default; "
                        "loopback only unless --metrics-allow-remote)")
    p.add_argument("--metrics-allow-remote", action="store_true",
                   help="let --metrics-listen use a non-loopback address")
    return p


def take_lock(path: str) -> int:
    """One runner per host: a POSIX lock on the same file tcmu-runner locks."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise Fatal(f"cannot open the lock file {path}: {e.strerror}") from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        os.close(fd)
        raise Fatal(
            f"another runner (pid {holder}) holds {path}: only one tcmu-runner or "
            "tcmu-py-runner may serve a host; stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def set_nofile(n: int) -> None:
    if not 65536 <= n <= 1048576:
        raise Fatal(f"--nofile {n}: must be between 65536 and 1048576")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (OSError, ValueError) as e:
        raise Fatal(f"--nofile {n}: {e}") from None


def effective(cfg: RunnerConfig, args: argparse.Namespace) -> tuple[int, str]:
    """tcmu-runner's precedence: config file > command line > $TCMU_LOGDIR > default."""
    level = cfg.log_level if cfg.log_level is not None else (4 if args.debug else 3)
    log_dir = cfg.log_dir or args.tcmu_log_dir or os.environ.get("TCMU_LOGDIR") or DEFAULT_LOG_DIR
    return level, log_dir


async def serve(args: argparse.Namespace, logs: LogSetup, watcher: ConfigWatcher) -> int:
    from tcmu_py.control.configfs import ConfigFS
    from tcmu_py.control.netlink import TcmuNetlinkError, load_module
    from tcmu_py.daemon import Runner, default_uio_monitor
    from tcmu_py.registry import load_handlers

    loop = asyncio.get_running_loop()
    try:
        load_module("target_core_user")
    except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
        raise Fatal(str(e)) from None
    handlers = load_handlers(args.handler_path)
    if not handlers:
        raise Fatal("no handler could be loaded; nothing to serve")
    runner = Runner(loop, handlers, configfs=ConfigFS(args.configfs_root),
                    uio_monitor=default_uio_monitor)
    runner.engine.metrics_enabled = not args.no_metrics
    extras = await start_operability(args, runner)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, logs.reopen)

    def poll_config() -> None:
        watcher.check()
        loop.call_later(2.0, poll_config)

    loop.call_later(2.0, poll_config)
    dbus_service: Any = None

    async def after_listen() -> None:
        nonlocal dbus_service
        if args.no_dbus:
            return
        try:
            from tcmu_py.dbus_service import start_service
        except ImportError:
            log.warning("D-Bus service not available in this build")
            return
        try:
            dbus_service = await start_service(runner, address=args.dbus_address)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            log.warning("D-Bus: %s; targetcli will not see this runner (rtslib works)", e)

    try:
        await runner.start(after_listen=after_listen)
    except TcmuNetlinkError as e:
        raise Fatal(f"netlink: {e}") from None
    except PermissionError as e:
        raise Fatal(f"permission denied ({e}); tcmu-py-runner must run as root") from None
    await stop.wait()
    log.info("stopping: finishing in-flight commands")
    await runner.stop()
    if dbus_service is not None:
        await dbus_service.stop()
    for server in extras:
        await server.stop()
    return 0


async def start_operability(args: argparse.Namespace, runner: Any) -> list[Any]:
    """The status socket (on by default; a failure is a warning: serving I/O matters
    more) and the opt-in metrics endpoint (asked for, so a failure is fatal)."""
    from tcmu_py.prometheus import ListenError, MetricsServer
    from tcmu_py.status import StatusError, StatusServer

    started: list[Any] = []
    if not args.no_status_socket:
        status = StatusServer(runner.engine, args.status_socket)
        try:
            await status.start()
            started.append(status)
        except StatusError as e:
            log.warning("status socket: %s; `tcmu-py status` will not see this runner", e)
    if args.metrics_listen:
        metrics = MetricsServer(runner.engine, args.metrics_listen, args.metrics_allow_remote)
        try:
            await metrics.start()
        except ListenError as e:
            for s in started:
                await s.stop()
            raise Fatal(str(e)) from None
        started.append(metrics)
    return started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs: LogSetup | None = None
    try:
        cfg_holder: list[RunnerConfig] = []
        watcher = ConfigWatcher(args.config, lambda c: None)
        cfg = watcher.load()
        cfg_holder.append(cfg)
        level, log_dir = effective(cfg, args)
        logs = LogSetup(level, log_dir)

        def on_change(new: RunnerConfig) -> None:
            lvl, d = effective(new, args)
            assert logs is not None
            logs.set_level(lvl)
            logs.set_dir(d)

        watcher.on_change = on_change
        if args.nofile:
            set_nofile(args.nofile)
        if args.metrics_listen:
            from tcmu_py.prometheus import ListenError, parse_listen

            try:
                parse_listen(args.metrics_listen, args.metrics_allow_remote)
            except ListenError as e:
                raise Fatal(str(e)) from None
        lock_fd = take_lock(args.lock_file)
        try:
            log.info("tcmu-py-runner %s starting (log level %d, log file %s)",
                     __version__, level, logs.path)
            return asyncio.run(serve(args, logs, watcher))
        finally:
            os.close(lock_fd)
    except Fatal as e:
        print(f"tcmu-py-runner: {e}", file=sys.stderr)
        if logs is not None and logs.file is not None:
            if logs.stderr is not None:  # already printed above: once on the terminal
                logs.root.removeHandler(logs.stderr)
            logging.getLogger("tcmu_py").critical("%s", e)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
