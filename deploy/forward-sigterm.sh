#!/bin/sh
# Pass a preemption notice on to the run: drain this Ray node (Ray's own
# notice, with a deadline), forward SIGTERM to the training workers on it,
# then hold the node up while they write their emergency checkpoint.
#
# Why: when a Spot VM is reclaimed, the SIGTERM goes to the container's PID 1
# (KubeRay's `ray start --block` wrapper, or `bash` under the Ray cluster
# launcher), which does not pass it on. ckptmgr takes its emergency checkpoint
# when a *training worker* gets SIGTERM (ckptmgr.distributed), so something
# has to deliver it there:
#   - KubeRay: the GPU worker container's preStop hook (deploy/kuberay-rayjob.yaml)
#   - Ray cluster launcher on GCE: the VM's shutdown-script (deploy/cluster-gcp.yaml)
#
# It signals only processes whose command line contains PATTERN: Ray titles an
# actor's process "ray::ClassName...", and ckptmgr's training actors are
# ckptmgr.ray_job.TrainWorker. Never raylet or the object store,
# which the other ranks and the coordinator still need during the save. It
# then waits until those processes are gone or GRACE seconds have passed:
# a preStop hook that returns early lets Kubernetes kill the pod at once.
#
# Usage: forward-sigterm.sh [GRACE_SECONDS]   (default 25 = ray.grace_period_s)
#   CKPTMGR_WORKER_PATTERN overrides the pattern (default ray::TrainWorker).

GRACE="${1:-25}"
PATTERN="${CKPTMGR_WORKER_PATTERN:-ray::TrainWorker}"

# First, Ray's own notice: drain this node with reason PREEMPTION and a
# deadline GRACE seconds away, as the autoscaler and KubeRay do for spot
# nodes. ckptmgr's coordinator watches Ray's draining nodes: every rank
# (Ray Train workers too, which cannot catch SIGTERM) takes an emergency
# snapshot into the memory tier on nodes that are not draining, and storage
# gets it in the background. The SIGTERM below stays as the fallback.
# CKPTMGR_DRAIN=0 skips this; CKPTMGR_NODE_ID names the node (default: ask
# the Ray node this runs on).
drain_this_node() {
    [ "${CKPTMGR_DRAIN:-1}" = "0" ] && return 0
    command -v ray >/dev/null 2>&1 || { echo "forward-sigterm: no ray command; not draining"; return 0; }
    node="${CKPTMGR_NODE_ID:-$(timeout 15 python3 -c 'import ray; ray.init(address="auto", logging_level="ERROR", log_to_driver=False); print(ray.get_runtime_context().get_node_id())' 2>/dev/null | tail -n 1)}"
    if [ -z "$node" ]; then
        echo "forward-sigterm: no Ray node here; not draining"
        return 0
    fi
    if timeout 15 ray drain-node --address "${RAY_ADDRESS:-auto}" --node-id "$node" \
            --reason DRAIN_NODE_REASON_PREEMPTION --reason-message "preStop: node terminating" \
            --deadline-remaining-seconds "$GRACE" >/dev/null 2>&1; then
        echo "forward-sigterm: asked Ray to drain node $node (deadline ${GRACE}s)"
    else
        echo "forward-sigterm: ray drain-node failed for node $node; relying on SIGTERM"
    fi
}
drain_this_node

matching() {
    for dir in /proc/[0-9]*; do
        pid="${dir#/proc/}"
        [ "$pid" = "$$" ] && continue
        # /proc/PID/cmdline is NUL-separated; Ray's setproctitle rewrites it.
        if tr '\0' ' ' < "$dir/cmdline" 2>/dev/null | grep -F -q -- "$PATTERN"; then
            echo "$pid"
        fi
    done
}

pids="$(matching)"
if [ -z "$pids" ]; then
    echo "forward-sigterm: no process matches '$PATTERN'; nothing to do"
    exit 0
fi
for pid in $pids; do
    kill -TERM "$pid" 2>/dev/null
done
echo "forward-sigterm: sent SIGTERM to $(echo $pids | wc -w) process(es) matching '$PATTERN'; waiting up to ${GRACE}s"

waited=0
while [ "$waited" -lt "$GRACE" ]; do
    alive=""
    for pid in $pids; do
        # Gone, or a zombie (empty cmdline) waiting to be reaped: done.
        [ -n "$(tr -d '\0' < "/proc/$pid/cmdline" 2>/dev/null)" ] && alive="$alive $pid"
    done
    [ -z "$alive" ] && break
    sleep 1
    waited=$((waited + 1))
done
echo "forward-sigterm: done after ${waited}s"
exit 0
