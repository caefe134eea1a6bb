#!/usr/bin/env bash
# Install (or remove) tcmu-py-runner's systemd unit, D-Bus activation file, D-Bus policy and
# logrotate file.  See systemd/README.md for what goes where and why.
#
# usage: scripts/install-service.sh [--root DIR] [--prefix /usr/local|/usr] [--bindir DIR]
#                                   [--force] [--uninstall]
#   --root DIR    install below DIR instead of / (a package staging root, or a test)
#   --prefix P    /usr/local (default: its activation file takes precedence over the one of
#                 Debian's tcmu-runner) or /usr (for distribution packages)
#   --bindir DIR  where the tcmu-py-runner command is (default PREFIX/bin); ExecStart= and
#                 Exec= are rewritten to DIR/tcmu-py-runner
#   --force       overwrite an activation file that is not ours (another package's)
#   --uninstall   remove the files an earlier install placed (only files that are ours)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/../systemd" && pwd -P)
ROOT=/ PREFIX=/usr/local BINDIR='' FORCE=0 UNINSTALL=0
MARK=tcmu-py-runner  # every file we install names it; we never touch one that does not

die() { echo "install-service: $*" >&2; exit 1; }
say() { echo "install-service: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --bindir) BINDIR=${2:?--bindir needs a directory}; shift 2 ;;
        --force) FORCE=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
case $PREFIX in /usr|/usr/local) ;; *) die "--prefix must be /usr/local or /usr, not '$PREFIX'" ;; esac
BINDIR=${BINDIR:-$PREFIX/bin}
case $BINDIR in /*) ;; *) die "--bindir must be an absolute path, not '$BINDIR'" ;; esac
case $BINDIR in *'|'*|*'&'*|*\\*) die "--bindir may not contain '|', '&' or '\\'" ;; esac
[ -d "$ROOT" ] || die "--root $ROOT is not a directory"
ROOT=${ROOT%/}

UNIT=$ROOT$PREFIX/lib/systemd/system/tcmu-py-runner.service
ACTIVATION=$ROOT$PREFIX/share/dbus-1/system-services/org.kernel.TCMUService1.service
if [ "$PREFIX" = /usr ]; then
    POLICY=$ROOT/usr/share/dbus-1/system.d/tcmu-py-runner.conf
else  # dbus-daemon reads no policy below /usr/local: the admin's place is /etc
    POLICY=$ROOT/etc/dbus-1/system.d/tcmu-py-runner.conf
fi
LOGROTATE=$ROOT/etc/logrotate.d/tcmu-py-runner
DEBIAN_ACTIVATION=$ROOT/usr/share/dbus-1/system-services/org.kernel.TCMUService1.service

ours() { [ -f "$1" ] && grep -q "$MARK" "$1"; }

if [ "$UNINSTALL" = 1 ]; then
    for f in "$UNIT" "$ACTIVATION" "$POLICY" "$LOGROTATE"; do
        if ours "$f"; then rm -f "$f" && say "removed $f"
        elif [ -e "$f" ]; then say "left $f alone: it is not tcmu-py-runner's"
        fi
    done
    say "now: systemctl daemon-reload; systemctl reload dbus"
    exit 0
fi

if [ -e "$ACTIVATION" ] && ! ours "$ACTIVATION" && [ "$FORCE" != 1 ]; then
    owner=$(dpkg -S "${ACTIVATION#"$ROOT"}" 2>/dev/null | cut -d: -f1 || true)
    die "$ACTIVATION belongs to ${owner:-another package} (Debian's tcmu-runner installs one there);" \
        "use the default --prefix /usr/local, whose file takes precedence, or --force"
fi

install_file() {  # install_file SRC DEST MODE [rewrite the command path]
    local src=$1 dest=$2 mode=$3 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$dest.XXXXXX")
    sed -e "s|^ExecStart=/usr/bin/tcmu-py-runner|ExecStart=$BINDIR/tcmu-py-runner|" \
        -e "s|^Exec=/usr/bin/tcmu-py-runner|Exec=$BINDIR/tcmu-py-runner|" "$src" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
    say "installed $dest"
}

install_file "$SRC/tcmu-py-runner.service" "$UNIT" 644
install_file "$SRC/org.kernel.TCMUService1.service" "$ACTIVATION" 644
install_file "$SRC/tcmu-py-runner.conf" "$POLICY" 644
install_file "$SRC/logrotate.conf" "$LOGROTATE" 644

if [ ! -x "$ROOT$BINDIR/tcmu-py-runner" ] && [ ! -x "$BINDIR/tcmu-py-runner" ]; then
    say "warning: $BINDIR/tcmu-py-runner does not exist (yet); install tcmu-py there or pass --bindir"
fi
if [ "$PREFIX" = /usr/local ] && [ -e "$DEBIAN_ACTIVATION" ] && ! ours "$DEBIAN_ACTIVATION"; then
    say "note: ${DEBIAN_ACTIVATION#"$ROOT"} (Debian's tcmu-runner) is shadowed by ours: D-Bus" \
        "activation now starts tcmu-py-runner; --uninstall switches back"
fi
if [ "$ROOT" = "" ]; then
    say "now: systemctl daemon-reload; systemctl reload dbus;" \
        "systemctl mask --now tcmu-runner.service (if installed); systemctl enable --now tcmu-py-runner"
fi
