#!/usr/bin/env bash
# Every GPU check and figure the open issues need, in one call on a lent GPU (../shared/device/README.md):
#   bash ../shared/device/fetch-wheels.sh          # once, on the CPU machine
#   device run, carry [".whl"]:  bash scripts/gpu_checks.sh "$OUT"
# Writes (at most 8 files come back): gpu_tests.txt, bench.json + bench.png (kernels and layer vs
# torch loop / torch._grouped_mm / DeepSpeed / megatron-core), dispatch.json (dispatch share at EP=1),
# env.txt. Each step has its own time limit (150 + 60 + 330 s: under the 600 s a device call may run),
# so one slow step cannot take the rest down.
set -u
OUT=${1:?usage: scripts/gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed: run ../shared/device/fetch-wheels.sh and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
timeout 60 python3 benchmarks/dispatch_overhead.py "$OUT/dispatch.json" --shapes mixtral,olmoe,qwen3_30b_a3b \
    >> "$OUT/env.txt" 2>&1
timeout 330 python3 -m moe_engine bench --shapes mixtral,olmoe,qwen3_30b_a3b,deepseek_v3_ep4,sonicmoe \
    --routing balanced,skewed --out "$OUT/bench.json" >> "$OUT/env.txt" 2>&1
tail -40 "$OUT/gpu_tests.txt"
tail -60 "$OUT/env.txt"
