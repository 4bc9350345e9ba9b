#!/usr/bin/env bash
# One prepared GPU run, about 6 minutes on an H200: the training-step table of docs/benchmarks.md on the DeiT setting
# (DeiT-S student, RegNetY-16GF teacher, 224 px, bf16, batch 256) with model FLOPs utilisation, each fast-path switch,
# the step from a teacher-output cache (DeiT-Ti), torch.compile, and the loader's images/s on the machine's cores. Writes the tables to $OUT (default benchmarks/out).
#   bash benchmarks/gpu.sh
# The lent GPU machines hold PyTorch but may lack this project's pins (timm>=1.0.31 for timm.task, omegaconf): put
# their wheels in .whl/ (see docs/benchmarks.md) and carry that folder; they are installed to /tmp/site first.
set -uo pipefail  # not -e: a stage that fails is reported and the others still run
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || \
   ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "benchmarks/gpu.sh needs an NVIDIA GPU: nvidia-smi and a CUDA build of PyTorch that sees the device" \
       "(torch.cuda.is_available()). This machine has none; its CPU figures come from" \
       "python -m benchmarks.step_throughput and python -m benchmarks.data_throughput (docs/benchmarks.md)." >&2
  exit 2
fi
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
bench() { python3 -m benchmarks.step_throughput --preset gpu --steps 10 --warmup 5 --repeats 5 "$@"; }
stage() {  # stage NAME COMMAND...: its output to $OUT/NAME.md, its failure reported without stopping the others
  local name=$1; shift
  echo "## $name ($(date -u +%T))"
  "$@" 2>&1 | tee "$OUT/$name.md" || echo "!! stage $name failed (exit ${PIPESTATUS[0]})"
}
stage step bench
stage fast_path bench --methods deit_hard shake --variant teacher.inference_mode=false --variant teacher.precision=bf16 \
  --variant teacher.channels_last=true --variant optim.fused=false
# the teacher-output cache: the real DeiT-Ti + RegNetY-16GF pair, live against a top-10 cache read from disk
stage cache bench --preset gpu_tiny --methods none shake shake_cached
stage data python3 -m benchmarks.data_throughput --workers "$(nproc)" --batch-size 256 --batches 40
# last: compiling the RegNetY-16GF teacher and the DeiT-S student takes the longest
stage compile bench --methods deit_hard shake --repeats 3 --variant train.compile=true --variant teacher.compile=true \
  --variant 'train.compile=true teacher.compile=true'
echo "## done ($(date -u +%T))"
