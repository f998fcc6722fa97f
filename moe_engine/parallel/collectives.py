"""Differentiable collectives. The backward of an all-to-all is the all-to-all with the splits swapped."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x_ND.new_empty(sum(output_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(input_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Send input_splits[r] rows of x_ND to rank r of `group`; receive output_splits[r] rows from it.

    x_ND: (sum(input_splits), ...). Returns (sum(output_splits), ...), rows ordered by source rank.
    Zero-row splits are fine: every rank still enters the collective, so nobody hangs.
    """
    return _AllToAll.apply(x_ND, list(output_splits), list(input_splits), group)


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange one equal-size block of counts per rank: counts (P, L) -> received (P, L), row r from rank r."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received
