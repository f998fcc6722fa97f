"""The default job's workload: the multi-task image classifier on the digits tasks.

Data: moe_engine.mtl.digits (embedded) or a folder laid out as moe_engine.mtl.data says; one
global batch mixes the tasks by size. Model: moe_engine.mtl.model.MultiTaskTransformer, one head
per task; loss: each task's cross-entropy.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.config import Config, MoEConfig
from moe_engine.mtl.data import ResumableBatches, eval_batches, load_task_data, select_tasks
from moe_engine.mtl.digits import build_digits_tasks
from moe_engine.mtl.model import MultiTaskTransformer
from moe_engine.mtl.tasks import MultiTaskData
from moe_engine.parallel import TokenDispatcher
from moe_engine.parallel.runtime import DistributedRun, all_reduce_sum, rank_slice
from moe_engine.workloads.base import StepForward, Workload, count_routed_choices


def build_data(cfg: Config) -> MultiTaskData:
    """The digits tasks of data.tasks: from data.path when set, else built in memory."""
    if cfg.data.path is not None:
        return select_tasks(load_task_data(cfg.data.path), cfg.data.tasks, cfg.data.path)
    return build_digits_tasks(
        cfg.data.tasks, eval_fraction=cfg.data.eval_fraction, pairs_per_task=cfg.data.pairs_per_task, seed=cfg.train.seed
    )


def task_counts(task_B: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """(num_tasks,) float32: examples of each task in the batch."""
    return torch.bincount(task_B, minlength=num_tasks).float()


class ClassifierWorkload(Workload):
    """Images (B, 8, 12) with a task id and a label; one classification head per task."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data = build_data(cfg)
        self.task_names = list(self.data.task_names)
        self.image_shape = tuple(self.data.train[0]["pixels"].shape)

    def build_model(self, make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None) -> MultiTaskTransformer:
        return MultiTaskTransformer(self.cfg.model, self.cfg.moe, self.data.tasks, self.image_shape, make_dispatcher=make_dispatcher)

    def train_batches(self, seed: int) -> Iterator[Any]:
        return ResumableBatches(self.data.train, self.cfg.data.batch_size, seed=seed)

    def task_counts(self, batch: Any) -> torch.Tensor:
        return task_counts(batch["task"], len(self.task_names))

    def forward_step(self, model: nn.Module, batch: Any, run: DistributedRun, device: torch.device) -> StepForward:
        batch = rank_slice(batch, run)
        pixels, task, label = (batch[k].to(device, non_blocking=True) for k in ("pixels", "task", "label"))
        out = model(pixels, task)
        # Every head runs, on zero rows where this rank has no example of its task: every rank then
        # builds the same graph, so gradients become ready in the same order (ZeRO's buckets need it).
        loss_sums = {
            name: F.cross_entropy(model.logits(out.features_BD[rows], t).float(), label[rows], reduction="sum")
            for t, name in enumerate(self.task_names)
            for rows in [(task == t).nonzero().squeeze(-1)]
        }
        tokens_per_example = model.pos_embed.shape[0]  # the task token and the patches
        return StepForward(
            loss_sums, task_counts(task, len(self.task_names)), out.aux_loss, out.routings,
            task.repeat_interleave(tokens_per_example), int(task.numel() * tokens_per_example),
            anchor=0.0 * (out.features_BD.float().sum() + out.aux_loss),
        )

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, run: DistributedRun, device: torch.device, autocast: Callable[[], Any], num_experts: int,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Accuracy and loss per task; each rank evaluates its slice of every batch and the sums are all-reduced."""
        num_tasks = len(self.task_names)
        sums = torch.zeros(3, num_tasks, device=device)  # correct, seen, summed loss
        counts_LXE = torch.zeros(len(model.routers), num_tasks, num_experts, dtype=torch.long, device=device)
        tokens_per_example = model.pos_embed.shape[0]
        for batch in eval_batches(self.data.test, self.cfg.data.eval_batch_size):
            batch = rank_slice(batch, run)
            pixels, task, label = (batch[k].to(device) for k in ("pixels", "task", "label"))
            with autocast():
                out = model(pixels, task)
            count_routed_choices(out.routings, task.repeat_interleave(tokens_per_example), num_tasks, num_experts, counts_LXE)
            for t in range(num_tasks):
                rows = (task == t).nonzero().squeeze(-1)
                logits = model.logits(out.features_BD[rows], t).float()
                sums[0, t] += (logits.argmax(-1) == label[rows]).sum()
                sums[1, t] += rows.numel()
                sums[2, t] += F.cross_entropy(logits, label[rows], reduction="sum")
        correct, seen, loss_sum = all_reduce_sum(sums, run).cpu()
        counts_LXE = all_reduce_sum(counts_LXE, run).cpu()
        metrics = {}
        for t, name in enumerate(self.task_names):
            metrics[f"accuracy_{name}"] = float(correct[t] / seen[t].clamp_min(1))
            metrics[f"loss_{name}"] = float(loss_sum[t] / seen[t].clamp_min(1))
        return metrics, counts_LXE

    def task_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        block_embeds = [block.task_embed.weight for block in model.blocks if block.task_embed is not None]
        return [*model.heads.parameters(), model.task_embed.weight, *block_embeds]

    def chance(self) -> dict[str, float]:
        return {task.name: task.chance for task in self.data.tasks}
