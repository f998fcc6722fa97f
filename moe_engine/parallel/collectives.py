"""Differentiable collectives. The backward of an all-to-all is the all-to-all with the splits swapped."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moe_engine.parallel.telemetry import TrafficMeter


def offrank_bytes(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> tuple[int, int]:
    """(bytes sent, bytes received) by this rank's exchange of x's rows: only rows that cross to another
    rank count as traffic; the own-rank block is a local copy. From the shape, not x[0]: a rank may send
    no rows at all."""
    me = dist.get_rank(group)
    row_bytes = math.prod(x.shape[1:]) * x.element_size()
    return (sum(input_splits) - input_splits[me]) * row_bytes, (sum(output_splits) - output_splits[me]) * row_bytes


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group, meter: TrafficMeter | None):
    out = x.new_empty(sum(output_splits), *x.shape[1:])
    x = x.contiguous()
    if meter is None:
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out
    with meter.measure(*offrank_bytes(x, output_splits, input_splits, group), x.is_cuda):
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, output_splits: list[int], input_splits: list[int], group, meter) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.meter = (output_splits, input_splits), group, meter
        return _exchange(x_ND, output_splits, input_splits, group, meter)

    @staticmethod
    def backward(ctx, grad_out):
        output_splits, input_splits = ctx.splits
        return _exchange(grad_out, input_splits, output_splits, ctx.group, ctx.meter), None, None, None, None


def all_to_all(
    x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group, meter: TrafficMeter | None = None
) -> torch.Tensor:
    """Send input_splits[r] rows of x_ND to rank r of `group`; receive output_splits[r] rows from it.

    x_ND: (sum(input_splits), ...). Returns (sum(output_splits), ...), rows ordered by source rank.
    Zero-row splits are fine: every rank still enters the collective, so nobody hangs.
    meter: counts the bytes and time of this exchange and of its backward.
    """
    return _AllToAll.apply(x_ND, list(output_splits), list(input_splits), group, meter)


class _AllToAllWithWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_N, output_splits: list[int], input_splits: list[int], group, meter):
        ctx.splits, ctx.group, ctx.meter = (output_splits, input_splits), group, meter
        x_RD = _exchange(x_ND, output_splits, input_splits, group, meter)
        return x_RD, _exchange(w_N, output_splits, input_splits, group, None)

    @staticmethod
    def backward(ctx, grad_x, grad_w):
        # Both exchanges, always, in the forward's order: every rank issues the same collectives
        # (an unused output's gradient comes in as zeros).
        output_splits, input_splits = ctx.splits
        grad_x_ND = _exchange(grad_x, input_splits, output_splits, ctx.group, ctx.meter)
        return grad_x_ND, _exchange(grad_w, input_splits, output_splits, ctx.group, None), None, None, None, None


def all_to_all_with_weights(
    x_ND: torch.Tensor, w_N: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
    meter: TrafficMeter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_to_all` of the rows x_ND and of one weight per row w_N (N,), which travels with its row.

    One autograd node issues both exchanges, rows first, forward and backward, so the order of the
    collectives is the same on every rank whatever else the backward graph holds. meter counts the
    rows only (the weights add w_N's element size per row).
    """
    if w_N.dim() != 1 or w_N.shape[0] != x_ND.shape[0]:
        raise ValueError(f"w_N has shape {tuple(w_N.shape)}, expected ({x_ND.shape[0]},): one weight per row of x_ND")
    return _AllToAllWithWeights.apply(x_ND, w_N, list(output_splits), list(input_splits), group, meter)


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """Exchange one equal-size block of counts per rank: counts (P, L) -> received (P, L), row r from rank r."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received
