#!/usr/bin/env bash
# The kind cluster `morgana` (kind-config.yaml) with a local image registry on localhost:5001,
# without ctlptl: kind's documented local-registry recipe
# (https://kind.sigs.k8s.io/docs/user/local-registry/), step by step. Idempotent.
#
#   bash deploy/kind-with-registry.sh          # create registry + cluster
#   kind delete cluster --name morgana         # remove the cluster
#   docker rm -f kind-registry                 # remove the registry
#
# Needs docker, kind and kubectl. `ctlptl apply -f ctlptl.yaml` does the same in one command.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_NAME="${CLUSTER_NAME:-morgana}"
REG_NAME="${REG_NAME:-kind-registry}"
REG_PORT="${REG_PORT:-5001}"

# 1. The registry container, published on 127.0.0.1:5001 only.
if [ "$(docker inspect -f '{{.State.Running}}' "$REG_NAME" 2>/dev/null || true)" != 'true' ]; then
  docker run -d --restart=always -p "127.0.0.1:${REG_PORT}:5000" --network bridge \
    --name "$REG_NAME" registry:2
fi

# 2. The cluster, with containerd's registry config_path enabled (kind-config.yaml).
if ! kind get clusters | grep -qx "$CLUSTER_NAME"; then
  kind create cluster --name "$CLUSTER_NAME" --config "$ROOT/kind-config.yaml"
fi

# 3. Tell every node's containerd that localhost:5001 is the registry container. ("localhost"
#    inside a node is the node itself, so images tagged localhost:5001/... are pulled from
#    kind-registry:5000 on the kind network.)
REGISTRY_DIR="/etc/containerd/certs.d/localhost:${REG_PORT}"
for node in $(kind get nodes --name "$CLUSTER_NAME"); do
  docker exec "$node" mkdir -p "$REGISTRY_DIR"
  printf '[host."http://%s:5000"]\n' "$REG_NAME" | docker exec -i "$node" cp /dev/stdin "$REGISTRY_DIR/hosts.toml"
done

# 4. Put the registry on the kind network (once).
if [ "$(docker inspect -f '{{json .NetworkSettings.Networks.kind}}' "$REG_NAME")" = 'null' ]; then
  docker network connect kind "$REG_NAME"
fi

# 5. Publish the registry's address (KEP-1755), which Tilt reads to know where to push.
kubectl --context "kind-${CLUSTER_NAME}" apply -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: local-registry-hosting
  namespace: kube-public
data:
  localRegistryHosting.v1: |
    host: "localhost:${REG_PORT}"
    help: "https://kind.sigs.k8s.io/docs/user/local-registry/"
EOF

echo "kind cluster '${CLUSTER_NAME}' (context kind-${CLUSTER_NAME}) with registry localhost:${REG_PORT} is ready"
