"""Saving, loading and batching multi-task data.

On-disk layout of a saved :class:`~moe_engine.mtl.tasks.MultiTaskData` folder::

    path/
        tasks.json                       list of TaskSpec dicts, in task-index order
        train.parquet  or  train.jsonl   the train split
        test.parquet   or  test.jsonl    the test split

Both files of a split hold the columns ``pixels``, ``task``, ``label`` (see
:mod:`moe_engine.mtl.tasks`). Parquet is what :func:`save_task_data` writes by default; it
keeps the ``Array2D`` feature in its metadata. JSON Lines, one object per row, is handy for
data produced by other tools, e.g.::

    {"pixels": [[0.0, 0.25, ...12 values], ...8 rows], "task": 0, "label": 7}

Each split must exist in exactly one of the two formats.

Batching: :class:`ResumableBatches` yields an endless, seeded stream of training batches that
can be checkpointed and resumed exactly; :func:`eval_batches` walks a split once, in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import torch

from moe_engine.mtl.tasks import COLUMNS, MultiTaskData, TaskSpec, example_features

_SPLITS = ("train", "test")
_TASKS_FILE = "tasks.json"
_LAYOUT = (
    "expected tasks.json plus train.parquet|train.jsonl and test.parquet|test.jsonl "
    "(see moe_engine.mtl.data's docstring)"
)
_BUILDERS = {".parquet": "parquet", ".jsonl": "json"}


def save_task_data(
    data: MultiTaskData,
    path: str | os.PathLike[str],
    *,
    file_format: Literal["parquet", "jsonl"] = "parquet",
) -> None:
    """Write ``data`` to folder ``path`` (created if needed) in the layout above.

    Existing files of the same names are overwritten; a split already saved in the *other*
    format is left alone and makes :func:`load_task_data` refuse the folder as ambiguous.
    """
    if file_format not in ("parquet", "jsonl"):
        raise ValueError(f"file_format must be 'parquet' or 'jsonl', got {file_format!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for split_name in _SPLITS:
        split: datasets.Dataset = getattr(data, split_name)
        target = folder / f"{split_name}.{file_format}"
        if file_format == "parquet":
            split.to_parquet(str(target))
        else:
            _write_jsonl(split, target)
    specs = [dataclasses.asdict(task) for task in data.tasks]
    (folder / _TASKS_FILE).write_text(json.dumps(specs, indent=2) + "\n")


def load_task_data(path: str | os.PathLike[str]) -> MultiTaskData:
    """Read a folder written by :func:`save_task_data` (or laid out as above by hand).

    Splits are loaded through ``datasets.load_dataset`` into memory, cast to the canonical
    features and torch-formatted, so ``pixels`` comes back as ``(8, 12)`` float32 tensors.

    Raises:
        FileNotFoundError: ``tasks.json`` or a split is missing; names the folder and the
            expected layout.
        ValueError: a split exists in both formats, or ``task``/``label`` values fall
            outside the tasks of ``tasks.json``.
    """
    folder = Path(path)
    tasks = read_task_specs(folder)
    splits = {name: _load_split(folder, name) for name in _SPLITS}
    for name, split in splits.items():
        _check_values(split, tasks, f"{folder}/{name}")
    return MultiTaskData(train=splits["train"], test=splits["test"], tasks=tasks)


def read_task_specs(path: str | os.PathLike[str]) -> tuple[TaskSpec, ...]:
    """The TaskSpecs of a data folder's tasks.json, in task-index order (FileNotFoundError without one)."""
    tasks_file = Path(path) / _TASKS_FILE
    if not tasks_file.is_file():
        raise FileNotFoundError(f"no {tasks_file}; {_LAYOUT}")
    return tuple(TaskSpec(**spec) for spec in json.loads(tasks_file.read_text()))


def select_tasks(data: MultiTaskData, names: Sequence[str], source: str) -> MultiTaskData:
    """The tasks `names` of `data`, in that order: only their rows, task ids renumbered 0..len(names)-1.

    ValueError naming the tasks `data` lacks (and those it has), or a task with no row in a split
    (its metrics would be a silent 0). `source` names where the data came from, for the messages.
    """
    index = {name: i for i, name in enumerate(data.task_names)}
    missing = [name for name in names if name not in index]
    if missing:
        raise ValueError(f"data.tasks = {list(names)}: {missing} not in {source} (has {list(data.task_names)})")
    new_id = np.full(len(data.tasks), -1, dtype=np.int64)
    new_id[[index[name] for name in names]] = np.arange(len(names))
    identity = list(names) == list(data.task_names)
    splits = {}
    for split_name in _SPLITS:
        split: datasets.Dataset = getattr(data, split_name)
        task_ids = new_id[split.select_columns(["task"]).with_format("numpy")[:]["task"]]
        rows = np.bincount(task_ids[task_ids >= 0], minlength=len(names))
        empty = [name for name, count in zip(names, rows) if count == 0]
        if empty:
            raise ValueError(f"{source}: task(s) {empty} have no rows in the {split_name} split")
        if not identity:
            keep = np.flatnonzero(task_ids >= 0)
            split = split.select(keep).remove_columns("task").add_column("task", task_ids[keep].tolist())
            split = split.cast(example_features()).with_format("torch")
        splits[split_name] = split
    return MultiTaskData(train=splits["train"], test=splits["test"], tasks=tuple(data.tasks[index[n]] for n in names))


class ResumableBatches:
    """Endless, deterministic, resumable stream of shuffled training batches.

    Epoch ``e`` visits the examples in the order ``torch.randperm(len(dataset))`` drawn from
    ``torch.Generator().manual_seed(seed * 1_000_003 + e)``, so the order depends only on
    ``(seed, epoch)``, never on global RNG state. Batches are consecutive slices of that
    order; the last partial batch of each epoch is dropped so every batch has the same shape.

    Each batch is a dict of the dataset's columns; for a :class:`MultiTaskData` split:
    ``pixels`` ``(B, 8, 12)`` float32, ``task`` ``(B,)`` int64, ``label`` ``(B,)`` int64.

    The columns are read once, with a single contiguous ``dataset[:]``, into tensors that
    batches index. Why: ``datasets`` gathers ``dataset[indices]`` one row at a time (plus a
    per-row decode of ``Array2D`` columns), about 20 ms for 256 rows, more than a training
    step of a small model; a tensor gather costs microseconds. The price is holding the split
    in memory, which the small multi-task sets here always fit.
    """

    def __init__(self, dataset: datasets.Dataset, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > len(dataset):
            raise ValueError(
                f"batch_size {batch_size} exceeds the dataset's {len(dataset)} examples"
            )
        self._columns = _as_tensors(dataset)
        self._num_examples = len(dataset)
        self._batch_size = batch_size
        self._seed = seed
        self._epoch = 0
        self._position = 0  # examples of the current epoch's order already returned
        self._order = self._permutation(0)

    def __iter__(self) -> ResumableBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = self._order[self._position : self._position + self._batch_size]
        batch = {name: column[indices] for name, column in self._columns.items()}
        self._position += self._batch_size
        # Roll over eagerly, so that `epoch` and `state_dict()` always describe the next
        # batch, and a state saved at the end of an epoch reads (epoch + 1, 0).
        if self._position + self._batch_size > self._num_examples:
            self._start_epoch(self._epoch + 1)
        return batch

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from (0-based)."""
        return self._epoch

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: ``{"epoch", "position", "seed", "batch_size"}``.

        ``position`` counts the examples of the current epoch's order already returned.
        """
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "batch_size": self._batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where the iterator that produced ``state`` stopped.

        Raises:
            ValueError: ``state``'s seed or batch_size differs from this iterator's (a
                different stream, not a resumption), or its epoch/position are invalid.
        """
        for key in ("seed", "batch_size"):
            mine = getattr(self, f"_{key}")
            if state[key] != mine:
                raise ValueError(
                    f"state has {key}={state[key]}, but this iterator has {key}={mine}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        last_start = self._num_examples - self._batch_size
        if epoch < 0 or not 0 <= position <= last_start or position % self._batch_size:
            raise ValueError(
                f"invalid state epoch={epoch}, position={position} for {self._num_examples} "
                f"examples in batches of {self._batch_size}"
            )
        self._start_epoch(epoch)
        self._position = position

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._position = 0
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
        return torch.randperm(self._num_examples, generator=generator)


def eval_batches(dataset: datasets.Dataset, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The whole split once, in order, in batches of ``batch_size`` (the last may be smaller).

    Batches are contiguous ``dataset[start:stop]`` slices, which ``datasets`` serves quickly;
    shapes are as for :class:`ResumableBatches` with ``B <= batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = _torch_formatted(dataset)

    # Validated above, eagerly; the generator below only runs on iteration.
    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(dataset), batch_size):
            yield dict(dataset[start : start + batch_size])

    return batches()


def _torch_formatted(dataset: datasets.Dataset) -> datasets.Dataset:
    return dataset if dataset.format["type"] == "torch" else dataset.with_format("torch")


def _as_tensors(dataset: datasets.Dataset) -> dict[str, torch.Tensor]:
    """All columns of ``dataset`` as tensors with one row per example."""
    columns = dict(_torch_formatted(dataset)[:])
    for name, column in columns.items():
        if not isinstance(column, torch.Tensor):
            raise ValueError(f"column {name!r} is not numeric (got {type(column).__name__})")
    return columns


def _write_jsonl(split: datasets.Dataset, target: Path) -> None:
    """One JSON object per row, ``pixels`` as nested lists.

    Hand-written because ``Dataset.to_json`` (datasets 5.2) mangles ``Array2D`` columns:
    it writes a single float per row and extra rows. Python floats print the float32 values
    exactly (shortest round-trip repr of the same double), so reloading is bit-exact.
    """
    columns = split.with_format("numpy")[:]
    with target.open("w") as out:
        for pixels, task, label in zip(columns["pixels"], columns["task"], columns["label"]):
            row = {"pixels": pixels.tolist(), "task": int(task), "label": int(label)}
            out.write(json.dumps(row) + "\n")


def _load_split(folder: Path, split: str) -> datasets.Dataset:
    candidates = [folder / f"{split}{suffix}" for suffix in _BUILDERS]
    present = [file for file in candidates if file.is_file()]
    if not present:
        raise FileNotFoundError(f"no {split} split in {folder}; {_LAYOUT}")
    if len(present) > 1:
        raise ValueError(f"{split} split is ambiguous, both exist: {[str(f) for f in present]}")
    file = present[0]
    # load_dataset always prepares an Arrow copy in a cache; a throwaway cache plus
    # keep_in_memory leaves neither ~/.cache nor the data folder touched.
    with tempfile.TemporaryDirectory(prefix="moe_engine_load_") as cache_dir:
        loaded = datasets.load_dataset(
            _BUILDERS[file.suffix],
            data_files={split: str(file)},
            split=split,
            features=example_features(),
            cache_dir=cache_dir,
            keep_in_memory=True,
        )
    missing = [c for c in COLUMNS if c not in loaded.column_names]
    if missing:
        raise ValueError(f"{file} lacks column(s) {missing}")
    return loaded.with_format("torch")


def _check_values(split: datasets.Dataset, tasks: tuple[TaskSpec, ...], where: str) -> None:
    """Reject rows whose task index or label does not fit ``tasks`` (cheap, vectorized)."""
    # A contiguous [:] slice of just these columns: `split["task"]` is a lazy Column in
    # datasets >= 4 and converting it to an array would decode row by row.
    columns = split.select_columns(["task", "label"]).with_format("numpy")[:]
    task_ids, labels = columns["task"], columns["label"]
    if len(task_ids) and not (0 <= task_ids.min() and task_ids.max() < len(tasks)):
        row = int(np.flatnonzero((task_ids < 0) | (task_ids >= len(tasks)))[0])
        raise ValueError(
            f"{where}: row {row} has task index {int(task_ids[row])}; allowed: 0..{len(tasks) - 1} "
            f"({', '.join(task.name for task in tasks)})"
        )
    limits = np.array([task.num_classes for task in tasks])
    bad = (labels < 0) | (labels >= limits[task_ids])
    if len(labels) and bad.any():
        row = int(np.flatnonzero(bad)[0])
        task = tasks[int(task_ids[row])]
        raise ValueError(
            f"{where}: row {row} has label {int(labels[row])} for task {task.name!r}; allowed: 0..{task.num_classes - 1}"
        )
