#!/bin/bash
# The kernel test tier: boot the guest once and run `pytest tests/kernel` inside it.
#
# usage: tests/vm/run-guest-tests.sh [pytest args]
# env:   CI              passed into the guest; with CI=true a tier that cannot run fails
#        TCMU_VM_TIMEOUT the pytest run's timeout inside the guest, seconds (default 1800)
#        TCMU_VM_MEM     guest RAM in MiB (default 4096)
#        TCMU_VM_QUIET=1 print only the pytest output, at the end, instead of the live console
# exit:  pytest's exit code; 1 (CI) or 77 (local) when the tier could not run at all,
#        after one line saying why. A tier that cannot run is never reported as a pass.
set -u
HERE=$(cd "$(dirname "$0")" && pwd -P)
REPO=$(cd "$HERE/../.." && pwd -P)
T0=$(date +%s)

cannot_run() {
    if [ "${CI:-}" = true ]; then
        echo "FAIL: kernel test tier cannot run: $*" >&2
        exit 1
    fi
    echo "NOT RUN: kernel test tier skipped locally: $* (with CI=true this is a failure)" >&2
    exit 77
}

[ -x "$REPO/.venv/bin/python" ] || cannot_run "no $REPO/.venv/bin/python (run the set-up command first)"
if ! why=$("$HERE/run-in-guest.sh" -n 2>&1); then
    cannot_run "${why#run-in-guest: }"
fi

# Quote every pytest argument so the guest's shell sees exactly what we were given.
ARGS=
for a in "$@"; do ARGS+=" $(printf '%q' "$a")"; done
CMD=".venv/bin/python -m pytest tests/kernel -p no:cacheprovider$ARGS"

RUNDIR=$REPO/.lab-runs/kernel-tests-$(date +%Y%m%d-%H%M%S)-$$
"$HERE/run-in-guest.sh" -t "${TCMU_VM_TIMEOUT:-1800}" -m "${TCMU_VM_MEM:-4096}" \
    -e PYTEST_ADDOPTS -o "$RUNDIR" "$CMD"
rc=$?
if [ "${TCMU_VM_QUIET:-0}" = 1 ] && [ -r "$RUNDIR/guest-output.log" ]; then
    cat "$RUNDIR/guest-output.log"
fi
case $rc in
    97) cannot_run "a prerequisite of the guest is missing (see above)" ;;
    124) echo "FAIL: kernel tests timed out; see $RUNDIR/console.log" >&2 ;;
    125) echo "FAIL: kernel tests: the guest did not boot or died; see $RUNDIR/console.log" >&2 ;;
esac
echo "VM-HOST: kernel test tier finished in $(($(date +%s) - T0))s with rc=$rc"
exit "$rc"
