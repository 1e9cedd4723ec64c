#!/usr/bin/env bash
# A real two-node SLURM on one machine: each slurmd lives in its own network namespace with its own
# address, so a 2-node job's ranks rendezvous and all-reduce over a (virtual) network, not loopback.
#
#   sudo scripts/slurm_netns.sh up        # bridge + 2 netns + munged + slurmctld + 2 slurmd, a few seconds
#   export SLURM_CONF=/tmp/propulsion-slurm-netns/slurm.conf      # `up` prints this line
#   GLOO_SOCKET_IFNAME=pds0 sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 launch/slurm/train.sbatch
#   sudo scripts/slurm_netns.sh down      # cancels jobs, stops daemons, deletes the namespaces and links
#
# Layout (root namespace holds slurmctld and the bridge; munged's socket is a file, shared by all):
#
#     root ns: bridge pdsbr0 10.77.0.254/24  <- slurmctld, and the sbatch/squeue clients
#        |-- veth pdsh1 <-> pds0 10.77.0.1 in netns pds-node1   <- slurmd -N node1 (NodeAddr 10.77.0.1)
#        `-- veth pdsh2 <-> pds0 10.77.0.2 in netns pds-node2   <- slurmd -N node2 (NodeAddr 10.77.0.2)
#
# Both namespaces name their interface pds0, so GLOO_SOCKET_IFNAME=pds0 (or NCCL_SOCKET_IFNAME) works
# on either node. The hostname is the machine's in both namespaces and resolves to 127.0.0.1: without
# GLOO_SOCKET_IFNAME, gloo would advertise loopback to the other node and the job would hang.
# Needs root and `ip netns add` (CAP_SYS_ADMIN, CAP_NET_ADMIN). Settings (environment): SLURM_NETNS_DIR
# [/tmp/propulsion-slurm-netns], SLURM_NETNS_PORT [6837; slurmd 6838], SLURM_NETNS_SUBNET [10.77.0],
# SLURM_NETNS_PREFIX [pds: netns pds-node1/2, bridge pdsbr0, interface pds0] -- tests use their own.
set -euo pipefail

# shellcheck source=scripts/slurm_local.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_local.sh"

DIR=${SLURM_NETNS_DIR:-/tmp/propulsion-slurm-netns}
PORT=${SLURM_NETNS_PORT:-6837}
NET=${SLURM_NETNS_SUBNET:-10.77.0}           # first three octets of the /24
P=${SLURM_NETNS_PREFIX:-pds}                 # names: netns $P-node1, bridge ${P}br0, interface ${P}0
BRIDGE=${P}br0
NODES=(node1 node2)

ns_of() { echo "$P-$1"; }

net_up() {
    local i node ns
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET.254/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    for i in 1 2; do
        node=node$i ns=$(ns_of "$node")
        ip netns list | grep -qw "$ns" || ip netns add "$ns"
        if ! ip netns exec "$ns" ip link show "${P}0" >/dev/null 2>&1; then
            ip link del "${P}h$i" 2>/dev/null || true
            ip link add "${P}h$i" type veth peer name "${P}n$i"
            ip link set "${P}n$i" netns "$ns"
            ip netns exec "$ns" ip link set "${P}n$i" name "${P}0"
            ip netns exec "$ns" ip addr add "$NET.$i/24" dev "${P}0"
        fi
        ip link set "${P}h$i" master "$BRIDGE"
        ip link set "${P}h$i" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip link set "${P}0" up
    done
}

net_down() {
    local i
    for i in 1 2; do
        ip link del "${P}h$i" 2>/dev/null || true
        ip netns del "$P-node$i" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

# net_check: TCP from node2's namespace to node1's, and from node1's to slurmctld's bridge address.
net_check() {
    local py='import socket,sys
s=socket.socket(); s.settimeout(5)
try: s.connect((sys.argv[1], int(sys.argv[2])))
except ConnectionRefusedError: pass  # reached the host: nothing listens there, which is fine
except OSError as e: sys.exit(f"no route to {sys.argv[1]}: {e}")'
    ip netns exec "$P-node2" python3 -c "$py" "$NET.1" 9 || die "node2 cannot reach node1 over $BRIDGE"
    ip netns exec "$P-node1" python3 -c "$py" "$NET.254" 9 || die "node1 cannot reach the bridge address"
}

netns_up() {
    check_prereqs
    command -v ip >/dev/null || die "ip not found: apt-get install -y iproute2"
    local err
    if ! err=$(ip netns add "$P-probe" 2>&1); then
        [[ $err == *"File exists"* ]] || die "ip netns add not permitted: $err"
    fi
    ip netns del "$P-probe" 2>/dev/null || true
    net_up
    net_check
    mkdir -p "$DIR"
    if ! { pid_alive "$DIR/slurmctld.pid" && [[ -f $DIR/slurm.conf ]]; }; then
        # slurmctld accepts "localhost" as its own name; clients in the namespaces reach it at the bridge IP.
        write_conf "$DIR" "localhost($NET.254)" "$PORT" \
            "NodeName=node1 NodeAddr=$NET.1 CPUs=1 State=UNKNOWN
NodeName=node2 NodeAddr=$NET.2 CPUs=1 State=UNKNOWN" "node[1-2]"
    fi
    start_munged "$DIR"
    start_slurmctld "$DIR"
    local node
    for node in "${NODES[@]}"; do
        # nsenter --net, not `ip netns exec`: the latter also gives the daemon a fresh /sys without
        # /sys/fs/cgroup, and slurmd 22.05 then fails ("Unable to initialize cgroup plugin").
        start_slurmd "$DIR" "$node" nsenter --net="/run/netns/$(ns_of "$node")"
    done
    wait_idle "$DIR" 2
    say "ready: $(SLURM_CONF=$DIR/slurm.conf sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
    echo "export SLURM_CONF=$DIR/slurm.conf"
}

netns_down() {
    SLURM_LOCAL_DIR=$DIR cmd_down
    net_down
}

case ${1:-} in
    up) netns_up ;;
    down) netns_down ;;
    status) SLURM_LOCAL_DIR=$DIR cmd_status; ip netns list | grep "^$P-" || true ;;
    *) echo "usage: $0 up|down|status   (state in \$SLURM_NETNS_DIR=$DIR)" >&2; exit 2 ;;
esac
