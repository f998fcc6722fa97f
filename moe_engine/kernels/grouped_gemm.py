"""Grouped GEMM over rows grouped by expert: y_NO[n] = x_NI[n] @ w_EOI[e(n)]^T.

Rows arrive sorted by expert, `tokens_per_expert_E[e]` of them for expert e (0 allowed).
Weights use nn.Linear's (out, in) layout per expert, as Hugging Face MoE checkpoints do.

Two torch implementations:
- `grouped_linear_loop`: one matmul per expert; the readable reference every other path is
  tested against. Needs the group sizes on the host (one device-to-host sync).
- `grouped_linear_grouped_mm`: `torch._grouped_mm` (CUTLASS on CUDA), one call, no host sync,
  where this torch supports the device, dtype and alignment (`grouped_mm_unsupported_reason`).
"""

from __future__ import annotations

import torch


def grouped_linear_loop(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """x_NI: (N, I), w_EOI: (E, O, I), tokens_per_expert_E: (E,) int, summing to N. Returns (N, O)."""
    sizes = tokens_per_expert_E.tolist()  # NOTE: device-to-host sync
    outputs = [x @ w_EOI[e].t() for e, x in enumerate(torch.split(x_NI, sizes, dim=0))]
    if not outputs:
        return x_NI.new_empty(0, w_EOI.shape[1])
    return torch.cat(outputs, dim=0)


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


def grouped_linear_grouped_mm(
    x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """Same contract as `grouped_linear_loop`, as one torch._grouped_mm call."""
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
    return _ContiguousGrad.apply(torch._grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offsets_E))
