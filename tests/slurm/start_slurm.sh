#!/usr/bin/env bash
# Bring up a one-node SLURM cluster on this machine for the `slurm`-marked tests.
#
# Installs Debian's slurm-wlm and munge when missing, writes a private slurm.conf (it never touches
# /etc/slurm), starts munged, slurmctld and slurmd as root, and waits until they are ready: both
# daemons this script started are alive (not, say, dead of "Address already in use" while another
# cluster's controller answers), `scontrol ping` says the controller is UP and the node is usable,
# twice in a row a second apart. Idempotent: a second run finds everything up in a few seconds.
#
# Usage:   tests/slurm/start_slurm.sh            (prints `export SLURM_CONF=...` on its last line)
#          eval "$(tests/slurm/start_slurm.sh | tail -n 1)"; sinfo
# Env:     MOETRAIN_SLURM_DIR  where config, state, logs and pid files live
#                              (default /var/lib/moetrain-slurm)
# Exit:    0 ready; 77 this machine cannot host it (not root, no apt-get, or apt-get cannot install
#          the packages outside CI); anything else: bring-up failed (the daemons' logs are printed).
set -euo pipefail

SLURM_DIR=${MOETRAIN_SLURM_DIR:-/var/lib/moetrain-slurm}
CONF=$SLURM_DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "start_slurm: $*" >&2; }
cannot() { log "cannot host SLURM here: $*"; exit 77; }

have_slurm() {
    for program in sbatch slurmctld slurmd munged; do command -v "$program" >/dev/null || return 1; done
}

install_packages() {
    have_slurm && return 0
    [ "$(id -u)" -eq 0 ] || cannot "not root (needed to install slurm-wlm and munge and run the daemons)"
    command -v apt-get >/dev/null || cannot "no apt-get (install slurm-wlm and munge by hand)"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 && return 0
    apt-get update -q >/dev/null 2>&1 || true
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null && return 0
    # In CI the packages must install; elsewhere (e.g. offline) that only means no SLURM here.
    [ "${CI:-}" = true ] && { log "apt-get could not install slurm-wlm and munge"; exit 1; }
    cannot "apt-get could not install slurm-wlm and munge (offline?)"
}

running() {  # running PIDFILE NAME: the process named in PIDFILE is alive and is NAME
    [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged 9>&-  # 9: the bring-up lock; a daemon must not hold it
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged did not come up"; exit 1
}

write_conf() {  # writes $CONF; prints "changed" when its content changed
    local host node_line mem new
    host=$(hostname -s)
    # `slurmd -C` describes this machine (CPUs, sockets, cores, memory); keep 90% of the memory so
    # that a small fluctuation never marks the node invalid.
    node_line=$(slurmd -C | head -n 1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$node_line")
    mkdir -p "$SLURM_DIR/state" "$SLURM_DIR/spool" "$SLURM_DIR/log"
    new=$(cat <<EOF
# One-node test cluster written by moetrain's tests/slurm/start_slurm.sh. Not for production.
ClusterName=moetrain-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
# No cgroups in containers and sandboxes: track processes by parent id, do not bind tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=0
KillWait=10
MinJobAge=600
SlurmdTimeout=60
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new" ]; then
        printf '%s\n' "$new" >"$CONF"
        echo changed
    fi
}

stop_daemon() {  # stop_daemon NAME: end the daemon of $SLURM_DIR/NAME.pid, wait until it is gone
    local pidfile=$SLURM_DIR/$1.pid
    if running "$pidfile" "$1"; then
        kill "$(cat "$pidfile")" || true
        # A controller saves its state before it exits; a new one started earlier cannot bind the port.
        for _ in $(seq 300); do running "$pidfile" "$1" || break; sleep 0.1; done
        if running "$pidfile" "$1"; then
            log "$1 did not stop within 30 s; killing it"
            kill -9 "$(cat "$pidfile")" || true
            sleep 1
        fi
    fi
    rm -f "$pidfile"
}

start_daemon() {  # start_daemon NAME: start it unless the one of NAME.pid is alive (it daemonizes)
    running "$SLURM_DIR/$1.pid" "$1" && return 0
    rm -f "$SLURM_DIR/$1.pid"  # a stale pid file would pass for the new daemon if that one dies early
    "$1" -f "$CONF" 9>&- || log "$1 exited with status $? (wait_ready prints its log)"
}

start_daemons() {  # start_daemons CHANGED
    if [ "$1" = changed ]; then
        # A new config needs fresh daemons (a node line change is not picked up by reconfigure).
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    start_daemon slurmctld
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    start_daemon slurmd
}

not_ready() {  # prints why the cluster is not ready; prints nothing when it is
    local host=$1 state
    running "$SLURM_DIR/slurmctld.pid" slurmctld || { echo "slurmctld (pid file $SLURM_DIR/slurmctld.pid) is not running"; return; }
    running "$SLURM_DIR/slurmd.pid" slurmd || { echo "slurmd (pid file $SLURM_DIR/slurmd.pid) is not running"; return; }
    scontrol ping 2>/dev/null | grep -q " is UP" || { echo "scontrol ping does not report the controller UP"; return; }
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
    case "$state" in
        idle*|mixed*|allocated*|completing*) ;;
        down*|drain*|fail*)
            # e.g. left down by an earlier daemon restart: bring it back.
            scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
            echo "node $host is '$state'" ;;
        *) echo "node $host is '${state:-not known to the controller}'" ;;
    esac
}

wait_ready() {  # ready = nothing wrong on two checks a second apart, within 60 s
    local host why ok=0
    host=$(hostname -s)
    for i in $(seq 120); do
        why=$(not_ready "$host")
        if [ -z "$why" ]; then
            ok=$((ok + 1))
            [ "$ok" -ge 2 ] && return 0
            sleep 1
        else
            ok=0
            # A daemon gets 5 s to write its pid file; one that has died stays dead.
            case "$why" in *"is not running") [ "$i" -ge 10 ] && break ;; esac
            sleep 0.5
        fi
    done
    log "the cluster is not up: ${why:-it did not stay up}; logs follow"
    tail -n 30 "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmd.log" >&2 || true
    exit 1
}

main() {
    install_packages
    [ "$(id -u)" -eq 0 ] || cannot "not root (needed to run slurmctld and slurmd)"
    # One bring-up at a time: two at once would start two controllers, and one dies unable to bind.
    mkdir -p "$SLURM_DIR"
    exec 9>"$SLURM_DIR/start.lock"
    flock -w 300 9 || { log "another start_slurm.sh held $SLURM_DIR/start.lock for 300 s"; exit 1; }
    start_munge
    start_daemons "$(write_conf)"
    wait_ready
    log "one-node cluster up: $(sinfo -h -o '%P %D %T %c CPUs')"
    echo "export SLURM_CONF=$CONF"
}

main "$@"
