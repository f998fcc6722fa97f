"""Task x expert statistics of a routing decision: the joint routing mass and the mutual-information loss.

Definitions (Mod-Squad, Chen et al. 2023; ../shared/REFERENCES.md):
    M[t, e]  = sum over the tokens of task t of the router probability of expert e
    P(t, e)  = M[t, e] / sum(M)                       (a joint distribution over tasks and experts)
    L_MI     = - sum_{t,e} P(t,e) log( P(t,e) / (P(t) P(e)) )  = - I(task; expert)
Minimising L_MI maximises the mutual information, which makes each task prefer its own experts
while the experts stay used overall (the P(e) marginal keeps them balanced).
"""

from __future__ import annotations

import torch


def check_task_ids(
    task_ids_T: torch.Tensor | None, num_tokens: int, num_tasks: int, who: str, *, check_range: bool = True
) -> torch.Tensor:
    """Validate RoutingContext.task_ids_T for a task-conditional component; returns it as int64.

    Raises ValueError naming `who`, the bad value and what was allowed. Checking the range needs a
    device-to-host sync, which is cheap next to a routed layer and turns a silent gather out of
    range (or a CUDA assert) into a readable error; check_range=False skips it (for callers whose
    ids a router has already checked).
    """
    if task_ids_T is None:
        raise ValueError(f"{who} needs RoutingContext.task_ids_T (the task of each token); got None")
    if task_ids_T.shape != (num_tokens,):
        raise ValueError(f"{who}: task_ids_T has shape {tuple(task_ids_T.shape)}: expected ({num_tokens},), one id per token")
    if task_ids_T.dtype.is_floating_point or task_ids_T.dtype == torch.bool:
        raise ValueError(f"{who}: task_ids_T has dtype {task_ids_T.dtype}: expected an integer dtype")
    if check_range and num_tokens:
        lo, hi = torch.aminmax(task_ids_T)
        lo, hi = int(lo), int(hi)  # NOTE: device-to-host sync (validation)
        if lo < 0 or hi >= num_tasks:
            raise ValueError(f"{who}: task_ids_T has values in [{lo}, {hi}]: allowed [0, {num_tasks - 1}] ({num_tasks} tasks)")
    return task_ids_T.long()


def task_expert_mass(probs_TE: torch.Tensor, task_ids_T: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """M (num_tasks, E) float32: the summed routing probability of each task's tokens on each expert.

    probs_TE: (T, E) float router probabilities (or any non-negative routing weights);
    task_ids_T: (T,) int64 in [0, num_tasks). Differentiable in probs_TE.
    """
    mass_XE = probs_TE.new_zeros(num_tasks, probs_TE.shape[1], dtype=torch.float32)
    return mass_XE.index_add(0, task_ids_T, probs_TE.float())


def mutual_information_loss(probs_TE: torch.Tensor, task_ids_T: torch.Tensor, num_tasks: int, eps: float = 1e-9) -> torch.Tensor:
    """L_MI = -I(task; expert) from the batch's routing mass. () float32; 0 for an empty batch.

    probs_TE: (T, E) float router probabilities; task_ids_T: (T,) int64. `eps` keeps the logs of
    empty cells finite (an empty cell contributes 0 · log(eps) = 0).
    """
    mass_XE = task_expert_mass(probs_TE, task_ids_T, num_tasks)
    total = mass_XE.sum()
    if probs_TE.shape[0] == 0:
        return total * 0.0
    p_XE = mass_XE / total
    p_X1 = p_XE.sum(1, keepdim=True)
    p_1E = p_XE.sum(0, keepdim=True)
    return -(p_XE * (torch.log(p_XE + eps) - torch.log(p_X1 * p_1E + eps))).sum()
