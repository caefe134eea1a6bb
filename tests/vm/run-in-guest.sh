#!/bin/bash
# Run shell commands as root inside a throw-away qemu guest with the real LIO/TCMU modules.
#
# The guest boots Debian's own kernel (the newest /boot/vmlinuz-*-amd64 that is not the
# running one) under TCG. Its root is the host's / over 9p, read-only, with a tmpfs
# overlay on top; this checkout is mounted read-write at the same path and is the
# command's working directory. guest/init.sh loads configfs, uio, target_core_mod,
# target_core_user, tcm_loop, iSCSI, sd_mod, sg and dm-multipath, mounts configfs, then
# runs the command. The guest always powers off, and every step has a timeout.
#
# usage: tests/vm/run-in-guest.sh [-t guest_timeout_s] [-m mem_mb] [-c cpus] [-e VAR]...
#                                 [-o run_dir] 'shell commands'
#        tests/vm/run-in-guest.sh -n     (only check the prerequisites; say what is missing)
#   -t  the command's timeout inside the guest (default 600); the host gives up 120 s later
#   -m  guest RAM in MiB (default 4096)       -c  vCPUs (default 2)
#   -e  pass the host's $VAR into the guest (repeatable; CI is always passed when set)
#   -o  run directory, inside the checkout (default .lab-runs/<timestamp>-<pid>)
# env:  TCMU_VM_KERNEL  kernel image (default: see above)
#       TCMU_VM_CACHE   initramfs cache (default ${XDG_CACHE_HOME}/tcmu-py-vm, else <repo>/.cache/vm)
#       TCMU_VM_QUIET=1 do not echo the guest console live
# exit: the command's exit code; 2 usage; 97 a prerequisite is missing (kernel, qemu,
#       busybox); 124 the host-side timeout fired; 125 the guest never reported an exit code.
# The run directory keeps cmd.sh, env.sh, console.log (everything the guest printed),
# guest-output.log (the command's output), guest-rc, qemu.log and timing.txt.
set -u
HERE=$(cd "$(dirname "$0")" && pwd -P)
REPO=$(cd "$HERE/../.." && pwd -P)
T0=$(date +%s.%N)

usage() { sed -n '11,25p' "$0" >&2; exit 2; }
missing() { echo "run-in-guest: $*" >&2; exit 97; }
elapsed() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "%.1f", a - b }'; }

GUEST_TIMEOUT=600 MEM=4096 CPUS=2 RUNDIR='' PASS_ENV=(CI) CHECK_ONLY=0
while getopts "t:m:c:e:o:nh" o; do
    case $o in
        n) CHECK_ONLY=1 ;;
        t) GUEST_TIMEOUT=$OPTARG ;;
        m) MEM=$OPTARG ;;
        c) CPUS=$OPTARG ;;
        e) PASS_ENV+=("$OPTARG") ;;
        o) RUNDIR=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
if [ "$CHECK_ONLY" = 0 ] && { [ $# -ne 1 ] || [ -z "$1" ]; }; then
    usage
fi
CMD=${1:-}
for n in "$GUEST_TIMEOUT" "$MEM" "$CPUS"; do
    case $n in '' | *[!0-9]*) echo "run-in-guest: -t, -m and -c take integers" >&2; usage ;; esac
done

# ---- prerequisites -----------------------------------------------------------------
QEMU=$(command -v qemu-system-x86_64) || missing "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
[ -x /bin/busybox ] || missing "/bin/busybox not found (apt-get install busybox-static)"
command -v cpio > /dev/null || missing "cpio not found (apt-get install cpio)"
newest_kernel() {
    local k
    for k in /boot/vmlinuz-*-amd64; do
        [ -e "$k" ] && [ "$k" != "/boot/vmlinuz-$(uname -r)" ] && printf '%s\n' "$k"
    done | sort -V | tail -n 1
}
KERNEL=${TCMU_VM_KERNEL:-$(newest_kernel)}
if [ -n "${TCMU_VM_KERNEL:-}" ]; then
    [ -r "$KERNEL" ] || missing "TCMU_VM_KERNEL=$KERNEL is not a readable kernel image"
else
    if [ -z "$KERNEL" ] || [ ! -r "$KERNEL" ]; then
        missing "no guest kernel: no readable /boot/vmlinuz-*-amd64 other than the running one (apt-get install linux-image-amd64)"
    fi
fi
KVER=${KERNEL##*/vmlinuz-}
[ -d "/lib/modules/$KVER" ] || missing "no /lib/modules/$KVER for the guest kernel $KERNEL"
# The paths travel on the kernel command line and inside qemu's -fsdev option.
case "$REPO" in
    *[[:space:],]*) echo "run-in-guest: the checkout path '$REPO' must not contain blanks or commas" >&2; exit 2 ;;
    /) echo "run-in-guest: the checkout must not be /" >&2; exit 2 ;;
esac

if [ "$CHECK_ONLY" = 1 ]; then
    echo "run-in-guest: ready: $QEMU, kernel $KERNEL"
    exit 0
fi

# ---- run directory -----------------------------------------------------------------
: "${RUNDIR:=$REPO/.lab-runs/$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$RUNDIR" && RUNDIR=$(cd "$RUNDIR" && pwd -P) || exit 2
case "$RUNDIR/" in
    "$REPO"/*) ;;
    *) echo "run-in-guest: run dir $RUNDIR must be inside the checkout $REPO" >&2; exit 2 ;;
esac
case "$RUNDIR" in *[[:space:],]*) echo "run-in-guest: run dir must not contain blanks or commas" >&2; exit 2 ;; esac
rm -f "$RUNDIR/guest-rc" "$RUNDIR/console.log" "$RUNDIR/qemu.pid" "$RUNDIR/guest-output.log"
printf '%s\n' "$CMD" > "$RUNDIR/cmd.sh"
: > "$RUNDIR/env.sh"
for v in "${PASS_ENV[@]}"; do
    case $v in '' | [0-9]* | *[!A-Za-z0-9_]*) echo "run-in-guest: bad variable name '$v'" >&2; exit 2 ;; esac
    [ -n "${!v+set}" ] && printf 'export %s=%q\n' "$v" "${!v}" >> "$RUNDIR/env.sh"
done

# ---- initramfs: busybox, initramfs-init and the modules needed to reach the root ---
# Cached per kernel version and content of initramfs-init; built atomically.
CACHE=${TCMU_VM_CACHE:-${XDG_CACHE_HOME:+$XDG_CACHE_HOME/tcmu-py-vm}}
: "${CACHE:=$REPO/.cache/vm}"
INITRD=$CACHE/initramfs-$KVER-$(md5sum < "$HERE/guest/initramfs-init" | cut -c1-12).cpio.gz
if [ ! -s "$INITRD" ]; then
    echo "VM-HOST: building $INITRD"
    mkdir -p "$CACHE" || exit 2
    tmp=$(mktemp -d "$CACHE/build.XXXXXX") || exit 2
    mkdir -p "$tmp/bin" "$tmp/mods"
    if ! { cp /bin/busybox "$tmp/bin/busybox" && cp "$HERE/guest/initramfs-init" "$tmp/init" \
        && chmod 755 "$tmp/init"; }; then
        rm -rf "$tmp"
        exit 2
    fi
    : > "$tmp/modules.order"
    for m in virtio_pci 9pnet_virtio 9p overlay; do
        timeout 30 modprobe -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r ko; do
        cp "$ko" "$tmp/mods/" && basename "$ko" >> "$tmp/modules.order"
    done
    [ -s "$tmp/modules.order" ] || { rm -rf "$tmp"; missing "cannot resolve the 9p/overlay modules of $KVER (kmod)"; }
    (cd "$tmp" && find . | timeout 60 cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp.$$" \
        && mv "$INITRD.tmp.$$" "$INITRD"
    rm -rf "$tmp" "$INITRD.tmp.$$"
    [ -s "$INITRD" ] || { echo "run-in-guest: failed to build $INITRD" >&2; exit 2; }
fi

# ---- boot --------------------------------------------------------------------------
HOST_TIMEOUT=$((GUEST_TIMEOUT + 120))
echo "VM-HOST: kernel $KERNEL, tcg, ${CPUS} cpus, ${MEM} MiB, checkout $REPO, run dir $RUNDIR, host timeout ${HOST_TIMEOUT}s"
# No NIC (-nic none): the guest only has its own loopback, which is all iSCSI needs.
timeout -k 15 "$HOST_TIMEOUT" "$QEMU" \
    -name tcmu-py-guest -accel tcg,thread=multi,tb-size=512 -cpu max -smp "$CPUS" -m "$MEM" \
    -machine q35 -nodefaults -no-user-config -nographic -no-reboot -nic none \
    -monitor none -display none -pidfile "$RUNDIR/qemu.pid" \
    -chardev file,id=con0,path="$RUNDIR/console.log" -serial chardev:con0 \
    -device virtio-rng-pci \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -fsdev local,id=fs0,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=fs0,mount_tag=hostroot \
    -fsdev local,id=fs1,path="$REPO",security_model=passthrough,multidevs=remap \
    -device virtio-9p-pci,fsdev=fs1,mount_tag=hostrw \
    -append "console=ttyS0,115200 panic=-1 quiet loglevel=4 mitigations=off tsc=reliable vm.repo=$REPO vm.run=$RUNDIR vm.timeout=$GUEST_TIMEOUT" \
    < /dev/null > "$RUNDIR/qemu.log" 2>&1 &
QPID=$!
# Interrupted: stop this guest (by its own pid file, nothing broader) and leave.
trap 'kill "$(cat "$RUNDIR/qemu.pid" 2> /dev/null)" 2> /dev/null; exit 130' INT TERM HUP

TPID=
if [ "${TCMU_VM_QUIET:-0}" != 1 ]; then
    touch "$RUNDIR/console.log"
    tail -n +1 -F --pid=$QPID "$RUNDIR/console.log" 2> /dev/null | while IFS= read -r line; do
        printf '%s\n' "${line%$'\r'}"
    done &
    TPID=$!
fi
wait $QPID
QRC=$?
if [ -n "$TPID" ]; then
    sleep 0.5
    kill "$TPID" 2> /dev/null
    wait "$TPID" 2> /dev/null
fi

# ---- report ------------------------------------------------------------------------
UP_INIT=$(sed -n 's/.*VM: guest init reached at uptime \([0-9.]*\)s.*/\1/p' "$RUNDIR/console.log" | head -n 1)
UP_MODS=$(sed -n 's/.*VM: modules loaded, configfs mounted at uptime \([0-9.]*\)s.*/\1/p' "$RUNDIR/console.log" | head -n 1)
[ -s "$RUNDIR/qemu.log" ] && { echo "VM-HOST: qemu said:"; sed 's/^/  /' "$RUNDIR/qemu.log"; }
TIMING="VM-HOST: wall $(elapsed)s; guest uptime at init ${UP_INIT:-?}s, modules ready ${UP_MODS:-?}s; qemu rc=$QRC"
echo "$TIMING" | tee "$RUNDIR/timing.txt"
echo "VM-HOST: run directory $RUNDIR"
case $QRC in
    124 | 137) echo "VM-HOST: TIMEOUT: the guest did not power off within ${HOST_TIMEOUT}s"; exit 124 ;;
esac
if [ -s "$RUNDIR/guest-rc" ]; then exit "$(cat "$RUNDIR/guest-rc")"; fi
echo "VM-HOST: the guest never reported an exit code (boot failure? see $RUNDIR/console.log)"
exit 125
