"""Training checkpoints: everything a run needs to continue exactly where it stopped.

Checkpoints live in `<out_dir>/checkpoints/`, one per saved step, in one of two layouts:

- `step_XXXXXXXX.pt`, one file: runs whose every rank holds all experts (single process, data
  parallel, EP = 1). Rank 0 writes it.
- `step_XXXXXXXX/`, a folder, for expert-parallel runs (EP > 1): `model.pt` (rank 0) holds the
  replicated parameters and their optimizer state, and `experts_ep{r}_of_{P}.pt` holds EP rank r's
  experts (with their global ids) and their optimizer state, written by that rank of the first
  expert-data-parallel replica. Nothing is gathered; a rank that loads reads only the shards that
  hold its experts, at any EP size (see moe_engine.parallel.sharding). The folder must be on a
  filesystem every writing rank shares.

Either is written atomically (a temporary file or folder, then a rename), so a job killed mid-save
never leaves a torn checkpoint behind. Besides the model and optimizer, a checkpoint holds the
scheduler state, every rank's RNG states, the data position, the step and the config it was made with.
Loading compares the config's structural fields with the current config first and refuses a
mismatch by name, before any state is touched. Both layouts load at every EP size.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
# The files of a per-shard checkpoint folder.
MODEL_FILE = "model.pt"
EXPERT_SHARD_FILE = "experts_ep{ep_rank}_of_{ep_size}.pt"

# Config fields that shape the parameters or their meaning: a checkpoint must agree on all of them.
STRUCTURAL_FIELDS = (
    "model.d_model",
    "model.num_layers",
    "model.num_heads",
    "model.ffn_hidden",
    "model.moe_every",
    "model.patch_size",
    "moe.num_experts",
    "moe.ffn_hidden",
    "moe.activation",
    "moe.num_shared_experts",
    "moe.shared_expert_gate",
    "moe.router.type",
    "moe.router.top_k",
    "data.tasks",
    # The loss weighting's own state (DWA's loss history, UW's variances, ...) is the method's.
    "mtl.weighting",
)
# What a field missing from an older checkpoint's config meant: before loss weighting, "equal".
_OLDER_DEFAULTS = {"mtl.weighting": "equal"}


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the current config; the message lists each difference."""


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: Python's, torch's CPU generator and, with CUDA, the
    current device's (a launched rank's own GPU; see moe_engine.parallel.runtime.bind_local_device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], torch.Tensor):
            torch.cuda.set_rng_state(state["cuda"])
        else:  # files written before one state per rank: every device's, in a list
            torch.cuda.set_rng_state_all(state["cuda"])


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """config["a"]["b"] for dotted = "a.b" in a saved config's dict; "<missing>" where a part is absent."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: checkpoint has X, config has Y' for each structural field that differs."""
    problems = []
    for name in STRUCTURAL_FIELDS:
        had, has = config_value(saved, name), config_value(current, name)
        if had == "<missing>":
            had = _OLDER_DEFAULTS.get(name, had)
        if had != has:
            problems.append(f"{name}: checkpoint has {had!r}, config has {has!r}")
    return problems


def checkpoint_task_order(state: dict[str, Any]) -> list[str]:
    """The tasks a checkpoint's per-task parameters (heads, prompts) belong to, in their order.

    Its "task_names" entry; a file written before that entry: data.tasks, except for the multi-task
    classifier trained from data.path, which then built a head for every task of the folder's
    tasks.json, in that file's order (read again from there; CheckpointMismatchError if it cannot be).
    """
    names = state.get("task_names")
    if names is not None:
        return list(names)
    config = state["config"]
    data = config.get("data", {})
    if data.get("path") and config.get("model", {}).get("architecture", "multitask") == "multitask":
        from moe_engine.mtl.data import read_task_specs  # the data folder's layout lives there

        try:
            return [spec.name for spec in read_task_specs(data["path"])]
        except (OSError, ValueError, TypeError) as err:
            raise CheckpointMismatchError(
                f"this checkpoint has no task names and was trained from data.path = {data['path']!r}, whose task "
                f"heads follow its tasks.json; it cannot be read ({type(err).__name__}: {err})"
            ) from err
    return list(data.get("tasks", []))


def expert_shard_file(ep_rank: int, ep_size: int) -> str:
    """The name of EP rank `ep_rank`'s expert shard in a checkpoint folder written at EP size `ep_size`."""
    return EXPERT_SHARD_FILE.format(ep_rank=ep_rank, ep_size=ep_size)


def expert_shard_size(folder: str | Path) -> int:
    """The EP size P a checkpoint folder's expert shards were written at (its experts_ep{r}_of_{P}.pt
    files), 1 when it holds none. Several sizes in one folder raise CheckpointMismatchError."""
    pattern = re.escape(EXPERT_SHARD_FILE).replace(r"\{ep_rank\}", r"\d+").replace(r"\{ep_size\}", r"(\d+)")
    sizes = {int(m.group(1)) for f in Path(folder).iterdir() if (m := re.fullmatch(pattern, f.name))}
    if len(sizes) > 1:
        raise CheckpointMismatchError(f"checkpoint {folder} holds expert shards of several expert-parallel sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def write_checkpoint_file(path: Path, step: int, contents: dict[str, Any]) -> None:
    """torch.save `contents` with the format version and step, atomically (a temporary name, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"format_version": FORMAT_VERSION, "step": step, **contents}, tmp)
    os.replace(tmp, path)


def _is_checkpoint(path: Path) -> bool:
    """A step_XXXXXXXX.pt file, or a step_XXXXXXXX folder holding model.pt (not DeepSpeed's folders)."""
    match = _NAME.match(path.name)
    if match is None:
        return False
    return path.is_file() if match.group(2) else (path / MODEL_FILE).is_file()


class CheckpointManager:
    """Saves, lists, prunes and loads the step checkpoints of one run directory."""

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def sharded_path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}"

    def list(self) -> list[Path]:
        """Checkpoints (files and per-shard folders), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if _is_checkpoint(p)), key=lambda p: p.name.removesuffix(".pt"))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` as the checkpoint of `step`, atomically, then drop the oldest beyond `keep`."""
        path = self.path_for(step)
        write_checkpoint_file(path, step, state)
        self._prune()
        return path

    def save_sharded(
        self, step: int, files: dict[str, dict[str, Any]], *, is_main: bool, barrier: Callable[[], None]
    ) -> Path:
        """Write the checkpoint of `step` as a folder whose files several ranks write; every rank calls this.

        files: {file name: contents} this rank writes ({} for none; the main rank's include
        model.pt). barrier: waits for every rank (a collective). The folder appears under its final
        name only once every file is complete; then the oldest checkpoints beyond `keep` go.
        """
        path = self.sharded_path_for(step)
        tmp = self.directory / f".{path.name}.tmp"
        if is_main:
            for stale in self.directory.glob(".step_*.tmp"):  # left by a job killed mid-save
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        barrier()
        for name, contents in files.items():
            torch.save({"format_version": FORMAT_VERSION, "step": step, **contents}, tmp / name)
        barrier()
        if is_main:
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
            self._prune()
        barrier()  # the folder exists for everyone once this returns
        return path

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint (file or per-shard folder), or the newest one in a run directory or its checkpoints/ folder."""
    path = Path(path)
    if path.is_file() or (path / MODEL_FILE).is_file():
        return path
    for directory in (path / "checkpoints", path):
        latest = CheckpointManager(directory, keep=1).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"no checkpoint at {str(path)!r}: expected a step_XXXXXXXX.pt file, a step_XXXXXXXX folder holding "
        f"{MODEL_FILE}, or a run directory holding them"
    )


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    # mmap only where every tensor read is copied out (shards): a live state backed by a file that
    # pruning later deletes would fault on network filesystems.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # not a torch file, truncated, or foreign objects
        raise CheckpointMismatchError(
            f"{path}: not a moe_engine checkpoint (torch.load(weights_only=True) cannot read it: {type(err).__name__})"
        ) from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        state = state if isinstance(state, dict) else {}
        raise CheckpointMismatchError(
            f"{path}: checkpoint format {state.get('format_version')!r}, this moe_engine reads {FORMAT_VERSION}"
        )
    return state


def load_checkpoint(path: str | Path, current_config: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint (on CPU) and check it against `current_config` before returning it.

    A per-shard folder gives its model.pt, whose "expert_shards" entry says where the expert
    shards are ({"directory", "ep_size", "num_experts"}); `read_expert_shard` reads one.
    """
    path = Path(path)
    sharded = path.is_dir()
    state = _read(path / MODEL_FILE if sharded else path)
    problems = config_mismatches(state["config"], current_config)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the config:\n  " + "\n  ".join(problems)
        )
    if sharded:
        state["expert_shards"] = {**state["expert_shards"], "directory": str(path)}
    return state


def read_expert_shard(directory: str | Path, ep_rank: int, ep_size: int, step: int | None = None) -> dict[str, Any]:
    """The expert shard written by EP rank `ep_rank` of `ep_size` into a checkpoint folder.

    Memory-mapped: a rank reads only the rows it takes; copy what you keep."""
    path = Path(directory) / expert_shard_file(ep_rank, ep_size)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory} lacks {path.name}, the experts of expert-parallel rank {ep_rank} of {ep_size}"
        )
    shard = _read(path, mmap=True)
    if (shard["ep_rank"], shard["ep_size"]) != (ep_rank, ep_size) or (step is not None and shard["step"] != step):
        raise CheckpointMismatchError(
            f"{path} holds rank {shard['ep_rank']} of {shard['ep_size']} at step {shard['step']}, "
            f"expected rank {ep_rank} of {ep_size}" + (f" at step {step}" if step is not None else "")
        )
    return shard


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model's state (every expert tensor (E, ...)) from a checkpoint of either layout,
    without building a model: for export, inspection and comparisons."""
    path = resolve_checkpoint(path)
    if not path.is_dir():
        return _read(path)["model"]
    state = _read(path / MODEL_FILE)
    meta = state["expert_shards"]
    shards = [read_expert_shard(path, r, meta["ep_size"], state["step"]) for r in range(meta["ep_size"])]
    model = dict(state["model"])
    for name in meta["num_experts"]:
        rows = sorted(
            ((expert, shard["model"][name][i]) for shard in shards for i, expert in enumerate(shard["expert_ids"][name])),
            key=lambda pair: pair[0],
        )
        model[name] = torch.stack([row for _, row in rows])
    return model


def read_checkpoint_entries(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Top-level entries (e.g. "config", "tasks") of a checkpoint of either layout; absent keys are left out."""
    path = resolve_checkpoint(path)
    state = _read(path / MODEL_FILE if path.is_dir() else path)
    return {key: state[key] for key in keys if key in state}
