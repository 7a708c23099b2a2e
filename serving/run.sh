#!/usr/bin/env bash
# Start TF Serving on a kneetf export with docker (same flags as docker-compose.yml;
# the image's entrypoint adds --port=8500 --rest_api_port=8501).
#   serving/run.sh [BASE_PATH]      BASE_PATH defaults to saved_models/kneetf
# The ports are published on 127.0.0.1 only (TF Serving has no authentication); to expose
# them deliberately, behind TLS and an authenticating proxy: KNEETF_SERVING_HOST=0.0.0.0
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="$(cd "${1:-$HERE/../saved_models/kneetf}" && pwd)"
IMAGE="${KNEETF_SERVING_IMAGE:-tensorflow/serving:2.21.0}"
HOST="${KNEETF_SERVING_HOST:-127.0.0.1}"
if ! ls "$BASE" | grep -qE '^[0-9]+$'; then
  echo "run.sh: $BASE holds no numeric version folder; run 'kneetf export MODEL --out $BASE' first" >&2
  exit 1
fi
exec docker run --rm --name kneetf-serving \
  -p "$HOST:8500:8500" -p "$HOST:8501:8501" \
  -v "$BASE:/models/kneetf:ro" \
  -v "$HERE:/config:ro" \
  -e MODEL_NAME=kneetf \
  "$IMAGE" \
  --model_config_file=/config/models.config \
  --model_config_file_poll_wait_seconds=60 \
  --file_system_poll_wait_seconds=30 \
  --enable_batching=true \
  --batching_parameters_file=/config/batching.config \
  --monitoring_config_file=/config/monitoring.config \
  --enable_model_warmup=true
