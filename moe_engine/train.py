"""The training loop of the multi-task MoE model: `moe-engine train` (or `python -m moe_engine.train`).

One `Trainer` owns a run directory: it builds data, model, optimizer and schedule from a
`Config`, trains with a progress bar, logs metrics (CSV, TensorBoard), evaluates every task,
checkpoints, and resumes bit for bit. SIGINT/SIGTERM save a checkpoint before the run exits;
a non-finite loss or gradient stops the run without overwriting the last good checkpoint.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from moe_engine.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from moe_engine.config import Config
from moe_engine.metrics import MetricsLogger
from moe_engine.mtl.data import ResumableBatches, eval_batches, load_task_data
from moe_engine.mtl.digits import build_digits_tasks
from moe_engine.mtl.model import MultiTaskTransformer
from moe_engine.mtl.tasks import MultiTaskData


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved first."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint saved to {checkpoint}; resume with --resume")


class RunDirectoryError(ValueError):
    """The run directory holds another run's checkpoints and neither resume nor overwrite was asked for."""


@dataclass(frozen=True)
class TrainResult:
    step: int
    eval_metrics: dict[str, float]
    tokens_per_expert_LE: torch.Tensor
    wall_seconds: float
    checkpoint: Path | None


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None: plain fp32) that train.device/train.precision ask for."""
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda': no CUDA device is available; use 'auto' or 'cpu'")
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if name == "cuda" else "fp32"
    return torch.device(name), (torch.bfloat16 if precision == "bf16" else None)


def build_data(cfg: Config) -> MultiTaskData:
    if cfg.data.path is not None:
        data = load_task_data(cfg.data.path)
        missing = [t for t in cfg.data.tasks if t not in data.task_names]
        if missing:
            raise ValueError(f"data.tasks = {cfg.data.tasks}: {missing} not in {cfg.data.path} (has {list(data.task_names)})")
        return data
    return build_digits_tasks(
        cfg.data.tasks, eval_fraction=cfg.data.eval_fraction, pairs_per_task=cfg.data.pairs_per_task, seed=cfg.train.seed
    )


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of optim.lr at a step: linear warm-up, then cosine/linear decay to min_lr_ratio, or constant."""
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return factor


def multitask_loss(model: MultiTaskTransformer, features_BD: torch.Tensor, task_B: torch.Tensor, label_B: torch.Tensor):
    """Mean over the tasks present of each task's mean cross-entropy; also the per-task losses (detached)."""
    losses = {}
    for t, spec in enumerate(model.tasks):
        rows = (task_B == t).nonzero().squeeze(-1)
        if rows.numel():
            losses[spec.name] = F.cross_entropy(model.logits(features_BD[rows], t).float(), label_B[rows])
    total = torch.stack(list(losses.values())).mean()
    return total, {name: value.detach() for name, value in losses.items()}


class Trainer:
    """Builds one run from `cfg` and trains it; `resume` is a checkpoint path, "auto" or None."""

    def __init__(self, cfg: Config, *, resume: str | None = None, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_checkpoints)
        resume_path = self._resume_path(resume, overwrite)
        if cfg.train.num_threads is not None:
            torch.set_num_threads(cfg.train.num_threads)
        torch.manual_seed(cfg.train.seed)
        self.device, self.amp_dtype = resolve_device(cfg)
        self.data = build_data(cfg)
        image_shape = tuple(self.data.train[0]["pixels"].shape)
        self.model = MultiTaskTransformer(cfg.model, cfg.moe, self.data.tasks, image_shape).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self._param_groups(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.batches = ResumableBatches(self.data.train, cfg.data.batch_size, seed=cfg.train.seed)
        self.step = 0
        self.last_checkpoint: Path | None = None
        state = load_checkpoint(resume_path, cfg.to_dict()) if resume_path is not None else None
        if state is not None:
            self._load_state(state)
            self.last_checkpoint = resume_path
        self.logger = MetricsLogger(
            self.out_dir, csv_files=cfg.logging.csv, tensorboard=cfg.logging.tensorboard,
            resume_step=self.step if state is not None else None,
        )
        (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
        self._signal: int | None = None

    # ---------------------------------------------------------------- setup helpers

    def _resume_path(self, resume: str | None, overwrite: bool) -> Path | None:
        existing = self.checkpoints.latest()
        if resume == "auto":
            return existing
        if resume is not None:
            return resolve_checkpoint(resume)
        if existing is not None and not overwrite:
            raise RunDirectoryError(
                f"train.out_dir = {str(self.out_dir)!r} already holds checkpoints (newest: {existing.name}); "
                "pass --resume to continue that run, --overwrite to start over, or --set train.out_dir=... for a new one"
            )
        if existing is not None:
            shutil.rmtree(self.out_dir / "checkpoints")  # the logs go when MetricsLogger starts fresh
        return None

    def _param_groups(self) -> list[dict[str, Any]]:
        # Weight decay on matrices only: norms, biases, embeddings and positions stay undecayed.
        no_decay = {id(p) for m in self.model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.Embedding)) for p in m.parameters()}
        no_decay.add(id(self.model.pos_embed))
        decay = [p for p in self.model.parameters() if p.ndim >= 2 and id(p) not in no_decay]
        rest = [p for p in self.model.parameters() if p.ndim < 2 or id(p) in no_decay]
        return [{"params": decay, "weight_decay": self.cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.batches.state_dict(),
            "rng": rng_state(),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        try:
            self.batches.load_state_dict(state["data"])
        except ValueError as err:
            raise CheckpointMismatchError(f"the checkpoint's data position does not fit this config: {err}") from err
        set_rng_state(state["rng"])
        self.step = state["step"]

    def save_checkpoint(self) -> Path:
        self.last_checkpoint = self.checkpoints.save(self.state_dict(), self.step)
        return self.last_checkpoint

    # ---------------------------------------------------------------- the loop

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on one batch; returns its metrics. Raises NonFiniteLossError before the update."""
        self.model.train()
        pixels, task, label = (batch[k].to(self.device, non_blocking=True) for k in ("pixels", "task", "label"))
        with self._autocast():
            out = self.model(pixels, task)
            task_loss, per_task = multitask_loss(self.model, out.features_BD, task, label)
        loss = task_loss + out.aux_loss
        loss_value = loss.item()  # NOTE: device-to-host sync, once a step, for the NaN guard and the log
        if not math.isfinite(loss_value):
            self._non_finite("loss", loss_value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm):
            self._non_finite("gradient norm", grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = {"loss": loss_value, "task_loss": float(task_loss.detach()), "aux_loss": float(out.aux_loss.detach()), "grad_norm": grad_norm, "lr": lr}
        metrics.update({f"loss_{spec.name}": float(per_task[spec.name]) if spec.name in per_task else None for spec in self.model.tasks})
        return metrics

    def _non_finite(self, what: str, value: float) -> None:
        where = self.last_checkpoint if self.last_checkpoint is not None else "none saved yet"
        raise NonFiniteLossError(
            f"{what} is {value} at step {self.step + 1}; stopped before the update. Last good checkpoint: {where}. "
            "Lower optim.lr, enable optim.grad_clip, or check the data of this step."
        )

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        """Accuracy and loss per task on the test split, and tokens per expert per MoE layer (L, E)."""
        self.model.eval()
        num_tasks, num_experts = len(self.model.tasks), self.cfg.moe.num_experts
        correct, seen, loss_sum = torch.zeros(num_tasks), torch.zeros(num_tasks), torch.zeros(num_tasks)
        counts_LE = torch.zeros(len(self.model.moe_layers), num_experts, dtype=torch.long)
        for batch in eval_batches(self.data.test, self.cfg.data.eval_batch_size):
            pixels, task, label = (batch[k].to(self.device) for k in ("pixels", "task", "label"))
            with self._autocast():
                out = self.model(pixels, task)
            for layer, routing in enumerate(out.routings):
                kept = routing.experts_TK[routing.experts_TK >= 0]
                counts_LE[layer] += torch.bincount(kept, minlength=num_experts).cpu()
            for t in range(num_tasks):
                rows = (task == t).nonzero().squeeze(-1)
                if rows.numel():
                    logits = self.model.logits(out.features_BD[rows], t).float()
                    correct[t] += (logits.argmax(-1) == label[rows]).sum().cpu()
                    loss_sum[t] += F.cross_entropy(logits, label[rows], reduction="sum").cpu()
                    seen[t] += rows.numel()
        metrics = {}
        for t, spec in enumerate(self.model.tasks):
            metrics[f"accuracy_{spec.name}"] = float(correct[t] / seen[t].clamp_min(1))
            metrics[f"loss_{spec.name}"] = float(loss_sum[t] / seen[t].clamp_min(1))
        return metrics, counts_LE

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record it: the step in flight finishes, then the loop saves and stops cleanly.
        # A second signal means "now": give up on the checkpoint.
        if self._signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self._signal = signum

    def run(self, until_step: int | None = None) -> TrainResult:
        """Train to train.max_steps (or `until_step`), evaluating, logging and checkpointing on the way."""
        cfg, target = self.cfg, min(until_step or self.cfg.train.max_steps, self.cfg.train.max_steps)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        start = time.perf_counter()
        tokens_per_sample = self.model.pos_embed.shape[0]  # the task token and the patches
        progress = _progress_bar(cfg, self.step, target)
        try:
            while self.step < target:
                step_start = time.perf_counter()
                metrics = self.train_step(next(self.batches))
                seconds = time.perf_counter() - step_start
                metrics["samples_per_s"] = cfg.data.batch_size / seconds
                metrics["tokens_per_s"] = cfg.data.batch_size * tokens_per_sample / seconds
                if self.step % cfg.logging.log_every == 0 or self.step == target:
                    self.logger.log("train", self.step, metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps:
                    self.logger.log("eval", self.step, self.evaluate()[0])
                due = self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps
                if due or self._signal is not None:
                    self.save_checkpoint()
                if self._signal is not None:
                    raise TrainingInterrupted(self._signal, self.step, self.last_checkpoint)
        finally:
            if progress is not None:
                progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()
        eval_metrics, counts_LE = self.evaluate()
        return TrainResult(self.step, eval_metrics, counts_LE, time.perf_counter() - start, self.last_checkpoint)


def _progress_bar(cfg: Config, initial: int, total: int):
    if not cfg.logging.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_engine.train ...` is `moe-engine train ...` (launchers such as deepspeed call it)."""
    from moe_engine.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
