#!/usr/bin/env bash
# Every GPU check and figure the open issues need, in one call on a lent GPU (../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh          # once, on the CPU machine
#   device run, carry [".whl"]:  bash scripts/gpu_checks.sh "$OUT"
# Writes (at most 8 files come back): compile.txt, bench.json + bench.png (kernels and layer vs torch loop /
# torch._grouped_mm / DeepSpeed / megatron-core / HF), gpu_tests.txt, dispatch.json (dispatch share at EP=1),
# env.txt. Each step has its own time limit (90 + 300 + 110 + 50 s: under the 600 s a device call may run),
# so one slow step cannot take the rest down; the figures come first. The grouped GEMM's TMA weight-load
# candidates (opt-in until measured) take part in the warm-up and the benchmark's autotuning: bench.json's
# "autotune" section says whether they won.
set -u
OUT=${1:?usage: scripts/gpu_checks.sh OUT_DIR}
SHAPES=mixtral,olmoe,qwen3_30b_a3b,deepseek_v3_ep4,sonicmoe
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run ../shared/device/fetch-wheels.sh and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
export MOE_ENGINE_GEMM_TMA=1
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# The benchmark autotunes every kernel over all its candidates: ~1000 compiles at these shapes, minutes
# in one process. Compile them first on all cores into the Triton cache the benchmark then reads.
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
timeout 90 python3 -m moe_engine.kernels.compile_check --shapes "$SHAPES" --no-analyse --jobs "$JOBS" \
    > "$OUT/compile.txt" 2>&1
echo "compile warm-up rc=$?" >> "$OUT/compile.txt"
timeout 300 python3 -m moe_engine bench --shapes "$SHAPES" --routing balanced,skewed --out "$OUT/bench.json" \
    >> "$OUT/env.txt" 2>&1
echo "bench rc=$?" >> "$OUT/env.txt"
# Correctness, not speed: one config per kernel (MOE_ENGINE_AUTOTUNE=0), so the tests do not autotune.
MOE_ENGINE_AUTOTUNE=0 timeout 110 python3 -m pytest -m gpu -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
timeout 50 python3 benchmarks/dispatch_overhead.py "$OUT/dispatch.json" --shapes mixtral,olmoe,qwen3_30b_a3b \
    >> "$OUT/env.txt" 2>&1
tail -3 "$OUT/compile.txt"
tail -30 "$OUT/gpu_tests.txt"
tail -60 "$OUT/env.txt"
