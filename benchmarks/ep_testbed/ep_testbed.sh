#!/usr/bin/env bash
# A multi-node cluster on one host for expert-parallel runs: network namespaces are the nodes.
#
#   sudo benchmarks/ep_testbed/ep_testbed.sh [--nodes 2] [--ranks-per-node 2] [--rate 1gbit] [--delay 0.2ms]
#                                            [--timeout 1800] -- COMMAND [ARGS...]
#
# Layout: one namespace per node (addresses 10.213.0.<node+1>/24 on its eth0) and one "switch" namespace with a
# bridge; each node's eth0 is a veth whose peer sits on the bridge. Both ends of every veth get a tc token-bucket
# (tbf) rate limit, so each node has --rate up and --rate down, like a NIC on a non-blocking switch. Ranks in one
# namespace talk over its loopback (unlimited), ranks on different nodes through the limited link. Nothing is
# connected to the host's network: traffic only flows between addresses in namespaces this script created.
#
# Delay: tc netem provides it, but this kernel has no netem ("Specified qdisc kind is unknown", FINDINGS.md);
# the script tries netem and, where it is missing, says so and applies the rate limit alone.
#
# COMMAND runs once per rank inside its node's namespace, with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT (torch.distributed's env:// init), GLOO_SOCKET_IFNAME=eth0 and
# EP_TESTBED_RATE_GBIT set. A rank that fails ends the others. Everything (ranks, namespaces, links) is torn down
# on exit, on failure and on Ctrl-C (trap).
#
# Exit status: the worst rank's status; 124 on --timeout; 77 when the testbed cannot be built here (not root,
# network namespaces refused, no tc), with the reason on stderr (the CI test skips on 77).
set -uo pipefail

NODES=2
RPN=2
RATE=1gbit
DELAY=0.2ms
TIMEOUT=1800
PORT=29400
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES=$2; shift 2 ;;
        --ranks-per-node) RPN=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --delay) DELAY=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "ep_testbed: unknown option $1 (options go before --, the command after it)" >&2; exit 2 ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "ep_testbed: give the command to run per rank after --" >&2
    exit 2
fi

refuse() { echo "ep_testbed: cannot build the testbed here: $*" >&2; exit 77; }
[[ $(id -u) -eq 0 ]] || refuse "it needs root (network namespaces, veth, tc)"
command -v ip >/dev/null && command -v tc >/dev/null || refuse "iproute2 (ip, tc) is not installed"

TAG="eptb$$"
SWITCH="$TAG-sw"
CREATED=()
PIDS=()

cleanup() {
    local pid ns
    for pid in "${PIDS[@]}"; do   # ranks lead their own process groups (setsid); the watchdog does not
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    done
    sleep 0.2
    for pid in "${PIDS[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null
    done
    for ns in "${CREATED[@]}"; do
        ip netns del "$ns" 2>/dev/null
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$SWITCH" 2>/dev/null || refuse "'ip netns add' was refused (a container without CAP_SYS_ADMIN?)"
CREATED+=("$SWITCH")
ip -n "$SWITCH" link add br0 type bridge || refuse "no bridge support in this kernel"
ip -n "$SWITCH" link set br0 up
ip -n "$SWITCH" link set lo up

shape() {   # shape NAMESPACE DEVICE: delay (when netem exists) then the rate limit
    local ns=$1 dev=$2
    if tc -n "$ns" qdisc add dev "$dev" root handle 1: netem delay "$DELAY" 2>/dev/null; then
        tc -n "$ns" qdisc add dev "$dev" parent 1: handle 2: tbf rate "$RATE" burst 256kb latency 100ms
    else
        tc -n "$ns" qdisc add dev "$dev" root tbf rate "$RATE" burst 256kb latency 100ms \
            || refuse "tc refused the tbf rate limit"
        NO_NETEM=1
    fi
}

NO_NETEM=0
for ((n = 0; n < NODES; n++)); do
    ns="$TAG-n$n"
    ip netns add "$ns" || refuse "'ip netns add' was refused"
    CREATED+=("$ns")
    ip link add eth0 netns "$ns" type veth peer name "s$n" netns "$SWITCH" || refuse "veth pairs refused"
    ip -n "$ns" addr add "10.213.0.$((n + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$SWITCH" link set "s$n" master br0
    ip -n "$SWITCH" link set "s$n" up
    shape "$ns" eth0
    shape "$SWITCH" "s$n"
done
if [[ $NO_NETEM -eq 1 ]]; then
    echo "ep_testbed: tc netem is not available in this kernel: links get the $RATE rate limit but no added" \
         "delay (asked for $DELAY)" >&2
fi
RATE_GBIT=$(python3 - "$RATE" <<'EOF'
import re, sys
m = re.fullmatch(r"([0-9.]+)\s*([kmg]?)bit", sys.argv[1].lower())
print(float(m.group(1)) * {"": 1e-9, "k": 1e-6, "m": 1e-3, "g": 1.0}[m.group(2)] if m else 0)
EOF
)
echo "ep_testbed: $NODES nodes x $RPN ranks, links $RATE (namespaces $TAG-*)" >&2

WORLD=$((NODES * RPN))
for ((r = 0; r < WORLD; r++)); do
    n=$((r / RPN))
    setsid ip netns exec "$TAG-n$n" env RANK=$r WORLD_SIZE=$WORLD LOCAL_RANK=$((r % RPN)) \
        LOCAL_WORLD_SIZE=$RPN MASTER_ADDR=10.213.0.1 MASTER_PORT=$PORT GLOO_SOCKET_IFNAME=eth0 \
        EP_TESTBED_RATE_GBIT="$RATE_GBIT" "$@" &
    PIDS+=($!)
done

# Wait for every rank; the first failure (or the timeout, signalled by a watchdog) ends the rest.
TIMED_OUT=0
trap 'TIMED_OUT=1' USR1
( trap 'kill $SLEEPER 2>/dev/null; exit 0' TERM
  sleep "$TIMEOUT" & SLEEPER=$!
  wait $SLEEPER && kill -USR1 $$ ) >/dev/null 2>&1 &
WATCHDOG=$!
STATUS=0
LIVE=("${PIDS[@]}")
PIDS+=("$WATCHDOG")   # cleanup stops it too
while [[ ${#LIVE[@]} -gt 0 ]]; do
    DONE_PID=""
    wait -n -p DONE_PID "${LIVE[@]}"
    rc=$?
    if [[ $TIMED_OUT -eq 1 ]]; then
        echo "ep_testbed: ranks still running after ${TIMEOUT}s: stopping them" >&2
        STATUS=124
        break
    fi
    [[ -n "$DONE_PID" ]] || continue
    NEXT=()
    for pid in "${LIVE[@]}"; do
        [[ $pid -ne $DONE_PID ]] && NEXT+=("$pid")
    done
    LIVE=("${NEXT[@]}")
    if [[ $rc -ne 0 ]]; then
        STATUS=$rc
        echo "ep_testbed: a rank exited with status $rc: stopping the others" >&2
        break
    fi
done
exit $STATUS
