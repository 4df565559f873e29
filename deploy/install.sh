#!/usr/bin/env bash
# Install Morgana and what it runs beside (CloudNativePG Postgres, Valkey, LiveKit) with Helm,
# in the order they depend on each other. Every step is a plain helm/kubectl command you can
# also paste by hand (deploy/README.md lists them); chart versions come from deploy/versions.env.
#
#   bash deploy/install.sh              # everything, into the current kubectl context
#   bash deploy/install.sh STEP...      # some steps, e.g. `secrets` (the Tiltfile runs that one)
#
# Steps, in order: repos namespace secrets operator database valkey livekit wait-db images morgana
#
# Settings (environment):
#   MORGANA_NAMESPACE    where Morgana and its dependencies go (default: morgana)
#   MORGANA_VALUES       values file for charts/morgana (default: deploy/values/morgana-dev.yaml)
#   IMAGE_REGISTRY       registry the `images` step pushes to (default: localhost:5001)
#   IMAGE_TAG            tag it pushes (default: dev; the dev values use it)
#   SKIP_IMAGES=1        leave the `images` step out of a full run (images already pushed)
#   ALLOW_NON_KIND=1     install the development values into a context that is not kind-*
#   OPENAI_API_KEY, OPENAI_BASE_URL, LLM_MODEL          the model (the key may be any value
#                        for a keyless OpenAI-compatible server)
#   LIVEKIT_API_KEY, LIVEKIT_API_SECRET, JWT_SECRET_KEY, API_USER_PASSWORD
#                        credentials; each one not given keeps the value already in the
#                        cluster, else is generated (openssl rand -hex 32 and the like)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=deploy/versions.env
source "$ROOT/deploy/versions.env"

NAMESPACE="${MORGANA_NAMESPACE:-morgana}"
MORGANA_VALUES="${MORGANA_VALUES:-$ROOT/deploy/values/morgana-dev.yaml}"
IMAGE_REGISTRY="${IMAGE_REGISTRY:-localhost:5001}"
IMAGE_TAG="${IMAGE_TAG:-dev}"
VALUES="$ROOT/deploy/values"
# Secrets this script manages (names used by deploy/values/*.yaml).
LIVEKIT_SECRET=morgana-livekit
MORGANA_SECRET=morgana-secrets

log() { printf '\n==> %s\n' "$*" >&2; }

# 1. The charts' repositories.
step_repos() {
  log "helm repositories"
  helm repo add cnpg https://cloudnative-pg.github.io/charts --force-update
  helm repo add valkey https://valkey.io/valkey-helm/ --force-update
  helm repo add livekit https://helm.livekit.io --force-update
  helm repo update cnpg valkey livekit
}

# 2. The namespace everything but the CloudNativePG operator goes into.
step_namespace() {
  log "namespace $NAMESPACE"
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply --server-side -f -
}

# The decoded value of KEY in Secret NAME, or nothing.
secret_value() {
  kubectl get secret "$1" --namespace "$NAMESPACE" --ignore-not-found \
    -o go-template="{{ with index .data \"$2\" }}{{ . }}{{ end }}" | base64 -d
}

# A YAML double-quoted scalar.
yaml_quote() {
  local value="${1//\\/\\\\}"
  printf '"%s"' "${value//\"/\\\"}"
}

# The voice agent's password: a random machine secret (the API asks 16+ characters).
gen_agent_password() {
  openssl rand -hex 16
}

# 3. Credentials: from the environment, else what the cluster already has, else new ones.
# (Server-side apply: no last-applied-configuration annotation repeating the values.)
step_secrets() {
  log "secrets $LIVEKIT_SECRET and $MORGANA_SECRET in $NAMESPACE"
  local lk_key lk_secret jwt openai agent
  lk_key="${LIVEKIT_API_KEY:-$(secret_value "$LIVEKIT_SECRET" api-key)}"
  lk_key="${lk_key:-API$(openssl rand -hex 6)}"
  lk_secret="${LIVEKIT_API_SECRET:-$(secret_value "$LIVEKIT_SECRET" api-secret)}"
  lk_secret="${lk_secret:-$(openssl rand -hex 32)}"
  jwt="${JWT_SECRET_KEY:-$(secret_value "$MORGANA_SECRET" jwt-secret)}"
  jwt="${jwt:-$(openssl rand -hex 32)}"
  agent="${API_USER_PASSWORD:-$(secret_value "$MORGANA_SECRET" agent-password)}"
  agent="${agent:-$(gen_agent_password)}"
  openai="${OPENAI_API_KEY:-$(secret_value "$MORGANA_SECRET" openai-api-key)}"
  if [ -z "$openai" ]; then
    echo "warning: OPENAI_API_KEY is not set: chat and voice answers will fail until you re-run" \
         "'OPENAI_API_KEY=... bash deploy/install.sh secrets' (any value for a keyless server)" >&2
    openai="not-configured"
  fi

  # The LiveKit key pair, read by the LiveKit server (keys.yaml) and by Morgana (api-key, api-secret).
  kubectl create secret generic "$LIVEKIT_SECRET" --namespace "$NAMESPACE" \
    --from-literal=api-key="$lk_key" \
    --from-literal=api-secret="$lk_secret" \
    --from-literal=keys.yaml="$(yaml_quote "$lk_key"): $(yaml_quote "$lk_secret")" \
    --dry-run=client -o yaml | kubectl apply --server-side --force-conflicts --field-manager=morgana-install -f -
  # Morgana's own: token signing, the model key, the voice agent's API password.
  kubectl create secret generic "$MORGANA_SECRET" --namespace "$NAMESPACE" \
    --from-literal=jwt-secret="$jwt" \
    --from-literal=openai-api-key="$openai" \
    --from-literal=agent-password="$agent" \
    --dry-run=client -o yaml | kubectl apply --server-side --force-conflicts --field-manager=morgana-install -f -
}

# 4. The CloudNativePG operator (CRDs + controller, cluster-wide).
step_operator() {
  log "CloudNativePG operator $CNPG_OPERATOR_CHART_VERSION"
  helm upgrade --install cnpg cnpg/cloudnative-pg --version "$CNPG_OPERATOR_CHART_VERSION" \
    --namespace cnpg-system --create-namespace --wait --timeout 5m
}

# 5. The Postgres cluster morgana-db (Service morgana-db-rw, Secret morgana-db-app).
step_database() {
  log "Postgres cluster morgana-db (cnpg/cluster $CNPG_CLUSTER_CHART_VERSION)"
  helm upgrade --install morgana-db cnpg/cluster --version "$CNPG_CLUSTER_CHART_VERSION" \
    --namespace "$NAMESPACE" -f "$VALUES/cnpg-cluster.yaml"
}

# 6. Valkey (Service morgana-valkey).
step_valkey() {
  log "Valkey (valkey/valkey $VALKEY_CHART_VERSION)"
  helm upgrade --install morgana-valkey valkey/valkey --version "$VALKEY_CHART_VERSION" \
    --namespace "$NAMESPACE" -f "$VALUES/valkey.yaml" --wait --timeout 5m
}

# 7. LiveKit (Service livekit-server), with the key pair from step 3.
step_livekit() {
  log "LiveKit server $LIVEKIT_SERVER_VERSION (livekit/livekit-server $LIVEKIT_SERVER_CHART_VERSION)"
  helm upgrade --install livekit-server livekit/livekit-server --version "$LIVEKIT_SERVER_CHART_VERSION" \
    --namespace "$NAMESPACE" -f "$VALUES/livekit-server.yaml" \
    --set image.tag="$LIVEKIT_SERVER_VERSION" --wait --timeout 5m
}

# 8. Wait until Postgres accepts connections and its app Secret exists.
step_wait_db() {
  log "waiting for Postgres morgana-db"
  local i
  for i in $(seq 1 120); do
    kubectl get secret morgana-db-app --namespace "$NAMESPACE" >/dev/null 2>&1 && break
    [ "$i" -lt 120 ] || { echo "Secret morgana-db-app did not appear" >&2; return 1; }
    sleep 5
  done
  kubectl wait --namespace "$NAMESPACE" --for=condition=Ready cluster.postgresql.cnpg.io/morgana-db --timeout=10m
}

# 9. Morgana's images, built from this checkout and pushed to the local registry.
step_images() {
  log "images $IMAGE_REGISTRY/morgana-{api,agent,controller}:$IMAGE_TAG"
  local component
  for component in api agent controller; do
    docker build -f "$ROOT/images/$component/Dockerfile" -t "$IMAGE_REGISTRY/morgana-$component:$IMAGE_TAG" "$ROOT"
    docker push "$IMAGE_REGISTRY/morgana-$component:$IMAGE_TAG"
  done
}

# 10. Morgana itself (its migration Job runs first, as a pre-install hook).
step_morgana() {
  local context extra=()
  context="$(kubectl config current-context)"
  if [ "$MORGANA_VALUES" = "$ROOT/deploy/values/morgana-dev.yaml" ] && [[ "$context" != kind-* ]] \
      && [ "${ALLOW_NON_KIND:-}" != 1 ]; then
    echo "refusing to install the development values into context '$context' (not kind-*):" \
         "set MORGANA_VALUES to your values file, or ALLOW_NON_KIND=1" >&2
    return 1
  fi
  if [ "$MORGANA_VALUES" = "$ROOT/deploy/values/morgana-dev.yaml" ]; then
    # The images the `images` step pushed.
    extra+=(--set-string image.registry="$IMAGE_REGISTRY" --set-string image.tag="$IMAGE_TAG")
  fi
  [ -z "${OPENAI_BASE_URL:-}" ] || extra+=(--set-string llm.baseUrl="$OPENAI_BASE_URL")
  [ -z "${LLM_MODEL:-}" ] || extra+=(--set-string llm.model="$LLM_MODEL")
  log "Morgana (charts/morgana, $MORGANA_VALUES)"
  helm upgrade --install morgana "$ROOT/charts/morgana" --namespace "$NAMESPACE" \
    -f "$MORGANA_VALUES" ${extra[@]+"${extra[@]}"} --wait --timeout 10m
}

next_steps() {
  cat >&2 <<EOF

Morgana is installed in namespace $NAMESPACE.
  kubectl -n $NAMESPACE port-forward svc/morgana-api 8000:8000   # then http://localhost:8000/docs
  helm test morgana -n $NAMESPACE                                 # health and readiness check
LiveKit answers on ws://localhost:7880 (kind port mapping).
EOF
}

main() {
  local steps=("$@")
  if [ ${#steps[@]} -eq 0 ]; then
    steps=(repos namespace secrets operator database valkey livekit wait-db)
    [ "${SKIP_IMAGES:-}" = 1 ] || steps+=(images)
    steps+=(morgana)
  fi
  echo "kubectl context: $(kubectl config current-context), namespace: $NAMESPACE" >&2
  local step
  for step in "${steps[@]}"; do
    case "$step" in
      repos | namespace | secrets | operator | database | valkey | livekit | images | morgana) "step_$step" ;;
      wait-db) step_wait_db ;;
      *) echo "unknown step '$step'" >&2; return 2 ;;
    esac
  done
  [ "${steps[${#steps[@]}-1]}" != morgana ] || next_steps
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
