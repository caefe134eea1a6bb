#!/usr/bin/env bash
# The test command: every tier, in order.  A tier that cannot run fails (never skips)
# under CI=true.  Extra arguments go to the host pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "test: no .venv; run scripts/setup.sh first" >&2; exit 1; }

rc=0
tier() {  # tier NAME CMD...: run, time, remember failure
    local name=$1; shift
    local t0=$(date +%s)
    echo "=== tier: $name"
    "$@"
    local r=$?
    echo "=== tier: $name: $([ $r = 0 ] && echo ok || echo "FAILED (rc $r)") in $(( $(date +%s) - t0 )) s"
    [ $r = 0 ] || rc=1
}

tier lint bash -c ".venv/bin/ruff check . && .venv/bin/mypy"
tier "pure + simulated kernel" "$PY" -m pytest -q tests/unit tests/sim "$@"
if [ -d tests/services ]; then
    tier "services (D-Bus, Ceph)" "$PY" -m pytest -q tests/services
fi
if [ -x tests/vm/run-guest-tests.sh ]; then
    tier "kernel (qemu guest)" tests/vm/run-guest-tests.sh
fi
exit $rc
