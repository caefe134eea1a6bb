#!/usr/bin/env bash
# ceph.sh -- the project's throw-away single-node Ceph (Debian's ceph 16 packages) for the
# rbd handler's tests: mon + mgr + OSD(s), cephx, bound to 127.0.0.1, no systemd.
#
#   ceph.sh start DIR           start a cluster in DIR; stdout = ONE line, the conf path;
#                               exit 0 = pool "rbd" exists, is rbd-initialised and every PG
#                               serves I/O.  On failure: log tails on stderr, everything
#                               started is stopped, exit 1.
#   ceph.sh stop DIR [--keep]   stop the daemons by their recorded PIDs, remove DIR
#                               (--keep: stop cleanly and keep DIR for a post-mortem)
#   ceph.sh osd ACTION DIR ID   fault injection on osd.ID: pause (SIGSTOP), resume
#                               (SIGCONT), kill (SIGKILL + `osd down`), stop (SIGTERM),
#                               start (and wait until it is up)
#
# Every wait is bounded (CEPH_TIMEOUT); daemons are signalled only by the PIDs recorded
# in DIR/pids, after checking /proc/PID/cmdline still names DIR.  Settings (environment):
#   CEPH_STORE=memstore|bluestore  CEPH_OSDS=1  CEPH_OSD_SIZE=1G  CEPH_MGR=1
#   CEPH_POOL=rbd  CEPH_PG_NUM=8  CEPH_IMAGES="name:size ..."  CEPH_TIMEOUT=60
#   CEPH_LIFETIME=0 (>0: a watchdog stops the cluster after that many seconds, even if
#   the caller dies)  CEPH_CONF_EXTRA / CEPH_CLIENT_CONF_EXTRA / CEPH_OSD_CONF_EXTRA
#   (extra [global] / [client] / [osd] lines)  CEPH_PYTHON (a Python that imports rados
#   and rbd)
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CEPH_TIMEOUT=${CEPH_TIMEOUT:-60}
T0=$EPOCHREALTIME
log() { printf '[ceph.sh %s %5.2fs] %s\n' "$CMD" "$(bc <<<"$EPOCHREALTIME - $T0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# A Python that imports Debian's rados/rbd: $CEPH_PYTHON, the checkout's venv, Debian's.
pick_python() {
  local p
  for p in "${CEPH_PYTHON:-}" "$HERE/../.venv/bin/python" /usr/bin/python3; do
    [ -n "$p" ] && [ -x "$p" ] || continue
    "$p" -c 'import rados, rbd' 2>/dev/null && { echo "$p"; return 0; }
  done
  return 1
}
ops() { timeout $((CEPH_TIMEOUT + 5)) "$PY" "$HERE/ceph_ops.py" "$DIR" "$CEPH_TIMEOUT" "$@"; }

# is PID alive (not a zombie) and started for this DIR?
ours() {
  local p=$1
  [ -n "$p" ] && [ "$p" != "$$" ] && [ -r "/proc/$p/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF -- "$DIR/" || return 1
  [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]
}
pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null || true; }

# ---- stop ---------------------------------------------------------------------------
# Order: watchdog and OSDs first (with the mon up, an OSD's shutdown notice is acked at
# once; without it each OSD waits 5 s), then the mgr, then the mon.
stop_group() {  # stop_group REGEX SIGNAL
  local f name p deadline victims=()
  for f in "$DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    [[ $name =~ ^($1)$ ]] || continue
    p=$(cat "$f")
    if ours "$p"; then
      kill -CONT "$p" 2>/dev/null || true   # a paused daemon cannot act on SIGTERM
      kill -"$2" "$p" 2>/dev/null || true
      victims+=("$name:$p")
    fi
    rm -f "$f"
  done
  deadline=$((SECONDS + ${STOP_TIMEOUT:-10}))
  for v in "${victims[@]}"; do
    name=${v%%:*}; p=${v##*:}
    while ours "$p"; do
      if [ $SECONDS -ge $deadline ]; then
        log "$name (pid $p) ignored SIG$2 for ${STOP_TIMEOUT:-10}s: SIGKILL"
        kill -KILL "$p" 2>/dev/null || true
        break
      fi
      sleep 0.02
    done
  done
}

cmd_stop() {
  local keep=${1:-}
  [ -d "$DIR" ] || { log "$DIR does not exist; nothing to do"; return 0; }
  [ -f "$DIR/ceph.conf" ] && [ -d "$DIR/pids" ] || die "$DIR is not a ceph.sh cluster dir"
  if [ "$keep" = --keep ]; then
    stop_group 'watchdog|osd\..*' TERM   # memstore saves its data on a clean umount
  else
    stop_group 'watchdog' TERM
    stop_group 'osd\..*' KILL            # the data is thrown away: skip memstore's save
  fi
  stop_group 'mgr\..*' TERM
  stop_group 'mon\..*' TERM
  stop_group '.*' TERM
  if [ "$keep" = --keep ]; then
    log "stopped; kept $DIR"
  else
    rm -rf "$DIR"
    log "stopped; removed $DIR"
  fi
}

# ---- osd fault injection --------------------------------------------------------------
cmd_osd() {
  local action=$1 id=$2 p
  [ -f "$DIR/ceph.conf" ] || die "no cluster in $DIR"
  p=$(pid_of "osd.$id")
  case $action in
    pause|resume)
      ours "$p" || die "osd.$id is not running"
      kill -"$([ "$action" = pause ] && echo STOP || echo CONT)" "$p" ;;
    kill|stop)
      ours "$p" || { log "osd.$id is not running"; return 0; }
      kill -CONT "$p" 2>/dev/null || true
      kill -"$([ "$action" = kill ] && echo KILL || echo TERM)" "$p"
      local deadline=$((SECONDS + CEPH_TIMEOUT))
      while ours "$p"; do
        [ $SECONDS -lt $deadline ] || die "osd.$id (pid $p) did not exit"
        sleep 0.02
      done
      rm -f "$DIR/pids/osd.$id.pid"
      # a lone OSD has no peer to report it: tell the mon, or it notices after 900 s
      [ "$action" = kill ] && ops osd-down "$id"
      ;;
    start)
      ours "$p" && { log "osd.$id already running"; return 0; }
      spawn "osd.$id" ceph-osd -c "$DIR/ceph.conf" -i "$id"
      ops osd-up "$id" ;;
    *) usage ;;
  esac
}

# start a daemon in the foreground (-f, so $! is its PID), in its own session
spawn() {
  local name=$1; shift
  setsid "$@" -f </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
}

# ---- start ----------------------------------------------------------------------------
cmd_start() {
  local store=${CEPH_STORE:-memstore} nosds=${CEPH_OSDS:-1} osd_size=${CEPH_OSD_SIZE:-1G}
  local pool=${CEPH_POOL-rbd} pg_num=${CEPH_PG_NUM:-8} mgr=${CEPH_MGR:-1}
  local lifetime=${CEPH_LIFETIME:-0} b i
  for b in ceph-mon ceph-osd ceph-authtool monmaptool uuidgen numfmt bc setsid timeout; do
    command -v "$b" >/dev/null || die "missing $b: run scripts/setup.sh (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common)"
  done
  [ "$mgr" = 1 ] && { command -v ceph-mgr >/dev/null || die "missing ceph-mgr: run scripts/setup.sh"; }
  case $store in memstore|bluestore) ;; *) die "CEPH_STORE=$store: use memstore or bluestore";; esac
  case $DIR in /|/tmp|/var|/usr|/etc|/home|/root|/opt|/srv|/dev/shm|"$HOME") die "refusing DIR=$DIR";; esac
  if compgen -G "$DIR/pids/*.pid" >/dev/null; then
    die "$DIR has PID files: a cluster may run there; run '$0 stop $DIR' first"
  fi
  if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/ceph.conf" ]; then
    die "$DIR is not empty and not a ceph.sh cluster dir"
  fi
  rm -rf "$DIR"
  mkdir -p "$DIR"/{pids,run,log,crash}

  START_OK=0
  on_exit() {
    local rc=$?
    [ "$START_OK" = 1 ] && return 0
    log "start failed (rc $rc); log tails:"
    local f
    for f in "$DIR"/log/*; do
      [ -s "$f" ] && { echo "---- $f" >&2; tail -n 15 "$f" >&2; }
    done
    cmd_stop --keep || true
    log "logs kept in $DIR/log"
    exit 1
  }
  trap on_exit EXIT

  # Two free consecutive ports for the mon (msgr2, msgr1), below the ephemeral range.
  local p2 p1
  read -r p2 p1 < <("$PY" - <<'EOF'
import random, socket
for _ in range(200):
    p = random.randrange(20000, 32000, 2)
    socks = []
    try:
        for q in (p, p + 1):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", q))
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(p, p + 1)
    break
EOF
  )
  [ -n "${p2:-}" ] || die "no free port pair for the mon"
  local monaddr="[v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]" fsid conf=$DIR/ceph.conf keyring=$DIR/keyring
  fsid=$(uuidgen)

  # Every client gets this conf explicitly: with no /etc/ceph/ceph.conf and no mon_host,
  # a client would look the mons up in DNS (SRV _ceph-mon._tcp) instead.
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = $monaddr
public addr = 127.0.0.1
cluster addr = 127.0.0.1
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $keyring
run dir = $DIR/run
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon cluster log file = $DIR/log/cluster.log
mgr initial modules = iostat
# default 1 s: each osdmap change (pool create, rbd pool init) would wait that long
paxos propose interval = 0.1
${CEPH_CONF_EXTRA:-}

[client]
# a client's first op after an OSD restart can wait one objecter tick (default 5 s)
objecter tick interval = 1
# CLI clients (rbd, ceph, rados) never hang on an unreachable cluster
client mount timeout = 30
rados mon op timeout = 30
${CEPH_CLIENT_CONF_EXTRA:-}

[mon]
mon data = $DIR/mon.\$id
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok

[mgr]
mgr data = $DIR/mgr.\$id
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok

[osd]
osd data = $DIR/osd.\$id
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
osd objectstore = $store
osd check max object name len on startup = false
EOF
  if [ "$store" = memstore ]; then
    # memstore writes its data to disk only on a clean umount, which fast shutdown skips:
    # a restarted OSD would come back empty and client ops would hang.
    cat >>"$conf" <<EOF
memstore device bytes = $(numfmt --from=iec "$osd_size")
memstore page set = true
memstore page size = 4096
osd fast shutdown = false
EOF
  else
    cat >>"$conf" <<EOF
bluestore block size = $(numfmt --from=iec "$osd_size")
bluestore fsck on mkfs = false
osd memory target = 1073741824
# the OSD opens the block device ~10 times at mkfs and boot; each close waits one poll
bdev aio poll ms = 20
EOF
  fi
  [ -z "${CEPH_OSD_CONF_EXTRA:-}" ] || printf '%s\n' "$CEPH_OSD_CONF_EXTRA" >>"$conf"

  # One keyring for every entity: `ceph-mon --mkfs` imports them all with their caps,
  # and each OSD finds its key there before it opens its store.
  ceph-authtool --create-keyring "$keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
    --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$keyring" --gen-key -n mgr.x --cap mon 'allow profile mgr' --cap osd 'allow *' \
    --cap mds 'allow *' >/dev/null
  for ((i = 0; i < nosds; i++)); do
    ceph-authtool "$keyring" --gen-key -n "osd.$i" --cap mon 'allow profile osd' \
      --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
  done

  monmaptool --create --fsid "$fsid" --addv a "$monaddr" "$DIR/monmap" >/dev/null
  timeout "$CEPH_TIMEOUT" ceph-mon -c "$conf" --mkfs -i a --monmap "$DIR/monmap" \
    --keyring "$keyring" >"$DIR/log/mon.a.mkfs.out" 2>&1 || die "ceph-mon --mkfs failed"
  spawn mon.a ceph-mon -c "$conf" -i a
  log "mon.a (pid $(pid_of mon.a)) on $monaddr"

  local uuids=() ids
  for ((i = 0; i < nosds; i++)); do uuids+=("$(uuidgen)"); done
  ids=$(ops osd-new "${uuids[@]}") || die "osd new failed"
  [ "$(echo $ids)" = "$(seq -s ' ' 0 $((nosds - 1)))" ] || die "unexpected OSD ids: $ids"

  if [ "$mgr" = 1 ]; then
    mkdir -p "$DIR/mgr.x"
    spawn mgr.x ceph-mgr -c "$conf" -i x
  fi
  local mkfs=()
  for ((i = 0; i < nosds; i++)); do
    mkdir -p "$DIR/osd.$i"
    timeout "$CEPH_TIMEOUT" ceph-osd -c "$conf" -i "$i" --mkfs --osd-uuid "${uuids[$i]}" \
      >"$DIR/log/osd.$i.mkfs.out" 2>&1 &
    mkfs+=($!)
  done
  for p in "${mkfs[@]}"; do wait "$p" || die "ceph-osd --mkfs failed"; done
  for ((i = 0; i < nosds; i++)); do spawn "osd.$i" ceph-osd -c "$conf" -i "$i"; done

  if [ -n "$pool" ]; then
    # shellcheck disable=SC2086  # CEPH_IMAGES is a list
    ops ready "$nosds" "$pool" "$pg_num" ${CEPH_IMAGES:-} || die "cluster not ready"
  else
    ops ready "$nosds" || die "cluster not ready"
  fi

  cat >"$DIR/env.sh" <<EOF
# source me: the ceph, rbd and rados CLIs then use this cluster
export CEPH_CONF=$conf
export CEPH_ARGS="--conf $conf"
EOF
  if [ "$lifetime" -gt 0 ]; then
    # one process: a builtin read with a timeout on a FIFO nobody writes, then the stop
    mkfifo "$DIR/run/watchdog.fifo"
    setsid bash -c 'read -r -t "$1" <>"$2"; exec "$3" stop "$4"' _ "$lifetime" \
      "$DIR/run/watchdog.fifo" "$HERE/ceph.sh" "$DIR" </dev/null >"$DIR/log/watchdog.out" 2>&1 &
    echo $! >"$DIR/pids/watchdog.pid"
    log "watchdog (pid $!) stops the cluster in ${lifetime}s"
  fi
  START_OK=1
  log "ready: $conf"
  echo "$conf"
}

# ---- main -------------------------------------------------------------------------------
CMD=${1:-}
case $CMD in
  start|stop) [ $# -ge 2 ] || usage; DIR=$(realpath -m "$2") ;;
  osd) [ $# -eq 4 ] || usage; DIR=$(realpath -m "$3") ;;
  *) usage ;;
esac
PY=$(pick_python) || die "no Python that imports rados and rbd: run scripts/setup.sh or set CEPH_PYTHON"
case $CMD in
  start) cmd_start ;;
  stop) cmd_stop "${3:-}" ;;
  osd) cmd_osd "$2" "$4" ;;
esac
