#!/usr/bin/env bash
# Launch moe_engine training under DeepSpeed's engine (ZeRO 1/2, its checkpoints).
#
#   one node:   bash launch/deepspeed.sh 8 --deepspeed_config configs/deepspeed_zero2.json --config ...
#   several:    bash launch/deepspeed.sh 8 --hostfile launch/hostfile.example -- --deepspeed_config ...
#               (or, without passwordless ssh, on node I: DS_ARGS="--no_ssh --node_rank I --master_addr node0" ...)
#
# Every argument after the GPU count goes to `moe-engine train`, except that arguments before a
# literal `--` go to the deepspeed launcher itself. On CPU machines DeepSpeed uses its CPU
# accelerator and gloo (--num_gpus then counts processes).
set -euo pipefail
ngpus="${1:?usage: launch/deepspeed.sh NUM_GPUS [launcher args --] [moe-engine train arguments...]}"
shift
launcher_args=()
if [[ " $* " == *" -- "* ]]; then
    while [[ "$1" != "--" ]]; do launcher_args+=("$1"); shift; done
    shift
fi
bin="$(dirname "${MOE_ENGINE_PYTHON:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python}")"
# shellcheck disable=SC2086
exec "$bin/deepspeed" --num_gpus "$ngpus" --master_port "${MASTER_PORT:-29500}" ${DS_ARGS:-} "${launcher_args[@]}" \
    --module moe_engine.train "$@"
