#!/bin/bash
# PID 1 of the guest once the overlay root is in place (started by initramfs-init).
#
# It prepares what every kernel test needs and nothing more: pseudo filesystems, the
# LIO/TCMU modules, configfs, /etc/target{,/pr}, and no D-Bus activation of Debian's
# tcmu-runner. Then it runs $RUNDIR/cmd.sh from the checkout (under a timeout), stores
# the exit code in $RUNDIR/guest-rc and powers off. A watchdog powers off regardless.
#
# The command sees TCMU_VM_GUEST=1, TCMU_VM_REPO (the checkout, also its working
# directory), TCMU_VM_RUN_DIR (this run's directory) and TCMU_VM_GUEST_TIMEOUT, plus
# the variables the host passed through $RUNDIR/env.sh (CI at least, when set).
REPO=$1
RUNDIR=$2
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8
exec </dev/null >/dev/console 2>&1

log() { echo "VM: $*"; }
poweroff_now() {
    sync
    # busybox's poweroff -f calls reboot(RB_POWER_OFF) itself: no init system needed.
    /bin/busybox poweroff -f
    echo o > /proc/sysrq-trigger
    sleep 10
}

TIMEOUT=$(sed -n 's/.*vm\.timeout=\([0-9]*\).*/\1/p' /proc/cmdline)
: "${TIMEOUT:=600}"

# Whatever happens below, the guest is gone 30 s after its command's deadline.
( sleep $((TIMEOUT + 30)); log "guest watchdog fired"; poweroff_now ) &

mountpoint -q /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp
mountpoint -q /run || mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /dev/pts /dev/shm /run/lock /run/dbus
mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
hostname tcmu-py-guest
ip link set lo up 2>/dev/null || /bin/busybox ifconfig lo 127.0.0.1 up

read -r UP _ < /proc/uptime
log "guest init reached at uptime ${UP}s, kernel $(uname -r)"

# target_core_mod's db_root (ALUA and PR metadata). It must exist before the module
# loads, or it logs "db_root: cannot open"; without pr/ every PERSISTENT RESERVE OUT
# with APTPL fails with NOT READY.
mkdir -p /etc/target/pr
# D-Bus activation would start Debian's /usr/bin/tcmu-runner the first time anything
# asks for org.kernel.TCMUService1, and it would take our uio devices away. This only
# changes the guest's overlay, never the host.
rm -f /usr/share/dbus-1/system-services/org.kernel.TCMUService1.service

# One modprobe for all: each extra modprobe process costs about a second under TCG.
MODULES="configfs uio target_core_mod target_core_user tcm_loop iscsi_target_mod iscsi_tcp
         sd_mod sg dm_mod dm_multipath"
# shellcheck disable=SC2086 # one word per module
timeout 120 modprobe -a $MODULES || log "modprobe -a failed"
for m in $MODULES; do
    [ -d "/sys/module/$m" ] || log "module $m is not loaded"
done
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
read -r UP _ < /proc/uptime
log "modules loaded, configfs mounted at uptime ${UP}s"

export TCMU_VM_GUEST=1 TCMU_VM_REPO=$REPO TCMU_VM_RUN_DIR=$RUNDIR TCMU_VM_GUEST_TIMEOUT=$TIMEOUT
# shellcheck disable=SC1091
[ -r "$RUNDIR/env.sh" ] && . "$RUNDIR/env.sh"

rc=127
if [ -r "$RUNDIR/cmd.sh" ]; then
    cd "$REPO" || log "cannot cd to $REPO"
    log "running the command (timeout ${TIMEOUT}s)"
    timeout -k 10 "$TIMEOUT" /bin/bash "$RUNDIR/cmd.sh" 2>&1 | tee "$RUNDIR/guest-output.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && log "the command timed out after ${TIMEOUT}s"
else
    log "no $RUNDIR/cmd.sh"
fi
echo "$rc" > "$RUNDIR/guest-rc"
read -r UP _ < /proc/uptime
log "command exited rc=$rc at uptime ${UP}s; powering off"
kill -TERM -1 2>/dev/null   # let background daemons the command left behind go first
sleep 1
poweroff_now
