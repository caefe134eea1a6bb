"""The runner's status socket: ``tcmu-py status`` asks, the daemon's loop answers.

A unix stream socket, root-only (the socket 0600 in a 0700 directory, default
``/run/tcmu-py/status.sock``), served from the runner's asyncio loop.  The protocol is one
JSON object per line each way: the client sends ``{"cmd": "status"}`` and reads one reply
``{"version": 1, "pid": ..., "monotonic": ..., "devices": [...]}`` (each device a
:func:`tcmu_py.metrics.device_snapshot`, plus what its handler's ``status()`` reports --
for rbd the exclusive-lock state).  Snapshots are taken in the loop thread, which owns the
rings; only the handler's ``status()`` (it may ask the cluster) runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import time
from typing import Any

from tcmu_py import __version__
from tcmu_py.metrics import device_snapshot

log = logging.getLogger("tcmu_py.status")

__all__ = [
    "DEFAULT_SOCKET", "PROTOCOL_VERSION", "NoDaemon", "StatusError", "StatusServer", "collect", "query",
]

DEFAULT_SOCKET = "/run/tcmu-py/status.sock"
PROTOCOL_VERSION = 1
_HANDLER_STATUS_TIMEOUT_S = 2.0
_REQUEST_TIMEOUT_S = 5.0
_MAX_REQUEST = 64 * 1024


class StatusError(Exception):
    """The status socket cannot be served or reached; the message is one line to print."""


class NoDaemon(StatusError):
    """Nothing answers on the status socket: no runner is running (or it has none)."""


async def collect(engine: Any) -> dict[str, Any]:
    """A status reply for every device of ``engine`` (loop thread)."""
    loop = asyncio.get_running_loop()
    devices = []
    for dev in list(engine.devices.values()):
        snap = device_snapshot(dev)
        hstatus = getattr(dev.handler, "status", None)
        if callable(hstatus):
            try:
                res = await asyncio.wait_for(loop.run_in_executor(None, hstatus),
                                             _HANDLER_STATUS_TIMEOUT_S)
                snap["handler_status"] = {str(k): str(v) for k, v in dict(res).items()}
            except Exception as e:  # noqa: BLE001 - a status query must not fail on one handler
                snap["handler_status"] = {"error": str(e) or type(e).__name__}
            lock = snap["handler_status"].get("lock_owner")
            if lock is not None:
                snap["lock_owner"] = lock == "true"
        devices.append(snap)
    return {
        "version": PROTOCOL_VERSION,
        "runner": f"tcmu-py-runner {__version__}",
        "pid": os.getpid(),
        "time": time.time(),
        "monotonic": time.monotonic(),
        "uptime_s": time.monotonic() - engine.started,
        "devices": devices,
    }


def _live(path: str) -> bool:
    """Does some process answer on ``path``?"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


class StatusServer:
    """Serves :func:`collect` on a root-only unix socket from the engine's loop."""

    def __init__(self, engine: Any, path: str = DEFAULT_SOCKET) -> None:
        self.engine = engine
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._ino: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        d = os.path.dirname(self.path) or "."
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StatusError(f"cannot create the status directory {d}: {e.strerror}") from None
        if os.path.lexists(self.path):
            if _live(self.path):
                raise StatusError(f"another runner already answers on {self.path}; "
                                  "stop it or give this one --status-socket")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a dead runner's: we hold the host lock
        old = os.umask(0o177)  # the socket is born 0600: no window for other users
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                           limit=_MAX_REQUEST)
        except OSError as e:
            raise StatusError(f"cannot listen on {self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._ino = os.stat(self.path).st_ino
        log.info("status socket %s", self.path)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
        try:  # remove it only if it is still ours (not a later runner's)
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
                req = json.loads(line or b"{}")
                if not isinstance(req, dict):
                    raise ValueError("the request is not a JSON object")
            except (ValueError, asyncio.LimitOverrunError, TimeoutError) as e:
                reply: dict[str, Any] = {"version": PROTOCOL_VERSION, "error": f"bad request: {e}"}
            else:
                cmd = req.get("cmd", "status")
                if cmd == "status":
                    reply = await collect(self.engine)
                else:
                    reply = {"version": PROTOCOL_VERSION, "error": f"unknown command {cmd!r}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)


def query(path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the runner on ``path`` for its status (blocking; for the CLI)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(f"no tcmu-py-runner is running (nothing answers on {path})") from None
        except PermissionError:
            raise StatusError(f"permission denied on {path}: the status socket is root-only; "
                              "run as root") from None
        except OSError as e:
            raise StatusError(f"cannot reach the runner on {path}: {e.strerror or e}") from None
        try:
            s.sendall(b'{"cmd": "status"}\n')
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise StatusError(f"the runner on {path} did not answer: {e.strerror or e}") from None
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError:
        raise StatusError(f"the runner on {path} sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise StatusError(f"the runner on {path} sent an unreadable reply")
    if "error" in reply:
        raise StatusError(f"the runner on {path} refused: {reply['error']}")
    return reply
