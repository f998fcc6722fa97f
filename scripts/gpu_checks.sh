#!/usr/bin/env bash
# Every GPU check and figure the open issues need, in one call on a lent GPU (../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh && bash scripts/fetch_gpu_extras.sh     # once, on the CPU machine
#   device run, carry [".whl"], timeout_s 590:  bash scripts/gpu_checks.sh "$OUT"
# Writes (at most 8 files come back): env.txt, gpu_tests.txt, compile.txt, micro.json (router and permute
# vs torch), dispatch.json (the dispatch share at EP=1) and bench.json + bench.png (the layer vs torch loop /
# torch._grouped_mm / DeepSpeed / megatron-core / HF). Correctness first, then the figures, cheapest
# first. Steps 1 and 2 have their own limits (100 + 80 s); the figures get what is left of the
# GPU_CHECKS_SECONDS budget (default 570, under the device call's 590), and every JSON file is rewritten
# after every record, so a step cut short keeps what it measured. The grouped GEMM's TMA weight-load
# candidates (opt-in until measured) take part in the warm-up and the benchmark's autotuning only if
# their GPU test passed; env.txt says which, and bench.json's "autotune" section whether they won.
set -u
START=$SECONDS
BUDGET=${GPU_CHECKS_SECONDS:-570}
OUT=${1:?usage: scripts/gpu_checks.sh OUT_DIR}
SHAPES=mixtral,olmoe,qwen3_30b_a3b,deepseek_v3_ep4,sonicmoe
# The issues' peers: ours (and with recompute, to price it), torch._grouped_mm, the torch loop, DeepSpeed
# (cf=1), megatron-core, and transformers' grouped_mm and our kernels through its experts interface.
PEERS=ours,ours_recompute,grouped_mm,torch_loop,deepspeed,megatron,hf_grouped_mm,hf_moe_engine
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run ../shared/device/fetch-wheels.sh and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 scripts/gpu_install_missing.py .whl/extra /tmp/site
    for module in pytest matplotlib sklearn deepspeed megatron.core datasets transformers; do
        python3 -c "import $module" 2>/dev/null && echo "$module: yes" || echo "$module: no"
    done
} > "$OUT/env.txt" 2>&1
# 1. Correctness, not speed: one config per kernel (MOE_ENGINE_AUTOTUNE=0), so the tests do not autotune.
# SIGINT at the limit: pytest then still prints the failures it has seen (-rfE) and the passes (-rp).
# A module that fails to import (a package the image lacks) must not stop the others.
MOE_ENGINE_AUTOTUNE=0 timeout -s INT -k 10 100 python3 -m pytest -m gpu -q -rfEp --tb=short -p no:cacheprovider \
    --continue-on-collection-errors > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
TMA_TEST=tests/test_kernel_grouped_gemm.py::test_every_tma_candidate_on_cuda_bf16
if grep -q "PASSED $TMA_TEST" "$OUT/gpu_tests.txt"; then
    export MOE_ENGINE_GEMM_TMA=1
    echo "TMA weight-load candidates: on (their GPU test passed)" >> "$OUT/env.txt"
elif grep -q "FAILED $TMA_TEST" "$OUT/gpu_tests.txt"; then
    echo "TMA weight-load candidates: off (their GPU test failed)" >> "$OUT/env.txt"
else
    echo "TMA weight-load candidates: off (their GPU test did not run: skipped, a time limit or a collection error)" >> "$OUT/env.txt"
fi
# 2. The benchmark autotunes every kernel over all its candidates: ~1000 compiles at these shapes, minutes
# in one process. Compile what fits first on all cores into the Triton cache the benchmark then reads.
JOBS=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
timeout 80 python3 -m moe_engine.kernels.compile_check --shapes "$SHAPES" --no-analyse --jobs "$JOBS" \
    > "$OUT/compile.txt" 2>&1
echo "compile warm-up rc=$?" >> "$OUT/compile.txt"
# 3. The figures, in one process (the tuned configs reused): router and permute, dispatch overhead, layer.
LEFT=$(( BUDGET - (SECONDS - START) ))
(( LEFT > 30 )) || LEFT=30  # timeout 0 would mean no limit
echo "figures: ${LEFT} s left" >> "$OUT/env.txt"
timeout "$LEFT" python3 scripts/gpu_figures.py "$OUT" --shapes "$SHAPES" --routing balanced --peers "$PEERS" \
    >> "$OUT/env.txt" 2>&1
echo "figures rc=$?" >> "$OUT/env.txt"
tail -30 "$OUT/gpu_tests.txt"
tail -3 "$OUT/compile.txt"
tail -60 "$OUT/env.txt"
