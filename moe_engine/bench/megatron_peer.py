"""megatron-core's MoE layer without Transformer Engine: the router it needs to run at all.

megatron-core 0.16.1's `TopKRouter.gating` calls `router_gating_linear`, whose autograd function
tests `te_general_gemm is not None`; that name is bound only when Transformer Engine imports, so
without TE every router forward raises NameError, on CUDA as on CPU (seen 2026-11-30 on CPU; the
GPU image has no TE either). `gating` also moves the weight to torch.cuda.current_device(), which
fails on CPU. `TopKRouterWithoutTE` computes the same logits in plain torch on the weight's device;
everything after the logits (top-k, aux losses, capacity, tracker) is megatron's own code.

`megatron_moe_submodules(num_experts)` is megatron's local MoE spec (SequentialMLP experts) with that
router where TE is missing: the `megatron` peer of `moe-engine bench` (moe_engine.bench.peers,
`_megatron_layer`) needs it to run on a GPU without TE:
    MegatronMoELayer(cfg, megatron_moe_submodules(s.E), pg_collection=groups)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.moe_utils import HAVE_TE
from megatron.core.transformer.moe.router import TopKRouter

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class TopKRouterWithoutTE(TopKRouter):
    """megatron's TopKRouter with its gating GEMM in plain torch (see the module docstring)."""

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """input: [S, B, H] -> logits [S, B, E] in moe_router_dtype (None: the input's dtype), as megatron's."""
        dtype = _ROUTER_DTYPES.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)


def megatron_moe_submodules(num_experts: int) -> MoESubmodules:
    """megatron's local (no TE, no grouped_gemm) MoE submodules, with `TopKRouterWithoutTE` when TE is missing."""
    submodules = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False).submodules
    return submodules if HAVE_TE else dataclasses.replace(submodules, router=TopKRouterWithoutTE)
