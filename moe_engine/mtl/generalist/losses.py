"""Per-task losses and evaluation sums of the generalist's outputs.

Both return SUMS over a task's examples, not means, so that a trainer can add them up over
micro-batches and data-parallel ranks and divide once by the global count.

    classification, retrieval   loss: cross-entropy of the scores over the task's targets
                                metric (accuracy, recall@1): number of examples whose top score is the label
    regression                  loss and metric (mse): squared error of the prediction
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from moe_engine.mtl.generalist.model import GeneralistOutput
from moe_engine.mtl.generalist.tasks import GeneralistTask


def _present(
    model_tasks: Sequence[GeneralistTask], out: GeneralistOutput, batch: Mapping[str, Mapping[str, Any]]
) -> list[tuple[GeneralistTask, torch.Tensor, torch.Tensor]]:
    """(task, scores, labels on the scores' device) for each task of the batch, in the model's order."""
    by_name = {t.name: t for t in model_tasks}
    unknown = [name for name in batch if name not in by_name]
    if unknown:
        raise ValueError(f"batch tasks {unknown}: not among the model's tasks {list(by_name)}")
    present = []
    for task in model_tasks:
        if task.name not in batch:
            continue
        if task.name not in out.scores:
            raise ValueError(f"task {task.name!r} is in the batch but not in the output's scores {list(out.scores)}")
        column = task.label_column
        if column not in batch[task.name]:
            raise ValueError(
                f"batch[{task.name!r}] has keys {list(batch[task.name])}: a {task.kind} task needs {column!r}"
            )
        scores = out.scores[task.name]
        labels = torch.as_tensor(batch[task.name][column], device=scores.device)
        if labels.shape != scores.shape[:1]:
            raise ValueError(
                f"task {task.name!r}: {column} has shape {tuple(labels.shape)}: expected ({scores.shape[0]},)"
            )
        present.append((task, scores, labels))
    return present


def task_loss_sums(
    model_tasks: Sequence[GeneralistTask], out: GeneralistOutput, batch: Mapping[str, Mapping[str, Any]]
) -> dict[str, torch.Tensor]:
    """task name -> () float32 SUM of the task's per-example losses, with graph, for each task of the batch.

    Cross-entropy over the targets (label: (B_t,) int64 index into task.targets) for
    classification and retrieval; squared error against value ((B_t,) float) for regression.
    """
    losses = {}
    for task, scores, labels in _present(model_tasks, out, batch):
        if task.kind == "regression":
            losses[task.name] = (scores.float() - labels.float()).square().sum()
        else:
            losses[task.name] = F.cross_entropy(scores.float(), labels.long(), reduction="sum")
    return losses


def task_metric_sums(
    model_tasks: Sequence[GeneralistTask], out: GeneralistOutput, batch: Mapping[str, Mapping[str, Any]]
) -> dict[str, tuple[torch.Tensor, int]]:
    """task name -> (() float32 sum, number of examples), detached; metric = sum / count.

    accuracy and recall@1: the number of examples whose highest score is at the label (ties go
    to the lowest index); mse: the sum of squared errors.
    """
    sums = {}
    with torch.no_grad():
        for task, scores, labels in _present(model_tasks, out, batch):
            if task.metric == "mse":
                total = (scores.float() - labels.float()).square().sum()
            elif task.metric in ("accuracy", "recall@1"):
                total = (scores.argmax(dim=-1) == labels.long()).sum().float()
            else:
                raise ValueError(f"task {task.name!r}: metric {task.metric!r}: allowed: accuracy, recall@1, mse")
            sums[task.name] = (total, int(labels.shape[0]))
    return sums
