#!/usr/bin/env bash
# The GPU peer's checks in one run, for a machine with a CUDA device (peers there default to
# --device cuda, so every integration test below serves its experts from the GPU). Run from the
# repository root: bash coordinator/bench/gpu_check.sh
#   1. the expert math on the GPU in float32/bfloat16/float16 against float64, and the
#      integration tests (layer and model equality, bad input, receipts) with CUDA peers;
#   2. `bench layer` (the issue-2 workload, hivemind's server on CPU as always);
#   3. expert compute rows/s and TFLOP/s for Mixtral-, OLMoE- and Qwen-MoE-shaped experts in bf16;
#   4. `bench security` (hidden 4096, bf16): a sealed layer call against a plaintext one.
# Results go to $OUT (default /tmp/gpu-check). Wheels in .whl/ (what the machine lacks) are
# installed first when present. Each step has its own time limit and a failed step does not
# stop the next one.
set -u
cd "$(dirname "$0")/../.."  # the repository root: PYTHONPATH and the test paths below are relative to it
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
LOG=$OUT/gpu-check.log  # every step's output, one after another (one file comes back, not one per step)
step() {  # step NAME SECONDS CMD...: run CMD with a limit, append its output to $LOG, say how it ended
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "===== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >"/tmp/gpu-check-$name.log" 2>&1
  local rc=$?
  cat "/tmp/gpu-check-$name.log" >>"$LOG"
  echo "== $name: rc $rc in $((SECONDS - start)) s"
  tail -n 4 "/tmp/gpu-check-$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist where installed
step tests 200 python3 -m pytest -q -p no:cacheprovider $parallel -rfE tests/test_peer_experts.py \
  tests/test_layer_equality.py tests/test_bad_input.py tests/test_receipts.py tests/test_hf_swarm.py
step bench-layer 80 python3 -m coordinator bench layer --experts 8 --k 2 --hidden 256 --tokens 64 \
  --compare-hivemind --json "$OUT/bench-layer-gpu.json"
step experts-mixtral 80 python3 -m peer.tools.cuda_experts --hidden 4096 --ffn 14336 --experts 8 --k 2 \
  --json "$OUT/cuda-experts-mixtral.json"
step experts-olmoe 60 python3 -m peer.tools.cuda_experts --hidden 2048 --ffn 1024 --experts 64 --k 8 \
  --json "$OUT/cuda-experts-olmoe.json"
step experts-qwen 60 python3 -m peer.tools.cuda_experts --hidden 2048 --ffn 1408 --experts 60 --k 4 \
  --json "$OUT/cuda-experts-qwen.json"
step security 75 python3 -m coordinator bench security --json "$OUT/bench-security-gpu.json"
