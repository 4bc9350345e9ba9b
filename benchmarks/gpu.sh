#!/usr/bin/env bash
# One prepared GPU run: the training-step table of docs/benchmarks.md on the DeiT setting (DeiT-S student, RegNetY-16GF
# teacher, 224 px, bf16, batch 256) with model FLOPs utilisation, each fast-path switch, the step from a teacher-output
# cache (DeiT-Ti), torch.compile, the loaders' images/s on the machine's cores (PIL, and DALI on the GPU), and a DeiT-Ti
# SHAKE run end to end. About 6 minutes on an H200 without the DALI stages (measured); they add about 8 more (an
# estimate: not yet run on a GPU). Writes the tables to $OUT
# (default benchmarks/out).
#   bash benchmarks/gpu.sh                                  # every stage
#   STAGES="dali_loader end_to_end" bash benchmarks/gpu.sh  # those alone
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
  if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then return; fi  # STAGES="a b": those alone
  echo "## $name ($(date -u +%T))"
  "$@" 2>&1 | tee "$OUT/$name.md" || echo "!! stage $name failed (exit ${PIPESTATUS[0]})"
}
stage step bench
stage fast_path bench --methods deit_hard shake --variant teacher.inference_mode=false --variant teacher.precision=bf16 \
  --variant teacher.channels_last=true --variant optim.fused=false
# the teacher-output cache: the real DeiT-Ti + RegNetY-16GF pair, live against a top-10 cache read from disk
stage cache bench --preset gpu_tiny --methods none shake shake_cached
stage data python3 -m benchmarks.data_throughput --workers "$(nproc)" --batch-size 256 --batches 40
# the DALI loader (data.loader=dali) beside PIL's, then a DeiT-Ti SHAKE run end to end four ways (PIL + live teacher
# eager; PIL + cache + compile; DALI + live + compile; DALI + cache + compile): about 8 minutes (estimated)
if python3 -c 'import nvidia.dali' 2>/dev/null; then
  stage dali_loader python3 -m benchmarks.data_throughput --loaders pil dali --transforms train eval \
    --workers "$(nproc)" --dali-threads 8 --batch-size 256 --batches 40
  stage end_to_end python3 -m benchmarks.end_to_end --workers "$(nproc)" --steps 30 --batch-size 256
else
  echo "!! stages dali_loader and end_to_end skipped: NVIDIA DALI is not installed (pip install -r" \
       "requirements-dali.txt; on a machine with no registry, carry its wheels: docs/benchmarks.md)"
fi
# last: compiling the RegNetY-16GF teacher and the DeiT-S student takes the longest
stage compile bench --methods deit_hard shake --repeats 3 --variant train.compile=true --variant teacher.compile=true \
  --variant 'train.compile=true teacher.compile=true'
echo "## done ($(date -u +%T))"
