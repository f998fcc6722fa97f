"""Benchmarks of our MoE layer and its kernels against their peers, in one process on the same inputs.

- `layer`: our MoELayer vs a per-expert torch loop, torch._grouped_mm, DeepSpeed MoE, megatron-core MoE.
- `router`: TopKRouter and the top-k gating op vs torch softmax + topk.
- `permute`: expert_order/permute/unpermute vs torch argsort/index_select/a batched-matmul combine.

`moe-engine bench` runs them all (see moe_engine.bench.suite); `benchmarks/*.py` run one each.
Nothing heavy is imported here: DeepSpeed, megatron-core and matplotlib load only when used.
"""

from moe_engine.bench.suite import BENCHMARKS, add_arguments, main, run

__all__ = ["BENCHMARKS", "add_arguments", "main", "run"]
