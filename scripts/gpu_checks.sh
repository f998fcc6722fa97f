#!/usr/bin/env bash
# Every GPU check and figure the open issues need, in one call on a lent GPU (../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh          # once, on the CPU machine
#   device run, carry [".whl"], timeout_s 590:  bash scripts/gpu_checks.sh "$OUT"
# Writes (at most 8 files come back): env.txt, gpu_tests.txt, compile.txt, bench.json + bench.png (kernels
# and layer vs torch loop / torch._grouped_mm / DeepSpeed / megatron-core / HF) and dispatch.json (the
# dispatch share at EP=1). Correctness first, then the figures; each step has its own time limit
# (100 + 80 + 320 s, under the 600 s a device call may run), so one slow step cannot take the rest
# down, and the JSON files are rewritten after every record, so a step cut short keeps what it
# measured. The grouped GEMM's TMA weight-load candidates (opt-in until measured) take part in the
# warm-up and the benchmark's autotuning: bench.json's "autotune" section says whether they won.
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
    python3 -c "import matplotlib" 2>/dev/null && echo "matplotlib: yes" || echo "matplotlib: no (bench.png is skipped)"
} > "$OUT/env.txt" 2>&1
# 1. Correctness, not speed: one config per kernel (MOE_ENGINE_AUTOTUNE=0), so the tests do not autotune.
# SIGINT at the limit: pytest then still prints the failures it has seen (-rfE).
MOE_ENGINE_AUTOTUNE=0 timeout -s INT -k 10 100 python3 -m pytest -m gpu -q -rfE --tb=short -p no:cacheprovider \
    > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
# 2. The benchmark autotunes every kernel over all its candidates: ~1000 compiles at these shapes, minutes
# in one process. Compile what fits first on all cores into the Triton cache the benchmark then reads.
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
timeout 80 python3 -m moe_engine.kernels.compile_check --shapes "$SHAPES" --no-analyse --jobs "$JOBS" \
    > "$OUT/compile.txt" 2>&1
echo "compile warm-up rc=$?" >> "$OUT/compile.txt"
# 3. The figures: the benchmark, then the dispatch overhead in the same process (the tuned configs reused).
timeout 320 python3 scripts/gpu_figures.py "$OUT" --shapes "$SHAPES" --routing balanced >> "$OUT/env.txt" 2>&1
echo "figures rc=$?" >> "$OUT/env.txt"
tail -30 "$OUT/gpu_tests.txt"
tail -3 "$OUT/compile.txt"
tail -60 "$OUT/env.txt"
