#!/usr/bin/env bash
# The GPU proof and the benchmarks, in one go, on a machine with a CUDA GPU:
#   1. the whole test suite on the GPU (bf16 tests included; nothing runs under the interpreter),
#   2. `uvit-fast bench --suite all`, saved with the device name, versions and commit.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (default: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-benchmarks/results}"
mkdir -p "$out_dir"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for GPU machines')"
pip install -q -e ".[test]"
uvit-fast info | tee "$out_dir/info.txt"
name=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
stamp="$(date +%F)-${name}"
python -m pytest -q -rs 2>&1 | tee "$out_dir/${stamp}-pytest.txt"
uvit-fast bench --suite all --out "$out_dir/${stamp}.json"
