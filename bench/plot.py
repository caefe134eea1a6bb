#!/usr/bin/env python3
"""Plot the JSON line of bench/guest.py (and optionally bench/scale.py) into one PNG.

    .venv/bin/python bench/plot.py --guest guest.out [--scale scale.out] -o docs/bench-guest.png

Each input may be a bench's whole output: its last line that is a JSON object with a
"bench" key is used.  Needs matplotlib (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def last_json(path: str, bench: str) -> dict[str, Any]:
    for line in reversed(Path(path).read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if obj.get("bench") == bench:
                return obj
    raise SystemExit(f"{path}: no JSON line of bench {bench!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", required=True)
    ap.add_argument("--scale")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = last_json(args.guest, "guest")
    s = last_json(args.scale, "scale") if args.scale else None
    jobs = ["randread4k", "randwrite4k", "seqread1m", "seqwrite1m"]
    ncols = 3 if s else 2
    fig, axes = plt.subplots(2, ncols, figsize=(5.2 * ncols, 8.5))
    colors = {"tcmu-py-file": "#1f77b4", "tcmu-py-ram": "#17becf", "tcmu-runner-qcow": "#d62728",
              "fileio": "#7f7f7f", "rd_mcp": "#2ca02c"}
    for ax, job in zip(axes[:, :2].flat, jobs, strict=True):
        cases = [c for c in g["cases"] if c["job"] == job]
        cases.sort(key=lambda c: (list(colors).index(c["backend"]) if c["backend"] in colors else 99,
                                  c["hw_max_sectors"] or 0))
        labels = [c["backend"] + (f"\nhw {c['hw_max_sectors']}" if c["hw_max_sectors"] else "")
                  for c in cases]
        vals = [c["iops"] if job.startswith("rand") else c["mb_s"] for c in cases]
        bars = ax.bar(range(len(cases)), vals, color=[colors.get(c["backend"], "#999") for c in cases])
        for b, c in zip(bars, cases, strict=True):
            cpu = c.get("runner_cpu_us_per_io")
            if cpu is not None:
                ax.annotate(f"{cpu:.0f} µs\nCPU/IO", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cases)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("IOPS" if job.startswith("rand") else "MB/s")
        qd = "QD32" if job.startswith("rand") else "QD8"
        ax.set_title(f"{job} {qd} (median of {max(c['rounds'] for c in cases) if cases else 0} rounds)",
                     fontsize=9)
        ax.margins(y=0.25)
    if s:
        rows = s["rows"]
        n = [r["devices"] for r in rows]
        ax = axes[0, 2]
        ax.plot(n, [r["cmds_per_s"] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ram devices (one engine)")
        ax.set_ylabel("aggregate commands/s (4 KiB read, QD8 each)")
        ax.set_title("scale: simulated kernel (Python) in its own process", fontsize=9)
        ax = axes[1, 2]
        ax.plot(n, [r["rss_runner_mb"] for r in rows], "o-", label="runner RSS (no rings, no ram disks)")
        ax.plot(n, [60 + (d - 1) * 1.0 for d in n], "--", color="gray", label="target 60 MB + 1 MB/device")
        ax.plot(n, [r["threads"] for r in rows], "s-", label="threads")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ram devices (one engine)")
        ax.set_ylabel("MB / threads")
        ax.legend(fontsize=7)
        ax.set_title("scale: memory and threads", fontsize=9)
    load = g.get("host_loadavg_start", ["?"])[0], g.get("host_loadavg_end", ["?"])[0]
    fig.suptitle(f"tcmu-py guest benchmark {g.get('date', '')}: qemu TCG guest, 2 vCPUs on a shared 2-core "
                 f"host (load average {load[0]} -> {load[1]})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
