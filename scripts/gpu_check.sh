#!/usr/bin/env bash
# One run on a fresh GPU machine, most informative first, each step under its own time budget, all
# output in one folder (at most 8 files, so that a device run's $OUT brings every one back):
#
#   summary.txt        device, driver, Python/torch/triton versions, commit, and each step's time and exit code
#   parity.txt         1. GPU parity of every op at the flagship shapes, bf16/fp16/fp32 (~2 min)
#   bench-ops.jsonl    2. op benchmarks at the flagship shapes (attention first), with its printed
#   bench-ops.txt         table; then 2b. FP8 (scripts/gpu_bench_fp8.py: fp8_linear against bf16 cuBLAS
#                         and torch._scaled_mm at U-ViT-H/2 batch 64, quantized vs bf16 forwards,
#                         torchao where installed), its rows appended to both files
#   bench-models.json  3. model rows: `uvit-fast bench --suite models` (its markdown table is
#   bench-models.md       written next to it)
#                      4. `uvit-fast bench --suite sampling --quick`: ms per guided DDIM step of U-ViT-H/2
#                         and DiT-XL/2 at batch 1 and 8 (plain eager, fused eager, fused + CUDA graph; the
#                         torch.compile rows are listed as not selected: compiling U-ViT-H takes minutes),
#                         then host us per op call and per forward. To stay at 8 files its markdown table
#                         is appended to bench-models.md and its JSON (one line, after a
#                         "### bench-sampling JSON" line) to pytest.txt
#   pytest.txt         5. the rest of the test suite on the GPU, quick tests first, then the slow ones, for
#                         the time that is left (the logs
#                         of steps 3 and 4 go here too)
#   kernels.txt        `uvit-fast kernels --arch sm_XX` for this device's architecture, compiled
#                      on the CPU cores in the background while the GPU steps run
#
# Usage: bash scripts/gpu_check.sh OUT_DIR [TOTAL_SECONDS]   (default 570: fits a 10-minute call)
# Exits 2 at once without a CUDA device. Nothing is downloaded: the package is installed from this
# checkout without its dependencies (or, where pip cannot, the checkout is put on PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [TOTAL_SECONDS]" >&2
  exit 2
fi
out_dir=$1
total=${2:-570}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
start=$(date +%s)
summary="$out_dir/summary.txt"

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device: this script is for GPU machines" | tee "$summary" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

# --- the package, with no network: an editable install without dependencies, else (pip cannot build
# it) the checkout itself on PYTHONPATH with kernels/ linked in as uvit_fast/kernels (a throwaway copy's
# working tree is changed then; `python -m` puts the checkout first on sys.path either way)
if ! "$PY" -c "import uvit_fast.kernels" 2>/dev/null; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
      || ! "$PY" -c "import uvit_fast.kernels" 2>/dev/null; then
    [ -e uvit_fast/kernels ] || ln -s ../kernels uvit_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
UVF=("$PY" -m uvit_fast.cli)

left() { echo $(( total - ($(date +%s) - start) )); }

# step NAME BUDGET_S LOGFILE CMD...: runs CMD under `timeout`, never longer than the time left
# (less a 15 s reserve for the summary), appends its output to LOGFILE and one line to the summary
step() {
  local name=$1 budget=$2 log=$3
  shift 3
  local avail=$(( $(left) - 15 ))
  [ "$budget" -gt "$avail" ] && budget=$avail
  if [ "$budget" -lt 10 ]; then
    printf '%-14s skipped: no time left\n' "$name" >>"$summary"
    return
  fi
  local t0 rc
  t0=$(date +%s)
  echo "### $name (budget ${budget}s): $*" >>"$log"
  timeout --kill-after=10 "$budget" "$@" >>"$log" 2>&1
  rc=$?
  local note=""
  [ $rc -eq 124 ] && note=" (stopped at its budget)"
  printf '%-14s rc=%-3s %4ss of %4ss%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" "$note" >>"$summary"
}

{
  echo "# scripts/gpu_check.sh, $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  "$PY" - <<'EOF'
import platform, torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"not importable ({exc})"
p = torch.cuda.get_device_properties(0)
print(f"python: {platform.python_version()}  torch: {torch.__version__} (CUDA {torch.version.cuda})  triton: {tv}")
print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
EOF
  echo "total budget: ${total}s"
  echo
  echo "step           exit  seconds"
} >"$summary" 2>&1

# --- background, on the CPU cores: the compiled-kernel report for this device's architecture
cap=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
arch=""
case "$cap" in 90) arch=sm_90 ;; 80) arch=sm_80 ;; esac
kernels_pids=()
kernels_tmp=$(mktemp -d)
if [ -n "$arch" ]; then
  # one process per model shape, 16-bit first; all killed at the end if still compiling
  for shape in uvit-h2 dit-xl2 uvit-m4 clip-l14-text clip-l14-vision vivit-b; do
    nice -n 10 timeout $(( total - 30 )) "${UVF[@]}" kernels --arch "$arch" --shape "$shape" --dtype bf16 --dtype fp16 \
      --no-progress >"$kernels_tmp/$shape.txt" 2>&1 &
    kernels_pids+=($!)
  done
else
  echo "uvit-fast kernels: no report for sm_$cap (only sm_90 and sm_80 are modelled)" >"$kernels_tmp/none.txt"
fi

# --- 1. parity of every op at the flagship shapes (bf16 included)
step parity 150 "$out_dir/parity.txt" "$PY" scripts/gpu_parity_flagship.py
# --- 2. op benchmarks at the flagship shapes
step bench-ops 150 "$out_dir/bench-ops.txt" "$PY" scripts/gpu_bench_flagship.py --out "$out_dir/bench-ops.jsonl" --budget 130
# --- 2b. FP8: fp8_linear against bf16 cuBLAS and torch._scaled_mm, quantized forwards (issue 24's targets)
step bench-fp8 90 "$out_dir/bench-ops.txt" "$PY" scripts/gpu_bench_fp8.py --out "$out_dir/bench-ops.jsonl" --budget 75
# --- 3. model rows
step bench-models 100 "$out_dir/pytest.txt" "${UVF[@]}" bench --suite models --out "$out_dir/bench-models.json" \
  --time-budget 80 --no-progress
# --- 4. sampling: time per guided DDIM step (eager, fused, fused + CUDA graph; batch 1 and 8), host time
sampling_tmp=$(mktemp -d)
step bench-sampling 90 "$out_dir/pytest.txt" "${UVF[@]}" bench --suite sampling --quick --time-budget 45 \
  --provider eager --provider uvit_fast --provider uvit_fast_cuda_graph \
  --out "$sampling_tmp/sampling.json" --no-progress
if [ -f "$sampling_tmp/sampling.json" ]; then
  { echo; cat "$sampling_tmp/sampling.md"; } >>"$out_dir/bench-models.md"
  { echo "### bench-sampling JSON"; "$PY" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
      "$sampling_tmp/sampling.json"; } >>"$out_dir/pytest.txt"
fi
rm -rf "$sampling_tmp"
# --- 5. the rest of the test suite, for the time that is left
step pytest 600 "$out_dir/pytest.txt" "$PY" -m pytest -q -rs -p no:cacheprovider -m "not slow" --durations=15 tests \
  --ignore=tests/test_compiled_facts.py
step pytest-slow 600 "$out_dir/pytest.txt" "$PY" -m pytest -q -rs -p no:cacheprovider -m slow --durations=15 tests \
  --ignore=tests/test_compiled_facts.py

# --- the kernel report: whatever finished (the rest is stopped now)
for pid in ${kernels_pids[@]+"${kernels_pids[@]}"}; do
  kill "$pid" 2>/dev/null
done
wait 2>/dev/null
cat "$kernels_tmp"/*.txt >"$out_dir/kernels.txt" 2>/dev/null
rm -rf "$kernels_tmp"
printf '%-14s %s lines in kernels.txt (background, %s)\n' "kernels" "$(wc -l <"$out_dir/kernels.txt")" "${arch:-none}" >>"$summary"
echo "total: $(( $(date +%s) - start ))s" >>"$summary"
cat "$summary"
