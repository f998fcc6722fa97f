"""DeepSpeed checkpoints of expert-parallel runs: DeepSpeed's own files plus one expert shard per EP rank.

A tag folder `<checkpoints>/step_XXXXXXXX/` holds what `engine.save_checkpoint` writes (the module
file and every rank's ZeRO partitions, the expert optimizer state included) and, with expert
parallelism (P > 1), `experts_ep{r}_of_{P}.pt` for each EP rank r (moe_engine.checkpoint's shard
format, parameters only): DeepSpeed's module file holds EP rank 0's experts only, since it saves
rank 0's module. Loading runs DeepSpeed's load and then puts each rank's own experts back from its
shard file, so the parameters agree with the fp32 master copies in ZeRO's partitions again.

Such a checkpoint resumes at the same expert-parallel size only: ZeRO's partitions of the expert
optimizer state cannot be resharded to another one, and `load_deepspeed_checkpoint` says so by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from torch import nn

from moe_engine.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    expert_shard_file,
    expert_shard_size,
    read_expert_shard,
    write_checkpoint_file,
)
from moe_engine.parallel.groups import ParallelGroups
from moe_engine.parallel.sharding import expert_shard_state


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag DeepSpeed's `latest` file names in a checkpoint directory, or None."""
    latest = checkpoint_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def _ep_size(groups: ParallelGroups | None) -> int:
    return groups.ep_size if groups is not None else 1


def save_deepspeed_checkpoint(
    engine: Any, model: nn.Module, groups: ParallelGroups | None, checkpoints: CheckpointManager, step: int,
    client_state: dict[str, Any], is_main: bool, barrier: Callable[[], None],
) -> Path:
    """Every rank calls it. Writes the tag folder `checkpoints.sharded_path_for(step)` (step_XXXXXXXX/)
    and returns it once it is complete.

    With P > 1 each rank of the first expert-data-parallel replica (ranks 0..P-1) writes its experts
    into the tag folder first: DeepSpeed's save names the tag in `latest` only after its barriers,
    so `latest` never points at a folder without its expert shards. Rank 0 then keeps the newest
    `checkpoints.keep` tag folders.
    """
    folder = checkpoints.sharded_path_for(step)
    if _ep_size(groups) > 1 and groups.rank < groups.ep_size:
        shard = expert_shard_state(model, None, groups.ep_rank, groups.ep_size)
        write_checkpoint_file(folder / expert_shard_file(groups.ep_rank, groups.ep_size), step, shard)
    engine.save_checkpoint(str(checkpoints.directory), tag=folder.name, client_state=client_state)
    if is_main:
        tags = sorted(p for p in checkpoints.directory.glob("step_*") if p.is_dir())
        for old in tags[:-checkpoints.keep]:
            shutil.rmtree(old)
    barrier()
    return folder


def load_deepspeed_checkpoint(engine: Any, model: nn.Module, groups: ParallelGroups | None, path: Path) -> dict[str, Any]:
    """DeepSpeed's load of tag folder `path`, then (P > 1) this rank's experts from its shard file.

    Returns the client state saved with it. Raises CheckpointMismatchError, naming both sizes, when
    the checkpoint was written at another expert-parallel size, and naming the tensors when DeepSpeed's
    files or the expert shard do not fit `model`.
    """
    ep_size = _ep_size(groups)
    saved_ep = expert_shard_size(path)
    if saved_ep != ep_size:
        raise CheckpointMismatchError(
            f"DeepSpeed checkpoint {path} was written at parallel.expert_parallel_size = {saved_ep}, this run has "
            f"{ep_size}: ZeRO's partitions of the expert optimizer state cannot be resharded to another "
            f"expert-parallel size under DeepSpeed; resume with parallel.expert_parallel_size = {saved_ep}"
        )
    try:
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointMismatchError(f"DeepSpeed checkpoint {path} does not fit this model: {err}") from err
    if client is None:
        raise CheckpointMismatchError(f"DeepSpeed checkpoint {path}: DeepSpeed could not read it (see its log above)")
    if ep_size > 1:
        shard = read_expert_shard(path, groups.ep_rank, groups.ep_size, client["step"])
        expected = {n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False}
        if set(shard["model"]) != expected:
            raise CheckpointMismatchError(
                f"{path}: its expert shard holds {sorted(shard['model'])}, this model's experts are {sorted(expected)}"
            )
        try:
            model.load_state_dict({k: v.clone() for k, v in shard["model"].items()}, strict=False)
        except RuntimeError as err:
            raise CheckpointMismatchError(f"{path}: the expert shard does not fit this model: {err}") from err
    return client
