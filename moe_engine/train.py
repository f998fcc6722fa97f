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
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from moe_engine.checkpoint import (
    MODEL_FILE,
    CheckpointManager,
    CheckpointMismatchError,
    checkpoint_task_order,
    config_mismatches,
    config_value,
    expert_shard_file,
    load_checkpoint,
    read_expert_shard,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from moe_engine.config import Config
from moe_engine.experts import check_experts_can_run
from moe_engine.finetune import FrozenGroups, freeze_groups, load_pretrained_weights
from moe_engine.metrics import MetricsLogger
from moe_engine.mtl.routing_monitor import RoutingMonitor
from moe_engine.mtl.weighting import build_weighting
from moe_engine.parallel import AllToAllDispatcher
from moe_engine.parallel.runtime import (
    DistributedRun,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    bind_local_device,
    check_backend,
    clip_gradients,
    expert_parameters,
    gather_objects,
    init_distributed,
    signal_any_rank,
)
from moe_engine.parallel.deepspeed_checkpoint import latest_tag, load_deepspeed_checkpoint, save_deepspeed_checkpoint
from moe_engine.parallel.deepspeed_engine import (
    check_launched,
    init_deepspeed_distributed,
    initialize_engine,
    load_deepspeed_config,
    prepare_expert_parallel,
    read_deepspeed_json,
)
from moe_engine.parallel.sharding import (
    canonical_state,
    expert_shard_state,
    load_canonical_state,
    load_sharded_state,
    replicated_state,
)
from moe_engine.parallel.telemetry import load_imbalance
from moe_engine.routers import task_specific_router_parameters
from moe_engine.task_loss import combine_task_losses
from moe_engine.workloads import Workload, build_workload


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the message names the step and the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved first."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint saved to {checkpoint}; resume with --resume")


# What building a Trainer raises for a mistake the user can fix (a CLI reports it in one line, exit 2):
# CheckpointMismatchError, RunDirectoryError, DeepSpeedConfigError and bad values are ValueErrors.
TRAINER_SETUP_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, ValueError)


class RunDirectoryError(ValueError):
    """The run directory holds another run's checkpoints and neither resume nor overwrite was asked for."""


@dataclass(frozen=True)
class TrainResult:
    """tokens_per_task_expert_LXE: (routers, tasks, E) int64 choices of each task's test tokens per
    expert, per routing decision of the model (MultiTaskTransformer.routers); tokens_per_expert_LE
    is its sum over tasks."""

    step: int
    eval_metrics: dict[str, float]
    tokens_per_task_expert_LXE: torch.Tensor
    wall_seconds: float
    checkpoint: Path | None

    @property
    def tokens_per_expert_LE(self) -> torch.Tensor:
        return self.tokens_per_task_expert_LXE.sum(1)


def resolve_device(cfg: Config, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None: plain fp32) that train.device/train.precision ask for.

    Under a launcher each rank takes the GPU of its LOCAL_RANK.
    """
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda': no CUDA device is available; use 'auto' or 'cpu'")
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if name == "cuda" else "fp32"
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device("cpu")
    return device, (torch.bfloat16 if precision == "bf16" else None)


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


def _expert_counts(routing) -> torch.Tensor:
    """(E,) float32: kept choices per expert of one MoE layer's routing on this rank."""
    kept = routing.experts_TK[routing.experts_TK >= 0]
    return torch.bincount(kept, minlength=routing.num_experts).float()


class Trainer:
    """Builds one run from `cfg` and trains it; `resume` is a checkpoint path, "auto" or None."""

    def __init__(self, cfg: Config, *, resume: str | None = None, overwrite: bool = False) -> None:
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", cfg.train.keep_checkpoints)
        device_type = "cuda" if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()) else "cpu"
        use_deepspeed = cfg.parallel.deepspeed_config is not None
        check_backend(cfg.parallel.backend, device_type)  # before any process group: a line, not torch's traceback
        bind_local_device(device_type)  # before any process group, model or kernel
        if use_deepspeed:
            read_deepspeed_json(cfg.parallel.deepspeed_config)  # a missing or broken file, before joining a job
            check_launched()
            backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
            init_deepspeed_distributed(backend)
        self.run_info: DistributedRun = init_distributed(
            cfg.parallel.backend, device_type, cfg.parallel.expert_parallel_size, cfg.moe.num_experts,
            needs_groups=cfg.parallel.dispatcher == "all_to_all",
        )
        self._check_even_slices()
        self._overwrite_old_run = False
        resume_path = self._resume_path(resume, overwrite)
        if cfg.train.num_threads is not None:
            torch.set_num_threads(cfg.train.num_threads)
        self.device, self.amp_dtype = resolve_device(cfg, self.run_info.local_rank)
        self.workload: Workload = build_workload(cfg)
        self.data = self.workload.data
        self.task_names = list(self.workload.task_names)
        self.model = self._build_model()
        check_experts_can_run(self.model, self.device, self.amp_dtype or torch.float32)
        self.frozen: FrozenGroups | None = None
        if cfg.finetune.init_from is not None and resume_path is None:
            # Fine-tuning: the pre-trained weights, then the frozen groups out of the optimizer.
            load_pretrained_weights(self.model, self.workload, cfg.finetune.init_from, self.run_info.groups,
                                    cfg.model.architecture)
        if cfg.finetune.freeze:
            self.frozen = freeze_groups(self.model, self.workload, cfg.finetune.freeze)
        # Micro-batches add up like ranks do: a term of the method that does not scale with the data is
        # counted once per step when divided by ranks x micro-batches.
        self.weighting = build_weighting(
            cfg.mtl.weighting, len(self.task_names), world_size=self.run_info.world_size * cfg.train.grad_accum_steps,
            **cfg.mtl.weighting_options,
        ).to(self.device)
        self.shared_params = self._shared_parameters()
        self.optimizer, self.scheduler = self._build_optimizer(self._param_groups())
        self.weighting_optimizer = self._build_weighting_optimizer()
        self.batches = self.workload.train_batches(cfg.train.seed)
        self.step = 0
        self.last_checkpoint: Path | None = None
        task_cfg = cfg.moe.router.task
        self.monitor = RoutingMonitor(
            self.model.routers, cfg.moe.num_experts, self.task_names, self.run_info,
            telemetry=cfg.logging.routing_telemetry,
            adaptive_k=(task_cfg.adaptive_k_min, task_cfg.adaptive_patience) if task_cfg.adaptive_k else None,
        )
        # Under DeepSpeed the engine runs backward, reduction, clipping, the steps and checkpoints.
        self.engine = None
        if use_deepspeed:
            ds_config = load_deepspeed_config(
                cfg.parallel.deepspeed_config, cfg, self.run_info.world_size, bf16=self.amp_dtype == torch.bfloat16
            )
            num_experts = None
            if self._ep_size > 1:
                # DeepSpeed's MoE parameter groups: the optimizer and schedule are rebuilt over the split groups.
                param_groups = prepare_expert_parallel(self.model, self._param_groups(), self.run_info.groups)
                self.optimizer, self.scheduler = self._build_optimizer(param_groups)
                num_experts = [cfg.moe.num_experts] * len(self.model.moe_layers)
            self.engine = initialize_engine(self.model, self.optimizer, self.scheduler, ds_config, num_experts)
        state = None
        if resume_path is not None and self.engine is not None:
            state = self._load_deepspeed_checkpoint(resume_path)
        elif resume_path is not None:
            state = load_checkpoint(resume_path, cfg.to_dict())
            self._load_state(state)
        if state is not None:
            self.last_checkpoint = resume_path
        self._clear_overwritten_run()  # the first write to the run directory: every check has passed
        # Rank 0 writes the logs; the other ranks compute the same (all-reduced) numbers.
        self.logger = MetricsLogger(
            self.out_dir, csv_files=cfg.logging.csv and self.run_info.is_main,
            tensorboard=cfg.logging.tensorboard and self.run_info.is_main,
            resume_step=self.step if state is not None else None, clear=self.run_info.is_main,
        )
        if self.run_info.is_main:
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
        self._signal: int | None = None

    # ---------------------------------------------------------------- setup helpers

    def _build_model(self) -> torch.nn.Module:
        """The model, with its experts sharded over the EP group when the all-to-all dispatcher is on.

        Every rank first builds the whole single-process model from the seed and then keeps its
        share of it, so a run starts from the same weights at every EP size (and RNG draws after
        this point match a single-process run's).
        """
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        whole = self.workload.build_model(None)
        groups = self.run_info.groups
        if cfg.parallel.dispatcher != "all_to_all":
            return whole.to(self.device)
        rng_after_init = torch.get_rng_state()
        model = self.workload.build_model(
            lambda moe_cfg: AllToAllDispatcher(
                moe_cfg.num_experts, groups.ep_group, fixed_splits=cfg.parallel.fixed_splits,
                num_chunks=cfg.parallel.a2a_chunks, weights_to_experts=cfg.parallel.weights_to_experts,
            ),
        )
        torch.set_rng_state(rng_after_init)
        load_canonical_state(model, None, whole.state_dict(), None, groups.ep_rank, groups.ep_size)
        return model.to(self.device)

    @property
    def _ep_size(self) -> int:
        return self.run_info.groups.ep_size if self.run_info.groups is not None else 1

    def _latest_checkpoint(self) -> Path | None:
        """The newest checkpoint of this run directory: a step_XXXXXXXX.pt file, or DeepSpeed's latest tag folder."""
        if self.cfg.parallel.deepspeed_config is not None:
            tag = latest_tag(self.checkpoints.directory)
            return self.checkpoints.directory / tag if tag else None
        return self.checkpoints.latest()

    def _check_even_slices(self) -> None:
        """Fixed all-to-all splits size each rank's exchange from its own token count: the ranks' slices
        of a batch (in micro-batches) must be equal, or the exchange sizes disagree (a crash or a hang)."""
        cfg, world = self.cfg, self.run_info.world_size
        parts = world * cfg.train.grad_accum_steps
        if cfg.parallel.fixed_splits and world > 1 and cfg.data.batch_size % parts:
            raise ValueError(
                f"parallel.fixed_splits = true: data.batch_size = {cfg.data.batch_size} does not split evenly over "
                f"{world} ranks x train.grad_accum_steps = {cfg.train.grad_accum_steps}; use a multiple of {parts}, "
                "or fixed_splits = false"
            )

    def _resume_path(self, resume: str | None, overwrite: bool) -> Path | None:
        existing = self._latest_checkpoint()
        if resume == "auto":
            return existing
        if resume is not None and self.cfg.parallel.deepspeed_config is not None:
            path = Path(resume)
            if not (path / "mp_rank_00_model_states.pt").is_file() and not any(path.glob("*model_states.pt")):
                raise FileNotFoundError(f"--resume {resume!r}: not a DeepSpeed checkpoint folder (checkpoints/step_XXXXXXXX)")
            return path
        if resume is not None:
            return resolve_checkpoint(resume)
        if existing is not None and not overwrite:
            raise RunDirectoryError(
                f"train.out_dir = {str(self.out_dir)!r} already holds checkpoints (newest: {existing.name}); "
                "pass --resume to continue that run, --overwrite to start over, or --set train.out_dir=... for a new one"
            )
        # --overwrite: the old run's checkpoints go only once every setup check has passed
        # (`_clear_overwritten_run`), so a mistake in the new settings loses nothing.
        self._overwrite_old_run = existing is not None
        return None

    def _clear_overwritten_run(self) -> None:
        """Delete the checkpoints an --overwrite run replaces (its logs go when MetricsLogger starts
        fresh): the last step of setup, after everything that can refuse the new settings."""
        if self._overwrite_old_run and self.run_info.is_main:
            shutil.rmtree(self.checkpoints.directory)
        barrier(self.run_info)  # nobody looks at the directory again before rank 0 has cleared it

    def _param_groups(self) -> list[dict[str, Any]]:
        # Weight decay on matrices only: norms, biases, embeddings and positions stay undecayed.
        # Frozen parameters (finetune.freeze) stay out of the optimizer.
        no_decay = {id(p) for m in self.model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.Embedding)) for p in m.parameters()}
        no_decay.update(id(p) for name, p in self.model.named_parameters() if "pos_embed" in name)
        if hasattr(self.model, "embedding_parameters"):  # the generalist's tokens, prompts, positions, logit scale
            no_decay.update(id(p) for p in self.model.embedding_parameters())
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2 and id(p) not in no_decay]
        rest = [p for p in params if p.ndim < 2 or id(p) in no_decay]
        return [{"params": decay, "weight_decay": self.cfg.optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]

    def _routers_frozen(self) -> bool:
        """Frozen routers (finetune.freeze) keep their routing state too: no expert-bias update, no adaptive-k move."""
        return "routers" in self.cfg.finetune.freeze

    def _shared_parameters(self) -> list[torch.nn.Parameter]:
        """The dense parameters every task shares (no experts, nothing task-specific, nothing frozen):
        what gradient-based loss weighting compares the tasks' gradients on (see moe_engine.task_loss).
        Task-specific: the workload's (heads, task embeddings, prompts) and the routers' per-task gates."""
        task_specific = [*self.workload.task_parameters(self.model), *task_specific_router_parameters(self.model)]
        excluded = {id(p) for p in expert_parameters(self.model)} | {id(p) for p in task_specific}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in excluded]

    def _build_weighting_optimizer(self) -> torch.optim.Optimizer | None:
        """Adam over the weighting method's own parameters (UW's log variances, GradNorm's weights), if any.

        Kept apart from the model's optimizer so it works the same under DeepSpeed's engine; their
        gradients are SUM-reduced over the ranks after each backward (see moe_engine.task_loss).
        """
        params = [p for p in self.weighting.parameters() if p.requires_grad]
        if not params:
            return None
        lr = self.cfg.mtl.weighting_lr if self.cfg.mtl.weighting_lr is not None else self.cfg.optim.lr
        return torch.optim.Adam(params, lr=lr)

    def _build_optimizer(self, param_groups: list[dict[str, Any]]) -> tuple[torch.optim.Optimizer, Any]:
        o = self.cfg.optim
        optimizer = torch.optim.AdamW(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(self.cfg))

    def state_dict(self) -> dict[str, Any]:
        """The canonical (single-process layout) state; gathers expert shards, so every rank calls it."""
        model_sd, optim_sd = canonical_state(self.model, self.optimizer, self.run_info.groups)
        return {
            **self._client_state(self.monitor.state_dict(), self._rng_states()),
            "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
        }

    def _weighting_state(self) -> dict[str, Any]:
        optimizer = self.weighting_optimizer
        return {"method": self.weighting.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None}

    def _load_weighting_state(self, state: dict[str, Any] | None, saved_options: Any = None) -> None:
        """saved_options: the checkpoint's mtl.weighting_options (for the error), if its config has them."""
        if state is None:  # a checkpoint from before loss weighting: the method starts fresh
            return
        try:
            self.weighting.load_state_dict(state["method"])
        except RuntimeError as err:  # same method (config_mismatches checks it), options that change its state (imtl mode)
            own = f" ({saved_options!r})" if saved_options is not None else ""
            raise CheckpointMismatchError(
                f"mtl.weighting_options = {self.cfg.mtl.weighting_options!r}: the checkpoint's {self.cfg.mtl.weighting!r} "
                f"state does not fit these options; resume with the run's own options{own} ({err})"
            ) from err
        if self.weighting_optimizer is not None and state["optimizer"] is not None:
            self.weighting_optimizer.load_state_dict(state["optimizer"])

    def _load_state(self, state: dict[str, Any]) -> None:
        """Load a checkpoint of either layout (one canonical file, or per-shard folder) at this run's EP size."""
        groups = self.run_info.groups
        ep_rank, ep_size = (groups.ep_rank, groups.ep_size) if groups is not None else (0, 1)
        try:
            if "expert_shards" in state:
                shards = state["expert_shards"]
                read = lambda r: read_expert_shard(shards["directory"], r, shards["ep_size"], state["step"])  # noqa: E731
                load_sharded_state(
                    self.model, self.optimizer, state["model"], state["optimizer"], shards["num_experts"], read,
                    shards["ep_size"], ep_rank, ep_size,
                )
            else:
                load_canonical_state(self.model, self.optimizer, state["model"], state["optimizer"], ep_rank, ep_size)
        except (RuntimeError, ValueError) as err:  # missing/unexpected keys or shapes torch names
            raise CheckpointMismatchError(f"the checkpoint's tensors do not fit this model: {err}") from err
        self.scheduler.load_state_dict(state["scheduler"])
        self._load_run_state(state)

    def _load_run_state(self, state: dict[str, Any]) -> None:
        """What every checkpoint layout holds besides model, optimizer and schedule: data position,
        RNG states, routing monitor, loss weighting and step."""
        saved_tasks = checkpoint_task_order(state)
        if saved_tasks != self.task_names:
            raise CheckpointMismatchError(
                f"the checkpoint's per-task parameters are for the tasks {saved_tasks}, in that order; this run has "
                f"{self.task_names} (with data.path, data.tasks picks and orders the folder's tasks)"
            )
        try:
            self.batches.load_state_dict(state["data"])
        except ValueError as err:
            raise CheckpointMismatchError(f"the checkpoint's data position does not fit this config: {err}") from err
        self._load_rng_state(state)
        self.monitor.load_state_dict(state.get("routing"))
        saved_options = config_value(state.get("config", {}), "mtl.weighting_options")
        self._load_weighting_state(state.get("weighting"), None if saved_options == "<missing>" else saved_options)
        self.step = state["step"]

    def _rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG states, in rank order (collective): ranks draw different amounts (dropout and
        router noise over slices of different sizes), so an exact resume restores each its own."""
        return gather_objects(rng_state(), self.run_info)

    def _load_rng_state(self, state: dict[str, Any]) -> None:
        """This rank's RNG states from a checkpoint saved by as many ranks; otherwise (another world
        size, or a file from before per-rank states, whose "rng" is rank 0's) every rank continues
        from rank 0's."""
        ranks, run = state.get("rng_ranks"), self.run_info
        if ranks is not None and len(ranks) == run.world_size:
            set_rng_state(ranks[run.rank])
            return
        set_rng_state(ranks[0] if ranks is not None else state["rng"])
        if ranks is not None and run.world_size > 1 and run.is_main:
            warnings.warn(
                f"the checkpoint holds the RNG states of {len(ranks)} rank(s), this run has {run.world_size}: "
                "every rank continues from rank 0's (dropout and router noise differ from an uninterrupted run)",
                stacklevel=2,
            )

    def _client_state(self, routing_state: dict[str, Any] | None, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The run state besides model, optimizer and schedule (all that DeepSpeed's checkpoint does not
        hold by itself): step, config, data position, every rank's RNG states, the routing monitor's
        state, loss weighting and tasks. The routing state (`self.monitor.state_dict()`) and the RNG
        states (`_rng_states()`) are collectives: every rank gathers them beforehand."""
        return {
            "step": self.step, "config": self.cfg.to_dict(), "data": self.batches.state_dict(), "rng_ranks": rng_states,
            "routing": routing_state, "weighting": self._weighting_state(), "tasks": self.workload.task_specs(),
            "task_names": list(self.task_names),
        }

    def _load_deepspeed_checkpoint(self, path: Path) -> dict[str, Any]:
        """DeepSpeed's load (with this rank's expert shard), then the run state of its client state."""
        client = load_deepspeed_checkpoint(self.engine, self.model, self.run_info.groups, path)
        problems = config_mismatches(client["config"], self.cfg.to_dict())
        if problems:
            raise CheckpointMismatchError(f"checkpoint {path} does not match the config:\n  " + "\n  ".join(problems))
        self._load_run_state(client)
        return client

    def save_checkpoint(self) -> Path:
        """Every rank takes part. Expert-parallel runs (EP > 1) write a step_XXXXXXXX/ folder: each rank of
        the first expert-data-parallel replica its expert shard, rank 0 the rest. Other runs: rank 0
        writes step_XXXXXXXX.pt. Under DeepSpeed, DeepSpeed saves its partitions into step_XXXXXXXX/ and,
        with EP > 1, each rank of the first expert-data-parallel replica adds its experts_ep{r}_of_{P}.pt
        (moe_engine.parallel.deepspeed_checkpoint)."""
        groups = self.run_info.groups
        if self.engine is not None:
            self.last_checkpoint = save_deepspeed_checkpoint(
                self.engine, self.model, groups, self.checkpoints, self.step,
                self._client_state(self.monitor.state_dict(), self._rng_states()), self.run_info.is_main,
                barrier=lambda: barrier(self.run_info),
            )
            return self.last_checkpoint
        if groups is not None and groups.ep_size > 1:  # one file per expert shard, nothing gathered
            files = self._sharded_checkpoint_files(self.monitor.state_dict(), self._rng_states())
            self.last_checkpoint = self.checkpoints.save_sharded(
                self.step, files, is_main=self.run_info.is_main,
                barrier=lambda: barrier(self.run_info),
            )
            return self.last_checkpoint
        state = self.state_dict()
        if self.run_info.is_main:
            self.checkpoints.save(state, self.step)
        barrier(self.run_info)  # the file exists for everyone once save_checkpoint returns
        self.last_checkpoint = self.checkpoints.path_for(self.step)
        return self.last_checkpoint

    def _sharded_checkpoint_files(
        self, routing_state: dict[str, Any], rng_states: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """The files of a per-shard checkpoint this rank writes: its expert shard if it belongs to the
        first expert-data-parallel replica (ranks 0..P-1), and model.pt on rank 0."""
        groups = self.run_info.groups
        files = {}
        if groups.rank < groups.ep_size:
            shard = expert_shard_state(self.model, self.optimizer, groups.ep_rank, groups.ep_size)
            files[expert_shard_file(groups.ep_rank, groups.ep_size)] = shard
        if self.run_info.is_main:
            model_sd, optim_sd, num_experts = replicated_state(self.model, self.optimizer, groups.ep_size)
            files[MODEL_FILE] = {
                **self._client_state(routing_state, rng_states), "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                "expert_shards": {"ep_size": groups.ep_size, "num_experts": num_experts},
            }
        return files

    # ---------------------------------------------------------------- the loop

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on one global batch (this rank takes its slice, in train.grad_accum_steps
        micro-batches); returns the step's metrics, equal on every rank. Raises NonFiniteLossError
        before the update."""
        self.model.train()
        run = self.run_info
        accum = self.cfg.train.grad_accum_steps
        if accum == 1:
            parts, counts_T = [batch], None  # the counts come with the forward, all-reduced
        else:
            # Every micro-batch's losses are divided by the whole batch's counts, so they add up to the
            # step's loss: the same update as one pass over the batch.
            parts, counts_T = self.workload.micro_batches(batch, accum), self.workload.task_counts(batch).to(self.device)
        if self.engine is None:  # DeepSpeed's engine zeroes its own after each update
            self.optimizer.zero_grad(set_to_none=True)
        if self.weighting_optimizer is not None:
            self.weighting_optimizer.zero_grad(set_to_none=True)
        logged, step_losses_T = None, 0.0
        ep_size = run.groups.ep_size if run.groups is not None else 1
        replicas, replica = run.world_size // ep_size, run.rank // ep_size  # EP groups are consecutive ranks
        for i, part in enumerate(parts):
            with self._autocast():
                fwd = self.workload.forward_step(self.model, part, run, self.device)
            task = combine_task_losses(fwd, self.task_names, self.weighting, self.shared_params, run, counts_T)
            self.monitor.observe(fwd.routings, fwd.routing_task_ids_T)
            # The balance loss is a statistic of each rank's micro-batch (as in DeepSpeed and Megatron-Core);
            # dividing by ranks x micro-batches makes the SUM-reduced gradient that of their mean.
            aux_loss = fwd.aux_loss / (run.world_size * accum)
            loss = task.loss + aux_loss
            counts_LE = torch.stack([_expert_counts(r) for r in fwd.routings]) if fwd.routings else aux_loss.new_zeros(0, 0)
            # In this rank's replica's slot: the sum over ranks gives every replica's counts apart.
            counts_RLE = torch.zeros((replicas, *counts_LE.shape), dtype=torch.float32, device=counts_LE.device)
            counts_RLE[replica] = counts_LE.float()
            part_logged = torch.cat([
                torch.stack([task.loss.detach().float(), aux_loss.detach().float()]),
                aux_loss.new_tensor([fwd.num_tokens], dtype=torch.float32), counts_RLE.flatten(),
            ])
            logged = part_logged if logged is None else logged + part_logged
            step_losses_T = step_losses_T + task.local_losses_T
            if self.engine is not None:
                self._deepspeed_backward(loss, last=i == accum - 1)
            else:
                loss.backward()
        # One all-reduce carries what the log needs from every rank: losses, tokens, expert counts, and,
        # with accumulation, the per-task losses (one step's forward reduces them in combine_task_losses;
        # the weights are global already).
        if task.global_losses_T is None:
            logged = torch.cat([logged, step_losses_T.to(logged.dtype)])
        logged = all_reduce_sum(logged, run)
        if task.global_losses_T is None:
            logged, step_losses_T = logged[:-len(self.task_names)], logged[-len(self.task_names):]
            task = replace(task, global_losses_T=step_losses_T)
        logged = logged.tolist()  # NOTE: device-to-host sync, once a step, for the NaN guard and the log
        task_loss, aux_value = logged[0], logged[1]
        if not math.isfinite(task_loss + aux_value):
            self._non_finite("loss", task_loss + aux_value)
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            grad_norm = self._deepspeed_update()
        else:
            if run.groups is not None:
                all_reduce_gradients(self.model, run.groups)
            grad_norm = clip_gradients(self.model, run.groups, self.cfg.optim.grad_clip)
            if not math.isfinite(grad_norm):
                self._non_finite("gradient norm", grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self._weighting_step(task, run)
        self.step += 1
        metrics = {"loss": task_loss + aux_value, "task_loss": task_loss, "aux_loss": aux_value, "grad_norm": grad_norm, "lr": lr}
        losses, weights, present = task.global_losses_T.tolist(), task.weights_T.tolist(), task.present_T.tolist()
        metrics.update({f"loss_{name}": losses[t] if present[t] else None for t, name in enumerate(self.task_names)})
        if self.cfg.mtl.weighting != "equal":
            metrics.update({f"weight_{name}": weights[t] for t, name in enumerate(self.task_names)})
        metrics["tokens"] = logged[2]
        if fwd.routings:
            counts_RLE = torch.tensor(logged[3:]).view(replicas, *counts_LE.shape)
            metrics.update(load_imbalance(counts_RLE, ep_size))
            global_counts_LE = counts_RLE.sum(0)
            rate = self.cfg.moe.router.expert_bias_rate
            if rate > 0 and not self._routers_frozen():  # the same global counts on every rank: replicas stay identical
                for router, counts_E in zip(self.model.routers, global_counts_LE):
                    router.update_expert_bias(counts_E, rate)
        metrics.update(self._traffic())
        return metrics

    def _weighting_step(self, task, run) -> None:
        """After the model's update: the method's own parameters step (gradients summed over ranks),
        then its state sees the step's global losses."""
        if self.weighting_optimizer is not None:
            params = [p for group in self.weighting_optimizer.param_groups for p in group["params"]]
            if run.world_size > 1:
                grads = all_reduce_sum(torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params]), run)
                for p, g in zip(params, grads):
                    p.grad = g.clone()
            self.weighting_optimizer.step()
        self.weighting.after_optimizer_step()
        self.weighting.observe(task.global_losses_T, task.present_T)

    def _deepspeed_backward(self, loss: torch.Tensor, last: bool) -> None:
        """The engine's backward of one micro-batch, and its step where it only accumulates.

        DeepSpeed divides reduced gradients by the world size (expert gradients too, which it sums
        over the expert-data-parallel group) and the loss by its gradient_accumulation_steps; our
        losses are normalised for a sum over ranks and micro-batches, so the loss is scaled by both
        first (see deepspeed_engine.py). The engine wants step() after every backward; on the last
        micro-batch that step is the update, which waits for the NaN guard (_deepspeed_update).
        """
        world, accum = self.run_info.world_size, self.cfg.train.grad_accum_steps
        self.engine.backward(loss * (world * accum))
        if not last:
            self.engine.step()  # not at the accumulation boundary: no update, no scheduler step

    def _deepspeed_update(self) -> float:
        """The engine's step at the accumulation boundary: ZeRO reduction, clipping, optimizer and
        scheduler step. Returns the gradient norm DeepSpeed measured."""
        # The weighting method's own parameters are not DeepSpeed's: undo the world-size scale on
        # their gradients (engine.backward took the micro-batch scale off; _weighting_step sums them over ranks).
        for p in self.weighting.parameters():
            if p.grad is not None:
                p.grad.div_(self.run_info.world_size)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if math.isnan(grad_norm) and self.cfg.optim.grad_clip is None:
            return grad_norm  # DeepSpeed measures the norm only when it clips
        if not math.isfinite(grad_norm):
            self._non_finite("gradient norm (after DeepSpeed's update; the last checkpoint is untouched)", grad_norm)
        return grad_norm

    def _traffic(self) -> dict[str, float]:
        """This rank's all-to-all volume (MB, both directions, forward and backward) and time this step."""
        meters = [m.dispatcher.traffic for m in self.model.moe_layers if hasattr(m.dispatcher, "traffic")]
        if not meters:
            return {}
        stats = [meter.read_and_reset() for meter in meters]
        moved = sum(s["bytes_sent"] + s["bytes_received"] for s in stats)
        return {"all_to_all_mb": moved / 1e6, "all_to_all_ms": 1e3 * sum(s["seconds"] for s in stats)}

    def _non_finite(self, what: str, value: float) -> None:
        where = self.last_checkpoint if self.last_checkpoint is not None else "none saved yet"
        raise NonFiniteLossError(
            f"{what} is {value} at step {self.step + 1}; stopped before the update. Last good checkpoint: {where}. "
            "Lower optim.lr, enable optim.grad_clip, or check the data of this step."
        )

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics and loss per task on the test split, and the routed choices of each task's tokens
        per expert, per router (L, num_tasks, E) int64; the numbers of the whole split on every rank."""
        self.model.eval()
        result = self.workload.evaluate(self.model, self.run_info, self.device, self._autocast, self.cfg.moe.num_experts)
        self._traffic()  # the evaluation's all-to-all exchanges are not the next training step's
        return result

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
        progress = _progress_bar(cfg, self.step, target)
        evaluated = None  # (step, evaluate()) of the last evaluation in the loop
        try:
            while self.step < target:
                step_start = time.perf_counter()
                metrics = self.train_step(next(self.batches))
                seconds = time.perf_counter() - step_start
                metrics["samples_per_s"] = cfg.data.batch_size / seconds
                metrics["tokens_per_s"] = metrics.pop("tokens") / seconds
                if "all_to_all_ms" in metrics:
                    metrics["all_to_all_share"] = metrics["all_to_all_ms"] / (1e3 * seconds)
                if self.step % cfg.logging.log_every == 0 or self.step == target:
                    self.logger.log("train", self.step, metrics)
                    self.monitor.log(self.logger, self.step)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps:
                    evaluated = (self.step, self.evaluate())
                    eval_metrics = dict(evaluated[1][0])
                    # AdaMV-MoE: each task's next k; after the last step the k stays that of the final results.
                    moves = self.step < cfg.train.max_steps and not self._routers_frozen()
                    eval_metrics.update(self.monitor.adapt(eval_metrics, update=moves))
                    if moves and self.monitor.controllers:  # the k moved: that evaluation is not the model's now
                        evaluated = None
                    self.logger.log("eval", self.step, eval_metrics)
                if self.run_info.world_size > 1:
                    # Ranks stop together: a signal seen by any rank (at any step) stops all of them here.
                    self._signal = signal_any_rank(self._signal, self.run_info, self.device)
                due = self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps
                if due or self._signal is not None:
                    self.save_checkpoint()
                if self._signal is not None:
                    raise TrainingInterrupted(self._signal, self.step, self.last_checkpoint)
            # The model has not changed since an evaluation at this step (a checkpoint does not change it).
            eval_metrics, counts_LXE = evaluated[1] if evaluated is not None and evaluated[0] == self.step else self.evaluate()
            self.monitor.finish(self.logger, self.out_dir, self.step, counts_LXE)
        finally:
            if progress is not None:
                progress.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()
        return TrainResult(self.step, eval_metrics, counts_LXE, time.perf_counter() - start, self.last_checkpoint)


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
