"""What the trainer needs from a kind of model and data: the `Workload` interface.

The trainer (moe_engine/train.py) owns everything a run has whatever it trains: the loop,
distributed setup, optimizer and schedule, loss weighting, logging, checkpoints. A workload owns
the rest: which data, which model, how a batch becomes per-task summed losses, and how a test
split becomes metrics. Two exist: the multi-task classifier of the default job
(`moe_engine.workloads.classifier`) and the Uni-Perceiver-style generalist
(`moe_engine.workloads.generalist`).

Losses are returned as per-task SUMS over this rank's examples with per-task example COUNTS;
the trainer all-reduces the counts and divides, so the ranks' losses add up to the global batch's
per-task mean losses (and SUM-reduced gradients are their gradients).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from moe_engine.config import MoEConfig
from moe_engine.parallel import TokenDispatcher
from moe_engine.parallel.runtime import DistributedRun
from moe_engine.routing import Routing


@dataclass(frozen=True)
class StepForward:
    """One forward of a training batch on this rank.

    loss_sums: task name -> () fp32 summed loss over this rank's examples of the task (with graph); a
        task with no example here is left out or sums to 0. Under DeepSpeed every rank must build
        the same graph (ZeRO's gradient buckets), so the workloads keep every task, at zero rows.
    counts_T: (num_tasks,) fp32 examples of each task (workload task order) on this rank.
    aux_loss: () fp32, the routers' weighted auxiliary losses.
    routings: one Routing per router (model.routers order).
    routing_task_ids_T: (T,) int64 task of each routed token, aligned with the routings' rows.
    num_tokens: tokens the encoder processed on this rank (for throughput).
    anchor: () fp32 zero that depends on every collective of the forward (e.g. 0 * features.sum()).
        The trainer adds it to every task's loss, so a per-task backward runs every rank's all-to-all
        backward in the same order even on a rank with no example of that task (expert parallelism).
    """

    loss_sums: dict[str, torch.Tensor]
    counts_T: torch.Tensor
    aux_loss: torch.Tensor
    routings: tuple[Routing, ...]
    routing_task_ids_T: torch.Tensor
    num_tokens: int
    anchor: torch.Tensor


class Workload(ABC):
    """Data, model and per-task losses/metrics of one kind of multi-task training."""

    #: Task names in task-index order (the order of counts_T, of logs and of telemetry).
    task_names: list[str]

    @abstractmethod
    def build_model(self, make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None) -> nn.Module:
        """The model (with `.routers` and `.moe_layers`), experts placed by `make_dispatcher` (None: local)."""

    @abstractmethod
    def train_batches(self, seed: int) -> Iterator[Any]:
        """An endless, resumable iterator of GLOBAL training batches with state_dict()/load_state_dict()."""

    @abstractmethod
    def forward_step(self, model: nn.Module, batch: Any, run: DistributedRun, device: torch.device) -> StepForward:
        """Take this rank's share of a global batch and run the forward (the caller sets autocast)."""

    @abstractmethod
    def task_counts(self, batch: Any) -> torch.Tensor:
        """(num_tasks,) fp32 on the CPU: what each task's loss sum is divided by over a whole batch
        (examples, or predicted tokens), the same quantity as forward_step's counts_T."""

    def micro_batches(self, batch: Any, count: int) -> list[Any]:
        """A global batch as `count` global micro-batches (train.grad_accum_steps): rows i::count form
        the i-th, so each row lands in exactly one. This default is for a dict of tensors whose rows
        are examples; workloads with other batch layouts override it."""
        return [{key: value[i::count] for key, value in batch.items()} for i in range(count)]

    @abstractmethod
    def evaluate(
        self, model: nn.Module, run: DistributedRun, device: torch.device, autocast: Callable[[], Any], num_experts: int,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics of the whole test split (equal on every rank) and the routed choices of each task's
        tokens per (router, task, expert), (L, num_tasks, E) int64 summed over ranks."""

    @abstractmethod
    def task_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that serve one task only (heads, task embeddings or prompts): not shared, never frozen."""

    def task_specs(self) -> list[dict[str, Any]] | None:
        """Plain descriptions of the tasks, saved in checkpoints for fine-tuning; None: nothing to save."""
        return None

    def adapt_pretrained_state(
        self, model: nn.Module, state: dict[str, torch.Tensor], pretrained_tasks: Sequence[str],
        pretrained_specs: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """A pre-trained canonical state dict made to fit `model`, built for this run's tasks (fine-tuning).

        The default accepts a checkpoint of the very same tasks only; workloads that can add or
        drop tasks override it (per-task rows mapped by task name).
        """
        if list(pretrained_tasks) != list(self.task_names):
            raise ValueError(
                f"data.tasks = {self.task_names}: this model fine-tunes on its checkpoint's own tasks {list(pretrained_tasks)} "
                "only (one head per task); the generalist (model.architecture: generalist) takes new tasks and subsets"
            )
        return state

    def metric_directions(self) -> dict[str, bool]:
        """Evaluation metric name -> higher is better, for Delta_p."""
        return {"accuracy": True}

    def primary_metrics(self) -> dict[str, str]:
        """Task name -> the metric that reports it (e.g. "accuracy")."""
        return {name: "accuracy" for name in self.task_names}

    def chance(self) -> dict[str, float]:
        """Task name -> the primary metric of a trivial predictor."""
        return {}

    def descriptions(self) -> dict[str, str]:
        """Task name -> one line describing the task (the end-of-run report). The built-in workloads
        keep their data in `self.data`, whose `tasks` carry a name and a description; a workload
        holding its tasks elsewhere overrides this."""
        return {task.name: task.description for task in self.data.tasks}


def count_routed_choices(
    routings: Sequence[Routing], task_ids_T: torch.Tensor, num_tasks: int, num_experts: int, out_LXE: torch.Tensor
) -> None:
    """Add each router's kept choices per (task, expert) into out_LXE (L, num_tasks, E) int64."""
    for layer, routing in enumerate(routings):
        kept_TK = routing.experts_TK >= 0
        cells = (task_ids_T[:, None] * num_experts + routing.experts_TK)[kept_TK]
        out_LXE[layer] += torch.bincount(cells, minlength=num_tasks * num_experts).view(num_tasks, num_experts)
