#!/bin/bash
# TF Serving readiness: every model named in models.config has a version in state
# AVAILABLE (GET /v1/models/<name> on the REST port). The official image has bash but
# no curl or wget, so the request goes through bash's /dev/tcp.
#
# Environment: TFS_MODEL_CONFIG (default /models/models.config),
#              TFS_REST_PORT (default 8501), TFS_HOST (default 127.0.0.1).
# Exit 0 when ready, 1 otherwise (with the reason on stdout, shown by kubectl describe).
set -u
config="${TFS_MODEL_CONFIG:-/models/models.config}"
port="${TFS_REST_PORT:-8501}"
host="${TFS_HOST:-127.0.0.1}"

if [[ ! -r "$config" ]]; then
  echo "not ready: cannot read $config"
  exit 1
fi
# ModelConfig entries are `name: "<model>"` lines; no other field of the file is `name`.
mapfile -t models < <(sed -n 's/^[[:space:]]*name:[[:space:]]*"\([^"]*\)".*/\1/p' "$config")
if (( ${#models[@]} == 0 )); then
  echo "not ready: no model in $config"
  exit 1
fi

for model in "${models[@]}"; do
  if ! exec 3<>"/dev/tcp/$host/$port"; then
    echo "not ready: TF Serving REST port $port does not answer"
    exit 1
  fi
  printf 'GET /v1/models/%s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' \
    "$model" "$host" >&3
  response=""
  # Bounded reads: a server that stops answering fails the probe, it never hangs it.
  while IFS= read -r -t 3 line || [[ -n "$line" ]]; do
    response+="$line"$'\n'
    line=""
  done <&3
  exec 3<&-
  status_line="${response%%$'\n'*}"
  if [[ ! "$status_line" =~ ^HTTP/1\.[01]\ 200 ]]; then
    echo "not ready: $model: ${status_line:-no response}"
    exit 1
  fi
  if [[ ! "$response" =~ \"state\"[[:space:]]*:[[:space:]]*\"AVAILABLE\" ]]; then
    echo "not ready: $model has no AVAILABLE version"
    exit 1
  fi
done
echo "ready: ${models[*]}"
exit 0
