"""The grouped GEMM as one `torch._grouped_mm` call: the torch path of the experts where it runs, and a peer.

`grouped_linear_grouped_mm(x_NI, w_EOI, tokens_per_expert_E)` has the contract of
`grouped_gemm.grouped_linear_loop` without its host sync; `grouped_mm_unsupported_reason` says
where this torch cannot run it (device, dtype, 16-byte row alignment) so callers fall back to the
loop with the reason instead of failing inside CUTLASS.
"""

from __future__ import annotations

import torch


def grouped_mm_unsupported_reason(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> str | None:
    """Why torch._grouped_mm cannot run this case, or None if it can.

    dims: the inner widths of the operands (D, F, ...): each row stride must be a multiple
    of 16 bytes, which torch._grouped_mm checks on every backend.
    """
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"torch._grouped_mm on CUDA takes bfloat16, got {dtype}"
        if torch.cuda.get_device_capability(device) < (9, 0):
            return f"torch._grouped_mm needs compute capability >= 9.0, got {torch.cuda.get_device_capability(device)}"
    elif device.type != "cpu":
        return f"torch._grouped_mm is not available on {device.type}"
    elif dtype not in (torch.float32, torch.bfloat16):
        return f"torch._grouped_mm on CPU takes float32 or bfloat16, got {dtype}"
    elif dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # Eager CPU runs fp32, but the op's meta kernel (what torch.compile traces) takes bf16 only.
        return f"torch.compile traces torch._grouped_mm in bfloat16 only, got {dtype}"
    elem = torch.empty((), dtype=dtype).element_size()
    misaligned = [d for d in dims if (d * elem) % 16]
    if misaligned:
        return f"widths {misaligned} times {elem} bytes are not multiples of 16 bytes"
    return None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    torch._grouped_mm's backward rejects gradients with zero strides, which is what `.sum()`
    and other broadcasts produce; this costs a copy only when the gradient is not contiguous.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear_grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """Same contract as `grouped_linear_loop`, as one torch._grouped_mm call."""
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E))
