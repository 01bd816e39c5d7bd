#!/usr/bin/env bash
# The GPU half of benchmarks/RESULTS.md in one command, for a machine whose python3 already holds
# PyTorch, Triton and timm (the workplace's device machines do); lipsim runs from this working
# tree through PYTHONPATH, nothing is installed. Usage, from the repository root:
#     bash benchmarks/gpu_run.sh OUTDIR
# Writes OUTDIR/gpu.txt (card, versions), OUTDIR/bench.txt (the table) and OUTDIR/bench.json.
# Every implementation is checked against the baseline network on the GPU before it is timed
# (Triton kernels included: a failed check drops the row and says so in the notes).
set -uo pipefail
out="${1:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name())" 2>&1 | tee -a "$out/gpu.txt"
timeout "${BENCH_TIMEOUT:-450}" python3 benchmarks/bench_speed.py --device cuda \
    --archs small,s2d-lite --default-arch s2d-lite --compile --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
