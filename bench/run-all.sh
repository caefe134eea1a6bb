#!/bin/bash
# The benchmark suite: ring.py, scale.py, then guest.py (one qemu guest), each under a
# timeout; outputs in .lab-runs/bench-<time>/, and a PNG from the JSON lines when
# matplotlib is installed (pip install -e '.[bench]').  Run as root from the checkout.
#
# usage: bench/run-all.sh [--quick]      (--quick: short ring/scale windows, guest.py --quick)
set -u
cd "$(dirname "$0")/.." || exit 2
PY=.venv/bin/python
QUICK=0
[ "${1:-}" = --quick ] && QUICK=1
OUT=.lab-runs/bench-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
rc=0
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 t=$2
    shift 2
    echo "== $name (timeout ${t}s): $*"
    timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.out"
    local r=${PIPESTATUS[0]}
    [ "$r" = 0 ] || { echo "== $name failed: rc $r"; rc=1; }
}
if [ "$QUICK" = 1 ]; then
    step ring 300 "$PY" bench/ring.py --seconds 1 --handlers ram,file-tmpfs --qd 32 --sizes 4096
    step scale 300 "$PY" bench/scale.py --seconds 2
    step guest 600 "$PY" bench/guest.py --quick
else
    step ring 600 "$PY" bench/ring.py --seconds 3 --handlers ram,file-tmpfs
    step scale 600 "$PY" bench/scale.py --seconds 3
    step guest 1200 "$PY" bench/guest.py
fi
if "$PY" -c 'import matplotlib' 2> /dev/null && [ -s "$OUT/guest.out" ]; then
    step plot 120 "$PY" bench/plot.py --guest "$OUT/guest.out" --scale "$OUT/scale.out" -o "$OUT/bench.png"
fi
echo "== outputs in $OUT (rc $rc)"
exit $rc
