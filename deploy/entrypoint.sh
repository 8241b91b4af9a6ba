#!/bin/sh
# Container entrypoint: runs the given command (moe-peer ... / moe-swarm ...).
#
# With MOE_BOOTSTRAP_READY_FILE set (deploy/compose.yaml), it first joins the bootstrap node
# that writes that file (`moe-swarm bootstrap --ready-file`): the bootstrap's libp2p peer id
# is new on every start, so wait for the file, then export its multiaddr, dialled by the
# address of host MOE_BOOTSTRAP_HOST, as MOE_PEER_INITIAL_PEERS and MOE_SWARM_INITIAL_PEERS.
# The bootstrap itself (MOE_SWARM_READY_FILE set) removes a file left by its previous run.
set -eu

if [ -n "${MOE_SWARM_READY_FILE:-}" ]; then
    rm -f "$MOE_SWARM_READY_FILE"
fi

if [ -n "${MOE_BOOTSTRAP_READY_FILE:-}" ]; then
    waited=0
    until [ -s "$MOE_BOOTSTRAP_READY_FILE" ]; do
        if [ "$waited" -ge "${MOE_BOOTSTRAP_WAIT:-120}" ]; then
            echo "moe-entrypoint: no bootstrap ready file at $MOE_BOOTSTRAP_READY_FILE after ${waited}s" >&2
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    addr=$(python3 - "$MOE_BOOTSTRAP_READY_FILE" "${MOE_BOOTSTRAP_HOST:-bootstrap}" <<'PY'
import json, re, socket, sys

maddr = json.load(open(sys.argv[1]))["maddrs"][0]
port, peer = re.search(r"/tcp/(\d+)/p2p/(\w+)", maddr).groups()
print(f"/ip4/{socket.gethostbyname(sys.argv[2])}/tcp/{port}/p2p/{peer}")
PY
)
    export MOE_PEER_INITIAL_PEERS="$addr" MOE_SWARM_INITIAL_PEERS="$addr"
fi

exec "$@"
