#!/usr/bin/env bash
# Launch moe_engine training with torchrun, on one node or several.
#
#   one node, 8 GPUs:      bash launch/torchrun.sh 8 --config configs/ep_cpu.yaml --set parallel.expert_parallel_size=8
#   node i of N (run on every node, same MASTER_ADDR):
#       NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 bash launch/torchrun.sh 8 --config ...
#       NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example MASTER_PORT=29500 bash launch/torchrun.sh 8 --config ...
#
# Every argument after the process count goes to `moe-engine train` (--config, --set, --resume).
# torchrun forwards SIGTERM to the ranks: they finish the step, save a checkpoint together and exit;
# relaunching with --resume continues the run.
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC_PER_NODE [moe-engine train arguments...]}"
shift
python="${MOE_ENGINE_PYTHON:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python}"
exec "$python" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    --nproc_per_node "$nproc" \
    -m moe_engine.train "$@"
