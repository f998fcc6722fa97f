"""Which implementation of a kernel op runs: the Triton kernel or its pure-torch reference.

`MOE_ENGINE_KERNELS=torch|triton` forces one; unset, Triton runs on CUDA where the op has a
Triton kernel, and the torch reference runs everywhere else (CPU, or ops without a kernel yet).
Asking for Triton where it cannot run is an error, not a silent fallback, so a benchmark can
never time the reference while believing it timed the kernel. On CPU, Triton kernels run only
under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported), as the tests do.
"""

from __future__ import annotations

import os

import torch

from moe_engine.kernels._triton import TRITON_AVAILABLE, interpreting

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
    has_triton = has_triton and TRITON_AVAILABLE
    if requested == "triton":
        if not has_triton:
            raise RuntimeError(f"{ENV_VAR}=triton, but op {op!r} has no Triton kernel; use {ENV_VAR}=torch or unset it")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton on {device.type}: Triton kernels run on CUDA, or on CPU under its "
                "interpreter (TRITON_INTERPRET=1 set before triton is imported)"
            )
        return "triton"
    if requested == "torch":
        return "torch"
    return "triton" if has_triton and device.type == "cuda" else "torch"
