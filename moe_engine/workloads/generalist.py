"""The generalist workload: a Uni-Perceiver-style shared encoder trained on mixed image and text tasks.

Data: moe_engine.mtl.generalist (embedded tasks, or a folder from data.path), mixed per step
by data.mixing / data.batching. Model: moe_engine.mtl.generalist.model.GeneralistModel, which
scores each input against its task's target texts (classification, retrieval) or regresses a
value. Every rank takes rows rank::world of each task's sub-batch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from moe_engine.config import Config, MoEConfig
from moe_engine.finetune import mean_rows_for_new_tasks
from moe_engine.mtl.generalist import (
    GeneralistData,
    MixedBatches,
    build_embedded_tasks,
    eval_batches,
    load_generalist_data,
    slice_for_rank,
    task_probabilities,
)
from moe_engine.mtl.generalist.losses import task_loss_sums, task_metric_sums
from moe_engine.mtl.generalist.model import GeneralistModel
from moe_engine.parallel import TokenDispatcher
from moe_engine.parallel.runtime import DistributedRun, all_reduce_sum
from moe_engine.workloads.base import StepForward, Workload, count_routed_choices


def build_generalist_data(cfg: Config) -> GeneralistData:
    """data.tasks from data.path when set, else the embedded tasks built in memory."""
    if cfg.data.path is not None:
        return load_generalist_data(cfg.data.path, cfg.data.tasks)
    return build_embedded_tasks(
        cfg.data.tasks, examples_per_task=cfg.data.pairs_per_task, eval_fraction=cfg.data.eval_fraction, seed=cfg.train.seed,
    )


def _to_device(sub_batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in sub_batch.items()}


def _rows(sub_batch: dict[str, Any]) -> int:
    return len(next(iter(sub_batch.values())))


class GeneralistWorkload(Workload):
    """Image and text tasks posed as similarity to target texts, or regression (see the module docstring)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data = build_generalist_data(cfg)
        self.task_names = list(self.data.task_names)
        self.tasks = self.data.tasks

    # ---------------------------------------------------------------- model and data

    def build_model(self, make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None) -> GeneralistModel:
        return GeneralistModel(
            self.cfg.model, self.cfg.moe, self.tasks, max_text_len=self.cfg.model.max_text_len, make_dispatcher=make_dispatcher,
        )

    def train_batches(self, seed: int) -> Iterator[Any]:
        d = self.cfg.data
        sizes = {name: len(self.data.train[name]) for name in self.task_names}
        probabilities = task_probabilities(sizes, d.mixing, d.mixing_weights, d.mixing_temperature)
        # Every task in every batch (zero rows where not drawn), kept at zero rows on the ranks its
        # rows miss (forward_step): the model scores and the loss covers every task on every rank at
        # every step, so each rank's backward produces the same gradients in the same order.
        # DeepSpeed's ZeRO reduces them in buckets filled in that order, and would otherwise abort
        # (or add misaligned gradients) as soon as one rank's batch lacked a task another's had.
        return MixedBatches(
            self.data.train, self.task_names, d.batch_size, probabilities, batching=d.batching, seed=seed, every_task=True,
        )

    def _local(
        self, batch: dict[str, dict[str, Any]], run: DistributedRun, device: torch.device, keep_empty: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """This rank's rows of every task; tasks left with no rows on this rank drop out unless keep_empty."""
        local = {}
        for name, sub in batch.items():
            if run.world_size > 1:
                sub = slice_for_rank(sub, run.rank, run.world_size)
            if keep_empty or _rows(sub):
                local[name] = _to_device(sub, device)
        return local

    # ---------------------------------------------------------------- training and evaluation

    def task_counts(self, batch: Any) -> torch.Tensor:
        return torch.tensor([float(_rows(batch[n])) if n in batch else 0.0 for n in self.task_names])

    def micro_batches(self, batch: Any, count: int) -> list[Any]:
        # Every task stays in every micro-batch, at zero rows where it has none (see train_batches).
        return [{name: slice_for_rank(sub, i, count) for name, sub in batch.items()} for i in range(count)]

    def forward_step(self, model: nn.Module, batch: Any, run: DistributedRun, device: torch.device) -> StepForward:
        local = self._local(batch, run, device, keep_empty=True)
        out = model(local)
        loss_sums = task_loss_sums(model.tasks, out, local)
        counts_T = self.task_counts(local).to(device)
        num_tokens = int(out.routings[0].experts_TK.shape[0]) if out.routings else 0
        # The model ties aux_loss to the features of every encoder call: a zero that reaches every all-to-all.
        return StepForward(
            loss_sums, counts_T, out.aux_loss, out.routings, out.routing_task_ids_T, num_tokens, anchor=0.0 * out.aux_loss,
        )

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, run: DistributedRun, device: torch.device, autocast: Callable[[], Any], num_experts: int,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Each task's metric (accuracy, recall@1 or mse) and loss over its whole test split.

        Every rank walks every task's batches (its rows of each), so the MoE layers' collectives
        line up across ranks even where a rank holds no rows of a batch."""
        num_tasks = len(self.task_names)
        sums = torch.zeros(3, num_tasks, device=device, dtype=torch.float64)  # metric sum, examples, loss sum
        counts_LXE = torch.zeros(len(model.routers), num_tasks, num_experts, dtype=torch.long, device=device)
        # Telemetry rows are indexed by this workload's tasks; the model may know more (fine-tuning): -1.
        remap = torch.tensor(
            [self.task_names.index(task.name) if task.name in self.task_names else -1 for task in model.tasks],
            dtype=torch.long, device=device,
        )
        for t, name in enumerate(self.task_names):
            for sub in eval_batches(self.data.test[name], self.cfg.data.eval_batch_size):
                local = self._local({name: sub}, run, device)
                with autocast():
                    out = model(local)
                task_ids_T = remap[out.routing_task_ids_T]
                keep_T = task_ids_T >= 0
                count_routed_choices(
                    [_rows_of(r, keep_T) for r in out.routings], task_ids_T[keep_T], num_tasks, num_experts, counts_LXE,
                )
                if name not in local:
                    continue
                metric_sums = task_metric_sums(model.tasks, out, local)
                losses = task_loss_sums(model.tasks, out, local)
                metric_sum, seen = metric_sums[name]
                sums[0, t] += metric_sum.double()
                sums[1, t] += float(seen)
                sums[2, t] += losses[name].double()
        metric_sum, seen, loss_sum = all_reduce_sum(sums, run).cpu()
        counts_LXE = all_reduce_sum(counts_LXE, run).cpu()
        metrics = {}
        for t, name in enumerate(self.task_names):
            task = self.data.task(name)
            metrics[f"{task.metric}_{name}"] = float(metric_sum[t] / seen[t].clamp_min(1))
            metrics[f"loss_{name}"] = float(loss_sum[t] / seen[t].clamp_min(1))
        return metrics, counts_LXE

    def task_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.task_prompt, model.regression_weight, model.regression_bias]

    def task_specs(self) -> list[dict[str, Any]]:
        return [task.to_dict() for task in self.tasks]

    # ---------------------------------------------------------------- fine-tuning and reports

    def adapt_pretrained_state(
        self, model: nn.Module, state: dict[str, torch.Tensor], pretrained_tasks: Sequence[str],
        pretrained_specs: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-task rows mapped by task name, as GeneralistModel.add_tasks would grow them: a new task's
        prompt is the mean of the pre-trained prompts, its regression head the mean of the pre-trained
        regression tasks' heads. Everything else must match exactly."""
        kinds = {spec["name"]: spec["kind"] for spec in pretrained_specs or ()}
        regression = [name for name in pretrained_tasks if kinds.get(name) == "regression"]
        state = dict(state)
        for key, donors in (("task_prompt", None), ("regression_weight", regression), ("regression_bias", regression)):
            if key in state:
                state[key] = mean_rows_for_new_tasks(state[key], pretrained_tasks, self.task_names, donors)
        return state

    def metric_directions(self) -> dict[str, bool]:
        return {task.metric: task.higher_is_better for task in self.tasks}

    def primary_metrics(self) -> dict[str, str]:
        return {task.name: task.metric for task in self.tasks}

    def chance(self) -> dict[str, float]:
        return {task.name: task.chance for task in self.tasks}


def _rows_of(routing, keep_T: torch.Tensor):
    """A Routing restricted to the kept token rows (only experts_TK is read by count_routed_choices)."""
    return replace(routing, experts_TK=routing.experts_TK[keep_T], weights_TK=routing.weights_TK[keep_T],
                   scores_TE=routing.scores_TE[keep_T])
