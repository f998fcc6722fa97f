"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one file `step_XXXXXXXX.pt` in `<out_dir>/checkpoints/`, written atomically
(temporary file, then rename) so a job killed mid-save never leaves a torn checkpoint behind.
It holds the model, optimizer and scheduler states, every RNG state, the data position, the
step and the config it was made with. Loading compares the config's structural fields with
the current config first and refuses a mismatch by name, before any state is touched.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")

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
)


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the current config; the message lists each difference."""


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: Python's, torch's CPU generator and each CUDA device's."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: checkpoint has X, config has Y' for each structural field that differs."""
    return [
        f"{name}: checkpoint has {_lookup(saved, name)!r}, config has {_lookup(current, name)!r}"
        for name in STRUCTURAL_FIELDS
        if _lookup(saved, name) != _lookup(current, name)
    ]


class CheckpointManager:
    """Saves, lists, prunes and loads the step checkpoints of one run directory."""

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def list(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` as the checkpoint of `step`, atomically, then drop the oldest beyond `keep`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp)
        os.replace(tmp, path)
        for old in self.list()[: -self.keep]:
            old.unlink()
        return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest one in a run directory or its checkpoints/ folder."""
    path = Path(path)
    if path.is_file():
        return path
    for directory in (path / "checkpoints", path):
        latest = CheckpointManager(directory, keep=1).latest()
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint at {str(path)!r}: expected a step_XXXXXXXX.pt file or a run directory holding them")


def load_checkpoint(path: str | Path, current_config: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint (on CPU) and check it against `current_config` before returning it."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path}: checkpoint format {state.get('format_version')!r}, this moe_engine reads {FORMAT_VERSION}"
        )
    problems = config_mismatches(state["config"], current_config)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the config:\n  " + "\n  ".join(problems)
        )
    return state
