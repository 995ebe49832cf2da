#!/usr/bin/env bash
# Bring up a two-node SLURM cluster on this one machine for the multi-node `slurm` tests.
#
# Two slurmd daemons with distinct node names (moetrain-n0, moetrain-n1; `slurmd -N NAME`), each on
# its own port, beside their own slurmctld, all in a private directory with their own ports, so the
# one-node cluster of start_slurm.sh (which this script first brings up: it installs slurm-wlm and
# munge and starts munged) keeps running beside it. The node names resolve to 127.0.0.1 through
# /etc/hosts (the entries are added once, if missing): the sbatch script's rendezvous host is the
# first node's name, as on a real cluster.
#
# Usage:   tests/slurm/start_slurm_two_nodes.sh      (prints `export SLURM_CONF=...` on its last line)
# Env:     MOETRAIN_SLURM2_DIR  config, state, logs, pid files (default /var/lib/moetrain-slurm2)
# Exit:    0 ready; 77 this machine cannot host it (as start_slurm.sh); anything else: bring-up failed.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${MOETRAIN_SLURM2_DIR:-/var/lib/moetrain-slurm2}
CONF=$DIR/slurm.conf
NODES=(moetrain-n0 moetrain-n1)
export SLURM_CONF=$CONF

log() { echo "start_slurm_two_nodes: $*" >&2; }

bash "$HERE/start_slurm.sh" >/dev/null  # packages, munged (exit 77 passes through: set -e)

running() { [ -s "$1" ] && [ "$(cat "/proc/$(cat "$1")/comm" 2>/dev/null)" = "$2" ]; }

write_conf() {  # prints "changed" when the config's content changed
    local host cpus mem new
    host=$(hostname -s)
    cpus=$(slurmd -C | head -n 1 | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    mem=$(slurmd -C | head -n 1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool/${NODES[0]}" "$DIR/spool/${NODES[1]}"
    new=$(cat <<EOF
# Two-node test cluster on one host, written by moetrain's tests/slurm/start_slurm_two_nodes.sh.
ClusterName=moetrain-two
SlurmctldHost=$host
SlurmctldPort=6917
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
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
MinJobAge=600
SlurmdTimeout=60
# Both nodes are this host: each may use every CPU (OverSubscribe), memory is split.
NodeName=${NODES[0]} NodeHostname=$host NodeAddr=127.0.0.1 Port=6921 CPUs=$cpus RealMemory=$((mem / 4)) State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$host NodeAddr=127.0.0.1 Port=6922 CPUs=$cpus RealMemory=$((mem / 4)) State=UNKNOWN
PartitionName=two Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
)
    if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new" ]; then
        printf '%s\n' "$new" >"$CONF"
        echo changed
    fi
}

stop() {  # stop PIDFILE NAME
    if running "$1" "$2"; then
        kill "$(cat "$1")" || true
        for _ in $(seq 300); do running "$1" "$2" || break; sleep 0.1; done
    fi
    rm -f "$1"
}

main() {
    for name in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1[[:space:]].*\b$name\b" /etc/hosts || echo "127.0.0.1 $name" >>/etc/hosts
    done
    exec 9>"$DIR.lock"
    flock -w 300 9 || { log "another bring-up held $DIR.lock for 300 s"; exit 1; }
    if [ "$(write_conf)" = changed ]; then
        for name in "${NODES[@]}"; do stop "$DIR/slurmd.$name.pid" slurmd; done
        stop "$DIR/slurmctld.pid" slurmctld
    fi
    running "$DIR/slurmctld.pid" slurmctld || slurmctld -f "$CONF" 9>&-
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
    for name in "${NODES[@]}"; do
        running "$DIR/slurmd.$name.pid" slurmd || slurmd -f "$CONF" -N "$name" 9>&-
    done
    for _ in $(seq 120); do
        if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)')" = 2 ]; then
            log "two-node cluster up: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        for name in "${NODES[@]}"; do
            case "$(sinfo -h -n "$name" -o %T 2>/dev/null)" in
                down*|drain*) scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true ;;
            esac
        done
        sleep 0.5
    done
    log "the two nodes did not come up; logs follow"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR"/log/slurmd.*.log >&2 || true
    exit 1
}

main "$@"
