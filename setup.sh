#!/usr/bin/env bash
# Set up osslbench on a fresh machine: a virtual environment in .venv with torch, torchvision and the
# project (with its test, Hugging Face and cluster extras). Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to the builds this project is tested with (on this workplace's machines they install
# from the local disk: x86_64 takes 2.14.1 / 0.29.1, aarch64 2.9.1 / 0.24.1).
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) .venv/bin/python -m pip install -q torch==2.9.1 torchvision==0.24.1 ;;
    *) .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 ;;
  esac
fi
.venv/bin/python -m pip install -q -e ".[dev,hf,cluster]"
echo "osslbench is set up: .venv/bin/osslbench --help"
