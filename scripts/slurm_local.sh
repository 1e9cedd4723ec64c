#!/usr/bin/env bash
# A real, single-machine SLURM cluster for trying launch/slurm/train.sbatch and for tests/test_slurm.py.
#
#   sudo scripts/slurm_local.sh up        # munged + slurmctld + slurmd (node "localhost"), ~5 s
#   export SLURM_CONF=/tmp/propulsion-slurm/slurm.conf     # `up` prints this line
#   sbatch --ntasks-per-node=2 launch/slurm/train.sbatch
#   sudo scripts/slurm_local.sh status
#   sudo scripts/slurm_local.sh down      # cancels jobs, stops the daemons by their pid files
#
# Needs root and the Debian packages slurmctld slurmd slurm-client munge (the munge package creates
# /etc/munge/munge.key). Nothing system-wide is touched: every file (slurm.conf, state, spool, logs, pid
# files, the munge socket) lives under $SLURM_LOCAL_DIR, and this script's own munged runs on its own
# socket, so a system munged/slurm (if any) is left alone. No systemd and no cgroups are needed
# (proctrack/linuxproc, task/none). `up` is idempotent: daemons already running are kept.
#
# Settings (environment):
#   SLURM_LOCAL_DIR   state directory                           [/tmp/propulsion-slurm]
#   SLURM_LOCAL_CPUS  CPUs the node offers                      [number of online CPUs]
#   SLURM_LOCAL_PORT  slurmctld port; slurmd uses PORT+1        [6817]
#
# scripts/slurm_netns.sh sources this file for the same functions (two nodes in network namespaces).
set -euo pipefail

SLURM_LOCAL_DIR=${SLURM_LOCAL_DIR:-/tmp/propulsion-slurm}
SLURM_LOCAL_CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
SLURM_LOCAL_PORT=${SLURM_LOCAL_PORT:-6817}

die() { echo "slurm_local: $*" >&2; exit 1; }
say() { echo "slurm_local: $*" >&2; }

# pid_alive PIDFILE -> 0 when the file names a running process
pid_alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# stop_pidfiles PIDFILE...: SIGTERM every process the pid files name (all at once: each daemon takes
# 1-2 s to exit), wait up to 10 s, SIGKILL what is left, remove the pid files.
stop_pidfiles() {
    local f pid pids=() i
    for f in "$@"; do
        if pid_alive "$f"; then pid=$(<"$f"); pids+=("$pid"); kill -TERM "$pid" 2>/dev/null || true
            say "stopping $(basename "$f" .pid) ($pid)"; fi
    done
    for i in $(seq 100); do
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
        [[ -z ${pid:-} ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null && { say "$pid ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
    done
    rm -f "$@"
}

check_prereqs() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as the submitting user; munged needs the key)"
    local b
    for b in munged slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$b" >/dev/null || die "$b not found: apt-get install -y slurmctld slurmd slurm-client munge"
    done
    [[ -r /etc/munge/munge.key ]] || die "/etc/munge/munge.key missing (reinstall munge, or create it with mungekey)"
}

# start_munged DIR: a private munged on DIR/munge/munge.socket, run as the munge user (as the package does).
start_munged() {
    local d=$1/munge i
    mkdir -p "$d"
    chown munge:munge "$d"
    chmod 0755 "$d"
    if pid_alive "$d/munged.pid"; then return 0; fi
    rm -f "$d/munge.socket" "$d/munge.socket.lock"
    runuser -u munge -- munged --socket="$d/munge.socket" --pid-file="$d/munged.pid" \
        --log-file="$d/munged.log" --seed-file="$d/munged.seed" --key-file=/etc/munge/munge.key \
        || die "munged failed to start; see $d/munged.log"
    for i in $(seq 50); do [[ -S $d/munge.socket ]] && break; sleep 0.1; done
    [[ -S $d/munge.socket ]] || die "munged did not create $d/munge.socket; see $d/munged.log"
    say "munged up ($(<"$d/munged.pid"))"
}

# write_conf DIR CTLD_HOST PORT NODE_LINES PARTITION_NODES
write_conf() {
    local dir=$1 ctld=$2 port=$3 nodes=$4 pnodes=$5 tmp
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    tmp=$(mktemp "$dir/slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
# Written by scripts/slurm_local.sh: a throw-away cluster for tests. Every path is under $dir.
ClusterName=propulsion
SlurmctldHost=$ctld
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (cred_expire + 1 s;
# SLURM's default is 120 s). 10 s keeps the preemption test short.
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups (containers, CI): track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every 2 s (default 60 s), so a requeued job starts soon after its delay.
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Jobs may requeue themselves (train.sbatch does on exit code 75).
JobRequeue=1
# Keep finished jobs visible to "scontrol show job" for 10 minutes (there is no accounting DB).
MinJobAge=600
KillWait=15
InactiveLimit=0
$nodes
PartitionName=debug Nodes=$pnodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv "$tmp" "$dir/slurm.conf"
    chmod 0644 "$dir/slurm.conf"
}

start_slurmctld() {
    local dir=$1
    if pid_alive "$dir/slurmctld.pid"; then return 0; fi
    # -c: start with no jobs from an earlier session (this is a throw-away cluster).
    slurmctld -c -f "$dir/slurm.conf" || die "slurmctld failed; see $dir/log/slurmctld.log"
    say "slurmctld up"
}

# start_slurmd DIR NODENAME [PREFIX...]: PREFIX runs it elsewhere, e.g. "ip netns exec node1".
start_slurmd() {
    local dir=$1 node=$2; shift 2
    mkdir -p "$dir/spool/$node"
    if pid_alive "$dir/slurmd.$node.pid"; then return 0; fi
    "$@" slurmd -f "$dir/slurm.conf" -N "$node" || die "slurmd $node failed; see $dir/log/slurmd.$node.log"
    say "slurmd $node up"
}

# wait_idle DIR N: until N nodes report idle (ReturnToService=2 brings them back from down).
wait_idle() {
    local dir=$1 want=$2 i n
    for i in $(seq 150); do
        n=$(SLURM_CONF=$dir/slurm.conf sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle' || true)
        [[ $n -ge $want ]] && return 0
        sleep 0.2
    done
    SLURM_CONF=$dir/slurm.conf sinfo -N -l >&2 || true
    die "nodes not idle after 30 s; logs under $dir/log"
}

cancel_all() {
    local dir=$1 i
    [[ -f $dir/slurm.conf ]] && pid_alive "$dir/slurmctld.pid" || return 0
    export SLURM_CONF=$dir/slurm.conf
    scancel --full --signal=KILL $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    scancel $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for i in $(seq 50); do [[ -z $(squeue -h -t R,CG -o %i 2>/dev/null) ]] && break; sleep 0.2; done
}

cmd_up() {
    check_prereqs
    local d=$SLURM_LOCAL_DIR
    mkdir -p "$d"
    if ! { pid_alive "$d/slurmctld.pid" && [[ -f $d/slurm.conf ]]; }; then
        write_conf "$d" localhost "$SLURM_LOCAL_PORT" \
            "NodeName=localhost CPUs=$SLURM_LOCAL_CPUS State=UNKNOWN" localhost
    fi
    start_munged "$d"
    start_slurmctld "$d"
    # -N localhost: the node is named "localhost" whatever this machine's hostname is.
    start_slurmd "$d" localhost
    wait_idle "$d" 1
    say "ready: $(SLURM_CONF=$d/slurm.conf sinfo -h -o '%P %D nodes %C cpus(A/I/O/T) %t')"
    echo "export SLURM_CONF=$d/slurm.conf"
}

cmd_down() {
    local d=$SLURM_LOCAL_DIR
    cancel_all "$d"
    shopt -s nullglob
    stop_pidfiles "$d"/slurmd.*.pid "$d/slurmctld.pid" "$d/munge/munged.pid"
}

cmd_status() {
    local d=$SLURM_LOCAL_DIR f rc=0
    for f in "$d/munge/munged.pid" "$d/slurmctld.pid" "$d"/slurmd.*.pid; do
        [[ -e $f ]] || continue
        if pid_alive "$f"; then echo "running  $(basename "$f" .pid) pid $(<"$f")"; else echo "dead     $f"; rc=1; fi
    done
    pid_alive "$d/slurmctld.pid" || { echo "slurmctld not running (state dir $d)"; return 1; }
    SLURM_CONF=$d/slurm.conf sinfo -N -o '%N %t %C %O' || rc=1
    SLURM_CONF=$d/slurm.conf squeue || rc=1
    echo "export SLURM_CONF=$d/slurm.conf"
    return $rc
}

main() {
    case ${1:-} in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        *) echo "usage: $0 up|down|status   (state in \$SLURM_LOCAL_DIR=$SLURM_LOCAL_DIR)" >&2; exit 2 ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
