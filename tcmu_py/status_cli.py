"""``tcmu-py``: the operator's command.  ``tcmu-py status`` asks the running daemon.

``tcmu-py status`` reads the runner's status socket twice, ``--interval`` seconds apart
(default 1), and prints one line per device: name, handler, config string, size, state,
commands in flight, IOPS and MB/s over that interval, p50/p99 latency over it (since the
start with ``--interval 0``), and the errors since the start.  ``--json`` prints the
same as one JSON object (the daemon's cumulative counters included); ``--watch [SECS]``
refreshes like ``iostat 1``.

Exit status: 0, or 3 with one line on stderr when no runner answers (1 for any other
failure, such as a non-root user on the root-only socket).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tcmu_py.metrics import HIST_BUCKETS, percentile_us
from tcmu_py.status import DEFAULT_SOCKET, NoDaemon, StatusError, query

__all__ = ["main", "rates"]

EXIT_NO_DAEMON = 3


def rates(prev: dict[str, Any] | None, cur: dict[str, Any]) -> list[dict[str, Any]]:
    """Each device of ``cur`` with its rates over the interval since ``prev`` added:
    ``iops``, ``mb_s`` (reads+writes), ``interval_p50_us``/``interval_p99_us``."""
    before = {d["name"]: d for d in prev["devices"]} if prev else {}
    dt = cur["monotonic"] - prev["monotonic"] if prev else 0.0
    out = []
    for d in cur["devices"]:
        row = dict(d)
        p = before.get(d["name"])
        if p is not None and dt > 0 and p.get("since") == d.get("since"):
            cmds = d["commands_total"] - p["commands_total"]
            nbytes = (d["bytes"]["read"] + d["bytes"]["write"]
                      - p["bytes"]["read"] - p["bytes"]["write"])
            hist = [a - b for a, b in zip(d["latency_hist_log2_us"], p["latency_hist_log2_us"],
                                          strict=True)]
            row["interval_s"] = dt
            row["iops"] = cmds / dt
            row["read_iops"] = (d["commands"]["read"] - p["commands"]["read"]) / dt
            row["write_iops"] = (d["commands"]["write"] - p["commands"]["write"]) / dt
            row["mb_s"] = nbytes / dt / 1e6
            row["interval_p50_us"] = percentile_us(hist, 50)
            row["interval_p99_us"] = percentile_us(hist, 99)
        else:
            row["interval_s"] = None
            row["iops"] = row["read_iops"] = row["write_iops"] = row["mb_s"] = None
            row["interval_p50_us"] = row["interval_p99_us"] = None
        out.append(row)
    return out


def _size(n: int) -> str:
    f, i = float(n), 0
    while f >= 1024 and i < 4:
        f /= 1024
        i += 1
    unit = "BKMGT"[i]
    return f"{f:.0f}{unit}" if f == int(f) else f"{f:.1f}{unit}"


def _lat(us: float | None) -> str:
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}us"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms"
    return f"{us / 1e6:.1f}s"


def _rate(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


_HEAD = ("DEVICE", "HANDLER", "CONFIG", "SIZE", "STATE", "INFL", "IOPS", "MB/s", "P50", "P99",
         "ERRORS")


def table(rows: list[dict[str, Any]]) -> str:
    lines = [_HEAD]
    for r in rows:
        cfg = r["config"] if len(r["config"]) <= 40 else r["config"][:37] + "..."
        state = r["state"] + (" lock" if r.get("lock_owner") else "")
        lines.append((
            r["name"], r["handler"], cfg, _size(r["size"]), state, str(r["inflight"]),
            _rate(r["iops"], ".0f"), _rate(r["mb_s"], ".1f"),
            *(_lat(r[k if r["interval_s"] is not None else c]) for k, c in (
                ("interval_p50_us", "latency_p50_us"), ("interval_p99_us", "latency_p99_us"))),
            str(r["errors_total"]),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEAD))]
    text = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in
                      enumerate(zip(line, widths, strict=True))).rstrip() for line in lines]
    if not rows:
        text.append("(no devices)")
    return "\n".join(text)


def _emit(prev: dict[str, Any] | None, cur: dict[str, Any], as_json: bool) -> None:
    rows = rates(prev, cur)
    if as_json:
        print(json.dumps({"runner": cur.get("runner"), "pid": cur.get("pid"), "time": cur.get("time"),
                          "latency_buckets": HIST_BUCKETS, "devices": rows}), flush=True)
    else:
        print(table(rows), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcmu-py", description="Operate a running tcmu-py-runner.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("status", help="one line per served device: IOPS, MB/s, latency, errors",
                       description="One line per device of the running tcmu-py-runner.")
    s.add_argument("--json", action="store_true", help="print JSON (one object per refresh)")
    s.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECS",
                   help="refresh every SECS seconds (default 1) until interrupted")
    s.add_argument("--interval", type=float, default=1.0, metavar="SECS",
                   help="measure rates over SECS seconds (default 1; 0: counters only)")
    s.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    s.add_argument("--socket", default=DEFAULT_SOCKET, metavar="PATH",
                   help=f"the runner's status socket (default {DEFAULT_SOCKET})")
    return p


def status(args: argparse.Namespace) -> int:
    prev = query(args.socket)
    if args.watch is None:
        if args.interval > 0:
            time.sleep(args.interval)
            cur = query(args.socket)
            _emit(prev, cur, args.json)
        else:
            _emit(None, prev, args.json)
        return 0
    period = max(0.1, args.watch)
    n = 0
    while args.count is None or n < args.count:
        time.sleep(period)
        cur = query(args.socket)
        if not args.json:
            print(time.strftime("%H:%M:%S"))
        _emit(prev, cur, args.json)
        if not args.json:
            print()
        prev = cur
        n += 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "status":
        parser.print_help(sys.stderr)
        return 2
    try:
        return status(args)
    except StatusError as e:
        print(f"tcmu-py: {e}", file=sys.stderr)
        return EXIT_NO_DAEMON if isinstance(e, NoDaemon) else 1
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
