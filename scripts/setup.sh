#!/usr/bin/env bash
# The set-up command: Debian packages, the venv at .venv/ and the native shim.
# Idempotent and bounded in time; run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*"; }
t0=$(date +%s)

mapfile -t pkgs < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' scripts/apt-packages.txt)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" != 0 ]; then
        log "missing Debian packages: ${missing[*]}; run this as root (apt-get install)" >&2
        exit 1
    fi
    log "installing ${#missing[@]} Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 900 apt-get -o DPkg::Lock::Timeout=600 update -qq
    # policy-rc.d keeps package scripts from starting daemons (tcmu-runner, iscsid)
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    timeout 1800 apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
else
    log "Debian packages: all present"
fi

# Debian's python3 (3.11) is the one python3-rados/python3-rbd are built for; the venv
# sees them (and rtslib) through --system-site-packages.
if [ ! -x .venv/bin/python ]; then
    log "creating .venv from /usr/bin/python3"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
log "installing tcmu-py (editable) and test tools; building the native shim"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'BuildBackendWarning' || true
.venv/bin/python -c 'import tcmu_py._tcmu_native, rados, rbd, rtslib_fb' || {
    log "the venv cannot import the shim or Debian's rados/rbd/rtslib bindings" >&2
    exit 1
}
log "ready in $(( $(date +%s) - t0 )) s: .venv/bin/tcmu-py-runner, scripts/test.sh"
