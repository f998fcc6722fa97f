"""Hot-path ops, one per file: Triton kernel(s), launcher, autograd.Function and torch reference.

`MOE_ENGINE_KERNELS=torch|triton` picks the implementation (see backend.py).
"""

from moe_engine.kernels.backend import ENV_VAR, KERNEL_BACKENDS, requested_backend, select_backend
from moe_engine.kernels.permute import expert_order, permute, unpermute

__all__ = ["ENV_VAR", "KERNEL_BACKENDS", "expert_order", "permute", "requested_backend", "select_backend", "unpermute"]
