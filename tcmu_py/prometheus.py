"""An opt-in Prometheus endpoint: the status snapshots in the text exposition format.

Off unless ``--metrics-listen HOST:PORT`` (or ``unix:PATH``) is given.  A TCP listener
must be on a loopback address unless ``--metrics-allow-remote`` says otherwise: the
figures name devices and config strings.  The server is a few lines of HTTP/1.0 on the
runner's loop (``GET /metrics``), so nothing beyond the standard library is needed; the
tests check the output with ``prometheus_client``'s own parser.

Names follow Prometheus conventions: ``tcmu_py_device_<what>_<unit>`` with ``_total``
for counters, labels ``device`` and ``handler`` on every series.  The latency histogram
is the log2-µs one (buckets ``le`` = 2^b µs, in seconds); its ``_sum`` is estimated from
the bucket midpoints, since the C path keeps buckets only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Iterator
from typing import Any

from tcmu_py.metrics import HIST_BUCKETS, KINDS
from tcmu_py.status import collect

log = logging.getLogger("tcmu_py.prometheus")

__all__ = ["ListenError", "MetricsServer", "parse_listen", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_TIMEOUT_S = 5.0


class ListenError(ValueError):
    """A --metrics-listen value that cannot or must not be used (one line to print)."""


def parse_listen(spec: str, allow_remote: bool = False) -> tuple[str, str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH`` -> ("tcp", host, port) or ("unix", path, 0)."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ListenError("--metrics-listen unix: needs a path (unix:/run/tcmu-py/metrics.sock)")
        return "unix", path, 0
    host, sep, port_s = spec.rpartition(":")
    if not sep or not host:
        raise ListenError(f"--metrics-listen {spec!r}: expected HOST:PORT (127.0.0.1:9560) or unix:PATH")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_s)
        if not 0 <= port < 65536:
            raise ValueError
    except ValueError:
        raise ListenError(f"--metrics-listen {spec!r}: {port_s!r} is not a port number") from None
    if not allow_remote and not _is_loopback(host):
        raise ListenError(f"--metrics-listen {spec!r}: {host} is not a loopback address; the "
                          "metrics name devices and config strings -- add "
                          "--metrics-allow-remote to serve them beyond this host")
    return "tcp", host, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another name: it may resolve anywhere


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kw: Any) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kw.items()) + "}"


def _num(v: float | int) -> str:
    if isinstance(v, float):
        return "+Inf" if v == float("inf") else repr(v)
    return str(v)


def render(status: dict[str, Any]) -> str:
    """The exposition text for a :func:`tcmu_py.status.collect` reply."""
    out: list[str] = []
    devs = status.get("devices", [])

    def family(name: str, kind: str, help_: str, rows: Iterator[tuple[str, float | int]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{lab} {_num(v)}" for lab, v in rows)

    def per_dev(key: str) -> Iterator[tuple[str, float | int]]:
        for d in devs:
            yield _labels(device=d["name"], handler=d["handler"]), d[key]

    family("tcmu_py_device_info", "gauge", "One per served device; its config string and state.",
           ((_labels(device=d["name"], handler=d["handler"], config=d["config"], state=d["state"],
                     native="true" if d["native"] else "false"), 1) for d in devs))
    family("tcmu_py_device_size_bytes", "gauge", "Device size.", per_dev("size"))
    family("tcmu_py_device_commands_total", "counter", "SCSI commands fetched, by kind.",
           ((_labels(device=d["name"], handler=d["handler"], kind=k), d["commands"][k])
            for d in devs for k in KINDS))
    family("tcmu_py_device_bytes_total", "counter", "Data bytes of those commands, by kind.",
           ((_labels(device=d["name"], handler=d["handler"], kind=k), d["bytes"][k])
            for d in devs for k in KINDS))
    family("tcmu_py_device_errors_total", "counter",
           "Commands answered with an error, by sense key (CHECK CONDITION) or status.",
           ((_labels(device=d["name"], handler=d["handler"], reason=r), n)
            for d in devs for r, n in sorted(d["errors"].items())))
    family("tcmu_py_device_inflight_commands", "gauge", "Commands fetched and not yet completed.",
           per_dev("inflight"))
    family("tcmu_py_device_inflight_commands_peak", "gauge",
           "Highest number of commands in flight at once since the start.", per_dev("inflight_peak"))
    family("tcmu_py_device_ring_full_total", "counter",
           "Ring drains that found the command ring full (the kernel queued new commands).",
           per_dev("ring_full"))
    family("tcmu_py_device_qfull_total", "counter",
           "Commands answered BUSY or TASK SET FULL (back-pressure to the initiator).",
           per_dev("qfull"))
    family("tcmu_py_device_recoveries_total", "counter",
           "Connection-lost recoveries (handler close and reopen).", per_dev("recoveries"))
    family("tcmu_py_device_timeouts_total", "counter",
           "Handler calls that outlived tcmur_cmd_time_out.", per_dev("timeouts"))
    locks = [d for d in devs if "lock_owner" in d]
    if locks:
        family("tcmu_py_device_lock_owner", "gauge",
               "1 if this runner holds the image's exclusive lock (rbd).",
               ((_labels(device=d["name"], handler=d["handler"]), int(d["lock_owner"]))
                for d in locks))
    name = "tcmu_py_device_latency_seconds"
    out.append(f"# HELP {name} Ring fetch to completion (log2 microsecond buckets).")
    out.append(f"# TYPE {name} histogram")
    for d in devs:
        hist = d["latency_hist_log2_us"]
        cum = 0
        est_sum = 0.0
        for b in range(HIST_BUCKETS):
            n = hist[b]
            cum += n
            lo = 0.0 if b == 0 else float(1 << (b - 1))
            est_sum += n * (lo + (float(1 << b) - lo) / 2) * 1e-6
            le = "+Inf" if b == HIST_BUCKETS - 1 else repr((1 << b) * 1e-6)
            out.append(f"{name}_bucket{_labels(device=d['name'], handler=d['handler'], le=le)} {cum}")
        lab = _labels(device=d["name"], handler=d["handler"])
        out.append(f"{name}_sum{lab} {est_sum!r}")
        out.append(f"{name}_count{lab} {cum}")
    out.append("# HELP tcmu_py_runner_uptime_seconds Seconds since the runner started.")
    out.append("# TYPE tcmu_py_runner_uptime_seconds gauge")
    out.append(f"tcmu_py_runner_uptime_seconds {_num(float(status.get('uptime_s', 0.0)))}")
    return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` over HTTP/1.0 on a loopback port or a unix socket."""

    def __init__(self, engine: Any, spec: str, allow_remote: bool = False) -> None:
        self.engine = engine
        self.kind, self.host, self.port = parse_listen(spec, allow_remote)
        self._server: asyncio.AbstractServer | None = None

    @property
    def address(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.host}"
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        try:
            if self.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.host)
                old = os.umask(0o177)
                try:
                    self._server = await asyncio.start_unix_server(self._serve, path=self.host)
                finally:
                    os.umask(old)
            else:
                self._server = await asyncio.start_server(self._serve, self.host, self.port)
                if self.port == 0:
                    self.port = self._server.sockets[0].getsockname()[1]
        except OSError as e:
            raise ListenError(f"--metrics-listen {self.address}: {e.strerror or e}") from None
        log.info("metrics on http://%s/metrics", self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
            if self.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(self.host)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
            while True:  # the headers: nothing in them matters here
                h = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT_S)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = request.decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif parts[1].split("?")[0] not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"GET /metrics\n", "text/plain"
            else:
                status, ctype = "200 OK", CONTENT_TYPE
                body = render(await collect(self.engine)).encode()
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            writer.write(head if parts and parts[0] == "HEAD" else head + body)
            await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
