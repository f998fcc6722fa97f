"""Mixing the tasks' training splits into batches, and walking a test split.

A training batch is ``dict[str, dict[str, Any]]``: task name -> sub-batch with

* ``image``: ``(B_t, 8, 12)`` float32 tensor, or ``text``: ``list[str]`` of length ``B_t``;
* ``label``: ``(B_t,)`` int64 tensor, or ``value``: ``(B_t,)`` float32 tensor.

Only tasks with ``B_t > 0`` appear (every task, with ``every_task=True``), in the order of ``task_names``.

Task probabilities (:func:`task_probabilities`): ``"fixed"`` weights, ``"size"``
(proportional to the number of training examples) or ``"temperature"`` sampling,
``p_t ∝ n_t^(1/T)``, as in multilingual MT and T5 (Arivazhagan et al. 2019; Raffel et al.
2020): ``T = 1`` is size-proportional, ``T -> inf`` uniform, so ``T > 1`` up-samples small tasks.
"""

from __future__ import annotations

import copy
import math
import numbers
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import datasets
import numpy as np
import torch

from moe_engine.mtl.generalist.tasks import IMAGE_SHAPE

MIXING_STRATEGIES: tuple[str, ...] = ("fixed", "size", "temperature")
BATCHING_MODES: tuple[str, ...] = ("mixed", "per_task")


def task_probabilities(
    sizes: Mapping[str, int],
    strategy: Literal["fixed", "size", "temperature"],
    weights: Mapping[str, float] | None = None,
    temperature: float = 2.0,
) -> dict[str, float]:
    """Sampling probability of each task.

    Args:
        sizes: task name -> number of training examples (``>= 0``).
        strategy: ``"fixed"``: ``p_t ∝ weights[t]``; ``"size"``: ``p_t ∝ n_t``;
            ``"temperature"``: ``p_t ∝ n_t^(1/temperature)``.
        weights: task name -> non-negative weight, for every task of ``sizes`` and no
            other; only with ``"fixed"``. A task with 0 examples needs weight 0.
        temperature: ``> 0``, finite; only read by ``"temperature"``.

    Returns:
        task name -> probability, in ``sizes``' order, summing to 1.

    Raises:
        ValueError: unknown strategy, no tasks, negative or non-integer sizes, missing,
            extra, negative or all-zero weights, weights with a strategy that ignores them,
            ``temperature <= 0``, or a positive probability for a task with no examples.
    """
    if strategy not in MIXING_STRATEGIES:
        raise ValueError(f"unknown mixing strategy {strategy!r}; allowed: {list(MIXING_STRATEGIES)}")
    if not sizes:
        raise ValueError("sizes must name at least one task")
    for name, size in sizes.items():
        if isinstance(size, bool) or int(size) != size or size < 0:
            raise ValueError(f"size of task {name!r} must be a non-negative integer, got {size!r}")
    if strategy != "fixed" and weights is not None:
        raise ValueError(f"weights are only used by strategy 'fixed', got them with {strategy!r}")

    if strategy == "fixed":
        if weights is None:
            raise ValueError(f"strategy 'fixed' needs weights for tasks {list(sizes)}")
        missing = [name for name in sizes if name not in weights]
        extra = [name for name in weights if name not in sizes]
        if missing or extra:
            raise ValueError(
                f"weights must name exactly the tasks {list(sizes)}: missing {missing}, unknown {extra}"
            )
        for name in sizes:
            w = weights[name]
            if not (_is_real(w) and math.isfinite(w) and w >= 0):
                raise ValueError(f"weight of task {name!r} must be finite and >= 0, got {w!r}")
        raw = {name: float(weights[name]) for name in sizes}
    elif strategy == "size":
        raw = {name: float(size) for name, size in sizes.items()}
    else:
        if not (_is_real(temperature) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        raw = {name: float(size) ** (1.0 / float(temperature)) for name, size in sizes.items()}

    total = math.fsum(raw.values())
    if total <= 0:
        raise ValueError(f"strategy {strategy!r} gives every task weight 0 (sizes {dict(sizes)})")
    empty = [name for name in sizes if sizes[name] == 0 and raw[name] > 0]
    if empty:
        raise ValueError(f"task(s) {empty} have no training examples but a positive weight")
    return {name: value / total for name, value in raw.items()}


class MixedBatches:
    """Endless, deterministic, resumable stream of multi-task training batches.

    ``batching="mixed"``: each of the ``batch_size`` examples draws its task from
    ``probabilities``, so a task's share varies from step to step. ``"per_task"``: each step
    draws one task and the whole batch comes from it.

    Within a task, examples come without replacement from a permutation that depends only on
    ``(seed, task name, task epoch)``; after a task's last example the next epoch's
    permutation starts (so one batch may span two epochs, and holds duplicates only when a
    task has fewer examples than it needs). Task draws come from one ``numpy`` generator
    whose state, with every task's epoch and position, is in :meth:`state_dict`.

    The splits' columns are read once into tensors (text into a list) that batches index:
    ``datasets`` gathers ``dataset[indices]`` row by row (milliseconds per batch), a tensor
    gather costs microseconds. The price is holding the training splits in memory.

    Args:
        train: task name -> train split with ``image`` or ``text`` and ``label`` or ``value``
            (see :mod:`moe_engine.mtl.generalist.tasks`); may hold more tasks than used.
        task_names: the tasks to draw from, in the order batches list them.
        batch_size: examples per batch, ``>= 1``.
        probabilities: task name -> probability for every task of ``task_names``;
            non-negative, normalised here. A task with probability 0 is never drawn (and
            its split may be empty).
        batching: ``"mixed"`` or ``"per_task"``.
        seed: non-negative integer.
        every_task: list every task of ``task_names`` in every batch, with a zero-row sub-batch
            for a task not drawn this step (the draws and the rows drawn do not change). A model
            then builds the same graph every step and on every rank of a data-parallel split,
            which DeepSpeed's ZeRO needs: it reduces gradients in buckets filled in the order
            they become ready, and a parameter that one rank's graph misses shifts them.
    """

    def __init__(
        self,
        train: Mapping[str, datasets.Dataset],
        task_names: Sequence[str],
        batch_size: int,
        probabilities: Mapping[str, float],
        *,
        batching: Literal["mixed", "per_task"] = "mixed",
        seed: int = 0,
        every_task: bool = False,
    ) -> None:
        if isinstance(task_names, str):
            raise TypeError(f"task_names must be a sequence of names, not the string {task_names!r}")
        names = tuple(task_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"task_names must be non-empty and unique, got {list(names)}")
        missing = [name for name in names if name not in train]
        if missing:
            raise ValueError(f"no train split for task(s) {missing}; splits exist for {list(train)}")
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {list(BATCHING_MODES)}, got {batching!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._names = names
        self._probs_T = _checked_probabilities(probabilities, names)
        self._columns = [_read_columns(train[name], name) for name in names]
        self._sizes_T = np.array([_num_rows(c) for c in self._columns], dtype=np.int64)
        empty = [n for n, size, p in zip(names, self._sizes_T, self._probs_T) if size == 0 and p > 0]
        if empty:
            raise ValueError(f"task(s) {empty} have an empty train split but a positive probability")
        self._batch_size = int(batch_size)
        self._batching = batching
        self._seed = int(seed)
        if not isinstance(every_task, bool):
            raise TypeError(f"every_task must be True or False, got {every_task!r}")
        self._every_task = every_task
        self._rng = np.random.default_rng((self._seed, 0))
        self._epochs_T = np.zeros(len(names), dtype=np.int64)
        self._positions_T = np.zeros(len(names), dtype=np.int64)
        self._orders = [self._permutation(t, 0) for t in range(len(names))]

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> dict[str, dict[str, Any]]:
        num_tasks = len(self._names)
        if self._batching == "mixed":
            tasks_B = self._rng.choice(num_tasks, size=self._batch_size, p=self._probs_T)
            counts_T = np.bincount(tasks_B, minlength=num_tasks)
        else:
            counts_T = np.zeros(num_tasks, dtype=np.int64)
            counts_T[self._rng.choice(num_tasks, p=self._probs_T)] = self._batch_size
        batch = {}
        for t in range(num_tasks) if self._every_task else np.flatnonzero(counts_T):
            rows = self._take(int(t), int(counts_T[t])) if counts_T[t] else np.empty(0, dtype=np.int64)
            batch[self._names[t]] = _gather(self._columns[t], rows)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: configuration, task-draw generator state, and per task
        the epoch and the position (examples of that epoch's permutation already used).

        Plain Python values (the generator state holds 128-bit ints), safe for
        ``torch.save`` and JSON.
        """
        return {
            "task_names": list(self._names),
            "sizes": self._sizes_T.tolist(),
            "probabilities": self._probs_T.tolist(),
            "batch_size": self._batch_size,
            "batching": self._batching,
            "seed": self._seed,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
            "epochs": self._epochs_T.tolist(),
            "positions": self._positions_T.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the iterator that produced ``state`` stopped.

        Raises:
            ValueError: ``state`` comes from a different stream (other tasks, sizes,
                probabilities, batch size, batching or seed) or holds invalid positions.
        """
        mine = self.state_dict()
        for key in ("task_names", "sizes", "probabilities", "batch_size", "batching", "seed"):
            theirs = list(state[key]) if isinstance(mine[key], list) else state[key]
            if theirs != mine[key]:
                raise ValueError(
                    f"state has {key}={state[key]!r} but this iterator has {key}={mine[key]!r}; "
                    "a state resumes only the same stream"
                )
        epochs_T = np.asarray(state["epochs"], dtype=np.int64)
        positions_T = np.asarray(state["positions"], dtype=np.int64)
        bad = (epochs_T < 0) | (positions_T < 0) | (positions_T > self._sizes_T)
        if epochs_T.shape != self._sizes_T.shape or positions_T.shape != self._sizes_T.shape or bad.any():
            raise ValueError(
                f"invalid epochs {state['epochs']} / positions {state['positions']} "
                f"for task sizes {self._sizes_T.tolist()}"
            )
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._epochs_T, self._positions_T = epochs_T, positions_T
        self._orders = [self._permutation(t, int(e)) for t, e in enumerate(epochs_T)]

    def _take(self, t: int, count: int) -> np.ndarray:
        """The next ``count`` row indices of task ``t``, crossing into new epochs as needed."""
        parts = []
        while count > 0:
            if self._positions_T[t] == self._sizes_T[t]:
                self._epochs_T[t] += 1
                self._positions_T[t] = 0
                self._orders[t] = self._permutation(t, int(self._epochs_T[t]))
            start = int(self._positions_T[t])
            stop = min(start + count, int(self._sizes_T[t]))
            parts.append(self._orders[t][start:stop])
            self._positions_T[t] = stop
            count -= stop - start
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _permutation(self, t: int, epoch: int) -> np.ndarray:
        # Keyed by the task's *name* (crc32 is stable across runs, unlike hash()), so a task's
        # order does not change when other tasks are added or reordered.
        key = zlib.crc32(self._names[t].encode())
        return np.random.default_rng((self._seed, 1, key, epoch)).permutation(int(self._sizes_T[t]))


def eval_batches(dataset: datasets.Dataset, batch_size: int) -> Iterator[dict[str, Any]]:
    """One task's split once, in order, as sub-batches of ``batch_size`` rows (last may be
    smaller; none for an empty split). Sub-batch format as in the module docstring."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    columns = _read_columns(dataset, "eval split")
    num_rows = _num_rows(columns)

    # Validated and read above, eagerly; the generator below only runs on iteration.
    def batches() -> Iterator[dict[str, Any]]:
        for start in range(0, num_rows, batch_size):
            yield {name: column[start : start + batch_size] for name, column in columns.items()}

    return batches()


def slice_for_rank(sub_batch: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Rows ``rank::world_size`` of every column of a sub-batch (tensors and lists alike).

    Ranks get interleaved rows, so their sizes differ by at most one; a rank may get 0 rows.

    Raises:
        ValueError: ``world_size < 1`` or ``rank`` outside ``0..world_size-1``.
        TypeError: a column that is neither a tensor nor a list.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    out = {}
    for name, column in sub_batch.items():
        if not isinstance(column, (torch.Tensor, list)):
            raise TypeError(f"column {name!r} is a {type(column).__name__}, expected a tensor or list")
        out[name] = column[rank::world_size]
    return out


def _is_real(x: object) -> bool:
    """A real number (numpy scalars included) but not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _checked_probabilities(probabilities: Mapping[str, float], names: tuple[str, ...]) -> np.ndarray:
    missing = [name for name in names if name not in probabilities]
    extra = [name for name in probabilities if name not in names]
    if missing or extra:
        raise ValueError(
            f"probabilities must name exactly the tasks {list(names)}: missing {missing}, unknown {extra}"
        )
    probs_T = np.array([probabilities[name] for name in names], dtype=np.float64)
    if not np.isfinite(probs_T).all() or (probs_T < 0).any() or probs_T.sum() <= 0:
        raise ValueError(f"probabilities must be finite, >= 0 and not all 0, got {dict(probabilities)}")
    return probs_T / probs_T.sum()


def _read_columns(dataset: datasets.Dataset, where: str) -> dict[str, Any]:
    """The input and label columns of a split: tensors of the batch dtypes, text as a list.

    Keys come in batch order: input column first.
    """
    names = set(dataset.column_names)
    inputs = [c for c in ("image", "text") if c in names]
    labels = [c for c in ("label", "value") if c in names]
    if len(inputs) != 1 or len(labels) != 1:
        raise ValueError(
            f"{where}: needs exactly one of columns 'image'/'text' and one of 'label'/'value', "
            f"has {dataset.column_names}"
        )
    input_name, label_name = inputs[0], labels[0]
    # One contiguous slice per column; with the numpy format Array2D decodes in one go.
    raw = dataset.select_columns([input_name, label_name]).with_format("numpy")[:]
    columns: dict[str, Any] = {}
    if input_name == "image":
        pixels = np.asarray(raw["image"], dtype=np.float32)
        if len(dataset) == 0:
            pixels = pixels.reshape(0, *IMAGE_SHAPE)
        if pixels.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"{where}: images have shape {pixels.shape[1:]}, expected {IMAGE_SHAPE}")
        columns["image"] = torch.from_numpy(np.ascontiguousarray(pixels))
    else:
        columns["text"] = [str(text) for text in raw["text"]]
    dtype = torch.int64 if label_name == "label" else torch.float32
    columns[label_name] = torch.as_tensor(np.asarray(raw[label_name])).to(dtype).reshape(-1)
    return columns


def _num_rows(columns: Mapping[str, Any]) -> int:
    return len(next(iter(columns.values())))


def _gather(columns: Mapping[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """Rows ``rows`` of every column: tensor indexing, or a list comprehension for text."""
    index = torch.from_numpy(rows)
    return {
        name: [column[i] for i in rows.tolist()] if isinstance(column, list) else column[index]
        for name, column in columns.items()
    }
