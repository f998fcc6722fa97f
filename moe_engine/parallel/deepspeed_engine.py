"""Training under DeepSpeed's engine: `deepspeed --num_gpus N --module moe_engine.train --deepspeed_config ...`.

DeepSpeed owns backward, gradient reduction (ZeRO stage 0/1/2), clipping, the optimizer and
scheduler steps, and checkpoints; moe_engine keeps the routing, the dispatch and the experts.

Expert parallelism (parallel.dispatcher = all_to_all, expert_parallel_size = P > 1) runs under
ZeRO stage 1 and 2 with DeepSpeed's "MoE parameter groups", the way DeepSpeed runs its own MoE
class (`deepspeed.moe.layer.MoE`), which it recognises by isinstance only:
- `prepare_expert_parallel` marks our expert parameters as DeepSpeed marks its own
  (`allreduce = False`, `group_name = "ep_size_P"`), creates DeepSpeed's expert-parallel and
  expert-data-parallel groups of that name and checks that they hold the same ranks as
  moe_engine's groups (consecutive EP groups, strided EDP groups), and splits the optimizer's
  param groups so that ZeRO partitions and reduces expert parameters over the EDP group;
- `initialize_engine(..., num_experts=...)` builds a DeepSpeedEngine that treats the model as
  having MoE layers (`has_moe_layers`), which its own detection would not.
DeepSpeed's checkpoint then holds the ZeRO partitions of every rank (expert optimizer state
included) but, in its module file, EP rank 0's experts only: moe_engine.parallel.deepspeed_checkpoint
writes each EP rank's experts next to it (experts_ep{r}_of_{P}.pt, moe_engine.checkpoint's shard
format) and loads them after DeepSpeed's load. Such a checkpoint resumes at the same expert-parallel
size only: ZeRO's partitions of the expert optimizer state cannot be resharded to another one. Stage 0 is refused
with P > 1: its clipping averages the ranks' local gradient norms, which is not the norm when ranks
hold different experts.

Gradient scale: DeepSpeed divides every reduced gradient by the data-parallel world size W, expert
gradients included (it SUM-reduces them over the EDP group after dividing by W).
moe_engine's losses are normalised for a SUM over ranks (see runtime.py), so the loss handed to
`engine.backward` is multiplied by W, which makes DeepSpeed's gradients those of the
single-process run, at every expert-parallel size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moe_engine.parallel.groups import ParallelGroups
from moe_engine.parallel.runtime import expert_parameters

if TYPE_CHECKING:
    from moe_engine.config import Config


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON config that does not fit the run config; the message names both values."""


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON config at `path` as a dict; DeepSpeedConfigError if it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"--deepspeed_config {str(path)!r}: no such file")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"--deepspeed_config {str(path)!r}: not valid JSON: {err}") from err
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"--deepspeed_config {str(path)!r}: expected a JSON object, got {type(ds).__name__}")
    return ds


def load_deepspeed_config(path: str | Path, cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and fill its "auto" values from the run config.

    train_batch_size = data.batch_size (the global batch), gradient_accumulation_steps = A =
    train.grad_accum_steps, train_micro_batch_size_per_gpu = data.batch_size / (W * A),
    gradient_clipping = optim.grad_clip, bf16.enabled = whether the run trains in bf16. Explicit
    values must agree with the run config.
    """
    path = Path(path)
    ds = read_deepspeed_json(path)
    batch, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
    if batch % (world_size * accum):
        raise DeepSpeedConfigError(
            f"data.batch_size = {batch} does not divide over {world_size} ranks x train.grad_accum_steps = {accum} micro-batches"
        )
    wanted = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch // (world_size * accum),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip is not None else 0.0,
    }
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            raise DeepSpeedConfigError(f"{path}: {key} = {given!r}, but the run config implies {value!r} (or use \"auto\")")
    _check_precision(path, ds, bf16)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage = {stage!r}: moe_engine supports 0, 1 and 2")
    ep = cfg.parallel.expert_parallel_size
    if ep > 1 and stage == 0:
        raise DeepSpeedConfigError(
            f"{path}: zero_optimization.stage = 0 with parallel.expert_parallel_size = {ep}: expert parallelism "
            "under DeepSpeed needs ZeRO stage 1 or 2 (stage 0 clips with the mean of the ranks' local gradient "
            "norms, not the norm of the sharded experts)"
        )
    return ds


def _check_precision(path: Path, ds: dict[str, Any], bf16: bool) -> None:
    """Fill bf16.enabled ("auto" or absent) with the run's precision; refuse an explicit value that
    disagrees with it, a non-boolean one, and fp16 (the trainer autocasts to bf16 or not at all:
    fp16's loss scaling would also scale the loss-weighting methods' gradients)."""
    run = "bf16" if bf16 else "fp32"
    ds.setdefault("bf16", {})
    given = ds["bf16"].get("enabled", "auto")
    if given == "auto":
        ds["bf16"]["enabled"] = bf16
    elif given is not bf16:
        raise DeepSpeedConfigError(
            f"{path}: bf16.enabled = {given!r}, but the run trains in {run} (train.precision); "
            f"use \"auto\" or {'true' if bf16 else 'false'}"
        )
    fp16 = ds.get("fp16", {}).get("enabled", False)
    if fp16 == "auto":
        ds["fp16"]["enabled"] = False
    elif fp16 is not False:
        raise DeepSpeedConfigError(
            f"{path}: fp16.enabled = {fp16!r}: moe_engine trains in bf16 or fp32 (train.precision = bf16 and "
            "\"bf16\": {\"enabled\": \"auto\"}); fp16 is not supported"
        )


def check_launched() -> None:
    """DeepSpeedConfigError unless this process can join a DeepSpeed job: started by a launcher
    (RANK / WORLD_SIZE in the environment), in a torch.distributed job already up, or able to find
    one through MPI (mpi4py, as DeepSpeed's own discovery under mpirun)."""
    import importlib.util

    import torch.distributed as dist

    if "RANK" in os.environ or "WORLD_SIZE" in os.environ or (dist.is_available() and dist.is_initialized()):
        return
    if importlib.util.find_spec("mpi4py") is not None:
        return
    raise DeepSpeedConfigError(
        "parallel.deepspeed_config is set, but no launcher started this process (no RANK / WORLD_SIZE in the "
        "environment, no MPI): run `bash launch/deepspeed.sh N ...` or `deepspeed --num_gpus N --module "
        "moe_engine.train ...` (N = 1 for one process)"
    )


def init_deepspeed_distributed(backend: str, verbose: bool = True, mpi_discovery: bool = True) -> None:
    """Join the job the deepspeed launcher started (env:// rendezvous, or a torch.distributed job
    already up), through deepspeed.comm; then unlink DeepSpeed's shared-memory all-reduce buffers."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=mpi_discovery, verbose=verbose)
    _unlink_shm_allreduce_buffer(getattr(ds_comm.cdb, "shm_comm_op", None) is not None)


def shm_allreduce_buffer(rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp) creates
    for `rank`: /dev/shm/deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def _unlink_shm_allreduce_buffer(has_shm_op: bool) -> None:
    """Remove this rank's DeepSpeed shared-memory all-reduce buffer by name, keeping its mappings.

    When every rank of the job is on one host (LOCAL_SIZE = world size, as the deepspeed launcher
    sets it), DeepSpeed's CPU comm op maps a 66 MiB buffer per rank in /dev/shm and never unlinks it:
    every run, finished or killed, would leave world-size such files behind (RAM, on tmpfs) until the
    host reboots. Each rank maps every rank's buffer before init returns, so after a barrier the names
    can go; the mappings live on until the processes exit, and nothing is left behind.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size()
    if not has_shm_op or os.environ.get("LOCAL_SIZE") != str(world_size):
        return  # DeepSpeed made no buffer (the same decision on every rank: same env, same build)
    dist.barrier()
    shm_allreduce_buffer(dist.get_rank()).unlink(missing_ok=True)


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed gives the expert groups of expert-parallel size ep_size (and marks its experts with)."""
    return f"ep_size_{ep_size}"


def prepare_expert_parallel(
    model: nn.Module, param_groups: list[dict[str, Any]], groups: ParallelGroups
) -> list[dict[str, Any]]:
    """Make DeepSpeed reduce and partition our expert shards as it does its own MoE experts; call it
    on every rank (it creates process groups) before `initialize_engine`, with groups.ep_size > 1.

    Marks each expert parameter (runtime.expert_parameters) with allreduce = False and
    group_name = "ep_size_P", creates DeepSpeed's expert-parallel and expert-data-parallel groups
    of that name and checks that they hold the same ranks as `groups`, and returns `param_groups`
    split by DeepSpeed's split_params_into_different_moe_groups_for_optimizer: every group's expert
    parameters move to a group of their own (same hyperparameters, moe = True). Build the optimizer
    from what it returns.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.ep_size)
    experts = expert_parameters(model)
    if not experts:
        raise ValueError("expert parallelism under DeepSpeed: the model has no experts behind a token dispatcher")
    for p in experts:
        p.allreduce = False  # what deepspeed.moe.utils.is_moe_param looks for
        p.group_name = name
    # Collective over the world, in the same order on every rank; a no-op when the groups exist.
    ds_groups._create_expert_and_data_parallel(groups.ep_size)
    start = groups.rank - groups.ep_rank
    expected = {
        "expert-parallel": (list(ds_groups._get_expert_parallel_group_ranks(name)), list(range(start, start + groups.ep_size))),
        "expert-data-parallel": (
            list(ds_groups._get_expert_data_parallel_group_ranks(name)),
            list(range(groups.ep_rank, groups.world_size, groups.ep_size)),
        ),
    }
    for what, (theirs, ours) in expected.items():
        if theirs != ours:
            raise RuntimeError(f"DeepSpeed's {what} group of rank {groups.rank} holds ranks {theirs}, moe_engine's {ours}")
    named = [{**group, "name": group.get("name", f"group{i}")} for i, group in enumerate(param_groups)]
    split = split_params_into_different_moe_groups_for_optimizer(named)
    return [group for group in split if group["params"]]


def initialize_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ds_config: dict[str, Any],
    num_experts: list[int] | None = None,
) -> Any:
    """deepspeed.initialize with our optimizer and scheduler; returns the engine.

    num_experts: E of each MoE layer when the experts are sharded (after `prepare_expert_parallel`):
    the engine then treats the model as having MoE layers, as it would one built of DeepSpeed's MoE class.
    """
    import deepspeed

    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        # DeepSpeed's engine broadcasts each parameter as bytes (p.view(torch.uint8)), which fails on a
        # 0-dim tensor deep inside deepspeed.initialize: say which, and what to do, first.
        raise ValueError(f"parameters {scalars} are 0-dim: DeepSpeed's engine needs every parameter to have at least "
                         "one dimension; make them shape (1,)")
    if not num_experts:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        return engine
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):
        """DeepSpeedEngine whose model has MoE layers that are not deepspeed.moe.layer.MoE modules."""

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            # Read when the ZeRO optimizer is built (MoE param groups over the EDP groups, expert
            # grad norms) and by save/load_checkpoint; DeepSpeed sets them for its own MoE class only.
            self.has_moe_layers = True
            self.num_experts = list(num_experts)

    # What deepspeed.initialize does for a plain (not pipeline, not hybrid) engine.
    config_class = DeepSpeedConfig(ds_config)
    if config_class.hybrid_engine.enabled:
        raise DeepSpeedConfigError("expert parallelism under DeepSpeed does not support its hybrid engine")
    deepspeed.set_optimizer_flags(config_class, model)
    engine = ExpertParallelEngine(
        args=None, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, config_class=config_class
    )
    engine._configure_python_gc()
    return engine

