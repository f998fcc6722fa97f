"""Hot-path ops, one per file: Triton kernel(s), launcher, custom op with autograd, and torch reference.

`MOE_ENGINE_KERNELS=torch|triton` picks the implementation (see backend.py); autotune candidates
come from one named function per kernel, `MOE_ENGINE_<OP>_CONFIG` pins one (see _triton.py).
"""

from moe_engine.kernels.aux_losses import router_z_loss, sequence_load_balancing_loss, switch_load_balancing_loss
from moe_engine.kernels.cv_squared import importance_cv_squared, load_cv_squared
from moe_engine.kernels.backend import ENV_VAR, KERNEL_BACKENDS, requested_backend, select_backend
from moe_engine.kernels.expert_order import expert_order
from moe_engine.kernels.permute import permute, unpermute
from moe_engine.kernels.router import TopKGating, topk_gating

__all__ = [
    "ENV_VAR",
    "KERNEL_BACKENDS",
    "TopKGating",
    "expert_order",
    "importance_cv_squared",
    "load_cv_squared",
    "permute",
    "requested_backend",
    "router_z_loss",
    "select_backend",
    "sequence_load_balancing_loss",
    "switch_load_balancing_loss",
    "topk_gating",
    "unpermute",
]
