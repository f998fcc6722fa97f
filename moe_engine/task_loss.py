"""From per-task summed losses to the one loss a step backpropagates, through a loss-weighting method.

Every rank holds the summed loss of its examples per task. Dividing by the GLOBAL example
count of each task gives rank-local shares `local_T` that add up over ranks to each task's mean
loss, so SUM-reduced gradients are the global batch's. The weighting method
(moe_engine.mtl.weighting, built with world_size = the number of ranks) combines these shares;
its data-independent terms (UW's log variances, GradNorm's own loss) are divided by the world
size so that the sum over ranks counts them once, which is why the trainer SUM-reduces the
method's parameters' gradients like any replicated parameter's. What must agree across ranks,
the task weights, comes from global values only: the all-reduced losses and the Gram matrix.

Gradient-based methods (PCGrad, MGDA, CAGrad, IMTL, Nash-MTL, GradNorm) read the Gram matrix
G G^T of the per-task gradients of the SHARED dense parameters: each rank computes its rows of
G, one all-reduce sums them, and every rank derives the same task weights. Expert parameters are
left out of G (under expert parallelism each rank holds other experts), and so are task-specific
parameters; the weights then scale each task's loss for every parameter in one backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from moe_engine.mtl.weighting import TaskWeighting, gram_matrix, task_gradients
from moe_engine.parallel.runtime import DistributedRun, all_reduce_sum
from moe_engine.workloads.base import StepForward


@dataclass(frozen=True)
class TaskLoss:
    """loss: () the weighted task loss to backpropagate (global value, this rank's gradient share).
    weights_T: (num_tasks,) the method's task weights (0 for absent tasks). local_losses_T:
    (num_tasks,) detached, this rank's share of each task's mean loss (the shares add up over ranks).
    global_losses_T: (num_tasks,) detached mean loss of each task over the global batch (0 if
    absent), or None for a micro-batch of an accumulated step, whose caller sums the local shares of
    its micro-batches and reduces them once. present_T: (num_tasks,) bool."""

    loss: torch.Tensor
    weights_T: torch.Tensor
    local_losses_T: torch.Tensor
    global_losses_T: torch.Tensor | None
    present_T: torch.Tensor


def task_gradient_gram(
    local_losses_T: torch.Tensor, present_T: torch.Tensor, params: Sequence[nn.Parameter], run: DistributedRun
) -> torch.Tensor:
    """(T, T) fp32 Gram matrix of the global per-task gradients of `params`.

    One backward per present task (the graph is kept for the step's own backward), one all-reduce
    of the (T, P) gradient matrix.
    """
    if local_losses_T.requires_grad:
        grads_TP = task_gradients(local_losses_T, present_T, params)
    else:  # no example of any task on this rank: its share of every gradient is zero
        grads_TP = torch.zeros(len(local_losses_T), sum(p.numel() for p in params), device=local_losses_T.device)
    if run.world_size > 1:
        grads_TP = all_reduce_sum(grads_TP, run)
    return gram_matrix(grads_TP)


def combine_task_losses(
    step: StepForward, task_names: Sequence[str], weighting: TaskWeighting, shared_params: Sequence[nn.Parameter],
    run: DistributedRun, global_counts_T: torch.Tensor | None = None,
) -> TaskLoss:
    """The weighted loss of one step (see the module docstring); every rank calls it (collective).

    global_counts_T: (num_tasks,) what each task's loss sums are divided by, when it is more than
    this forward's rows summed over ranks: with gradient accumulation, the whole step's batch, so
    that the micro-batches' losses add up to the step's. The losses are then not all-reduced here
    (global_losses_T is None; one reduction per step, not one per micro-batch). None: the
    all-reduced step.counts_T.
    """
    whole_step = global_counts_T is None
    if whole_step:
        global_counts_T = all_reduce_sum(step.counts_T, run) if run.world_size > 1 else step.counts_T
    present_T = global_counts_T > 0
    zero = step.aux_loss.new_zeros((), dtype=torch.float32)
    # + anchor: every task's loss reaches every collective of the forward (see StepForward.anchor).
    local_T = torch.stack([
        (step.loss_sums[name].float() / global_counts_T[t].clamp_min(1) if name in step.loss_sums else zero) + step.anchor
        for t, name in enumerate(task_names)
    ])
    global_T = None
    if whole_step:  # a micro-batch's share is not the step's losses, which the methods that read them want
        global_T = all_reduce_sum(local_T.detach(), run) if run.world_size > 1 else local_T.detach()
    gram_TT = task_gradient_gram(local_T, present_T, shared_params, run) if weighting.wants_gram(present_T) else None
    loss, weights_T = weighting.combine(local_T, present_T, gram_TT, global_losses_T=global_T)
    return TaskLoss(loss, weights_T.detach(), local_T.detach(), global_T, present_T)
