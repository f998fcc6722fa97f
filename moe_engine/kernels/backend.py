"""Which implementation of a kernel op runs: the Triton kernel or its pure-torch reference.

`MOE_ENGINE_KERNELS=torch|triton` forces one; unset, Triton runs on CUDA where the op has a
Triton kernel, and the torch reference runs everywhere else (CPU, or ops without a kernel yet).
Asking for Triton where an op has none is an error, not a silent fallback, so a benchmark can
never time the reference while believing it timed the kernel.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "MOE_ENGINE_KERNELS"
KERNEL_BACKENDS = ("torch", "triton")


def requested_backend() -> str | None:
    """The backend named by MOE_ENGINE_KERNELS, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: allowed: {', '.join(KERNEL_BACKENDS)} (or unset)")
    return value


def select_backend(op: str, device: torch.device, has_triton: bool) -> str:
    """'triton' or 'torch' for one call of `op` on `device`."""
    requested = requested_backend()
    if requested == "triton" and not has_triton:
        raise RuntimeError(f"{ENV_VAR}=triton, but op {op!r} has no Triton kernel; use {ENV_VAR}=torch or unset it")
    if requested is not None:
        return requested
    return "triton" if has_triton and device.type == "cuda" else "torch"
