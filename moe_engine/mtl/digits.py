"""Multi-task image classification built from scikit-learn's 8x8 digits (no download).

``sklearn.datasets.load_digits()``'s 1,797 images of 8x8 pixels with values 0..16 (read from this
package's copy of scikit-learn's file, so scikit-learn need not be installed). Every
example here is one ``(8, 12)`` float32 canvas (pixels / 16, so values lie in ``[0, 1]`` and
are exact in float32) and belongs to one of these tasks:

* ``"digit"``: which digit (10 classes). One digit at a horizontal offset drawn uniformly
  from 0..4, so the position carries no label information.
* ``"parity"``: even (0) or odd (1); drawn like ``"digit"``.
* ``"left"`` / ``"right"``: a MultiMNIST-style overlay: one digit at columns 0..7, another at
  columns 4..11, combined with a pixel-wise max; the label is the class of the left (resp.
  right) digit (10 classes). Both digits are drawn independently, so they may share a class.

The same inputs (a digit anywhere, two overlapping digits) under different labelings is
what makes the tasks related but conflicting, the regime task-conditional routing targets.

Leakage: the 1,797 *source* images are split first (:func:`split_source_indices`), and each
split's examples are drawn only from its own source images, so no test example, overlays
included, contains a train image.

Determinism: everything is drawn from ``numpy`` generators seeded by ``(seed, stream)``,
one stream for the source split and one per (task, split), so the same seed gives
bit-identical data, and a task's examples do not depend on which other tasks are requested.
"""

from __future__ import annotations

import gzip
import importlib.resources
from collections.abc import Sequence
from types import MappingProxyType

import datasets
import numpy as np

from moe_engine.mtl.tasks import CANVAS_SHAPE, MultiTaskData, TaskSpec, example_features

DIGIT_TASKS: tuple[str, ...] = ("digit", "parity", "left", "right")

_DIGIT_SIZE = 8
_MAX_OFFSET = CANVAS_SHAPE[1] - _DIGIT_SIZE  # 4: offsets 0..4 keep the digit on the canvas
_RIGHT_START = CANVAS_SHAPE[1] - _DIGIT_SIZE  # 4: the right digit of a pair covers columns 4..11
_MIN_TEST_EXAMPLES = 200  # per task: keeps test accuracy meaningful for small pairs_per_task

# name -> (num_classes, description). Read-only so the module holds no mutable state.
_TASK_INFO = MappingProxyType(
    {
        "digit": (10, "class of one digit at a random horizontal offset"),
        "parity": (2, "even (0) or odd (1) digit at a random horizontal offset"),
        "left": (10, "class of the left digit of two overlapping digits"),
        "right": (10, "class of the right digit of two overlapping digits"),
    }
)

# Stream ids of the seeded generators (see module docstring). Tasks use 1 + their position
# in DIGIT_TASKS, so adding a task at the end never changes existing data.
_SPLIT_STREAM = 0
_TRAIN, _TEST = 0, 1


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits scikit-learn ships, from this package's copy of its file (moe_engine/mtl/data,
    so scikit-learn need not be installed): (N, 8, 8) float32 in [0, 1] and (N,) int64 classes."""
    path = importlib.resources.files("moe_engine.mtl") / "data" / "digits.csv.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        rows = np.loadtxt(text, delimiter=",")  # (N, 65) float64: 64 pixels in 0..16, then the class
    images = rows[:, :-1].reshape(-1, 8, 8)
    return (images / 16.0).astype(np.float32), rows[:, -1].astype(np.int64)  # k/16 is exact in float32


def place(digits: np.ndarray, offset: int) -> np.ndarray:
    """Put 8x8 digit(s) on empty canvas(es) starting at column ``offset``.

    Args:
        digits: ``(..., 8, 8)`` array.
        offset: first column of the digit, in ``0..4``.

    Returns:
        ``(..., 8, 12)`` array of ``digits``' dtype, zero outside columns
        ``offset..offset+7``.
    """
    if not 0 <= offset <= _MAX_OFFSET:
        raise ValueError(f"offset must lie in 0..{_MAX_OFFSET}, got {offset}")
    canvas = np.zeros((*digits.shape[:-2], *CANVAS_SHAPE), dtype=digits.dtype)
    canvas[..., offset : offset + _DIGIT_SIZE] = digits
    return canvas


def overlay(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """MultiMNIST-style pair: ``left`` at columns 0..7, ``right`` at 4..11, pixel-wise max.

    Args:
        left, right: ``(..., 8, 8)`` arrays of the same shape and dtype.

    Returns:
        ``(..., 8, 12)`` array. Columns 0..3 show only ``left``, 8..11 only ``right``.
    """
    # max rather than sum keeps values in [0, 1] and mimics overlapping ink strokes.
    return np.maximum(place(left, 0), place(right, _RIGHT_START))


def split_source_indices(
    targets: np.ndarray, eval_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of source images into train and test.

    Each class sends ``round(count * eval_fraction)`` of its images to test, clamped so both
    splits keep at least one image per class (every label stays drawable in both splits).

    Args:
        targets: ``(N,)`` integer class of each source image.
        eval_fraction: share of each class that goes to test, in ``(0, 1)``.
        seed: non-negative integer.

    Returns:
        ``(train_indices, test_indices)``: sorted int64 arrays into ``targets``, disjoint,
        together covering ``0..N-1``.
    """
    _check_eval_fraction(eval_fraction)
    rng = np.random.default_rng((seed, _SPLIT_STREAM))
    train_parts, test_parts = [], []
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        if len(members) < 2:
            raise ValueError(f"class {cls} has {len(members)} image(s); a split needs >= 2")
        n_test = min(max(round(len(members) * eval_fraction), 1), len(members) - 1)
        test_parts.append(members[:n_test])
        train_parts.append(members[n_test:])
    return (
        np.sort(np.concatenate(train_parts)).astype(np.int64),
        np.sort(np.concatenate(test_parts)).astype(np.int64),
    )


def build_digits_tasks(
    tasks: Sequence[str] = DIGIT_TASKS,
    *,
    eval_fraction: float = 0.2,
    pairs_per_task: int = 3000,
    seed: int = 0,
) -> MultiTaskData:
    """Build train and test splits of the requested digit tasks (see module docstring).

    Args:
        tasks: task names from :data:`DIGIT_TASKS`, unique; ``task`` column values index
            this sequence.
        eval_fraction: share of the source images reserved for test, in ``(0, 1)``.
        pairs_per_task: train examples per task; each task gets
            ``max(200, round(pairs_per_task * eval_fraction))`` test examples.
        seed: non-negative integer; the same seed gives bit-identical data.

    Returns:
        :class:`MultiTaskData` whose splits are in-memory, torch-formatted datasets with
        ``pixels`` ``(8, 12)`` float32, ``task`` int64 and ``label`` int64, rows grouped by
        task in ``tasks`` order (shuffling is the batcher's job).

    Raises:
        ValueError: unknown or repeated task name, ``eval_fraction`` outside ``(0, 1)``,
            ``pairs_per_task < 1`` or negative ``seed``.
    """
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    tasks = tuple(tasks)
    for name in tasks:
        if name not in _TASK_INFO:
            raise ValueError(f"unknown task {name!r}; allowed: {list(DIGIT_TASKS)}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be non-empty and unique, got {list(tasks)}")
    _check_eval_fraction(eval_fraction)
    if pairs_per_task < 1:
        raise ValueError(f"pairs_per_task must be >= 1, got {pairs_per_task}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")

    images, targets = load_digit_images()
    train_idx, test_idx = split_source_indices(targets, eval_fraction, seed)
    n_test = max(_MIN_TEST_EXAMPLES, round(pairs_per_task * eval_fraction))

    # Each split sees only its own source images: this is what rules out leakage.
    train = _build_split(tasks, images[train_idx], targets[train_idx], pairs_per_task, seed, _TRAIN)
    test = _build_split(tasks, images[test_idx], targets[test_idx], n_test, seed, _TEST)

    train_labels, train_tasks = np.asarray(train["label"]), np.asarray(train["task"])
    specs = []
    for i, name in enumerate(tasks):
        num_classes, description = _TASK_INFO[name]
        counts = np.bincount(train_labels[train_tasks == i], minlength=num_classes)
        specs.append(TaskSpec(name, num_classes, float(counts.max() / counts.sum()), description))
    return MultiTaskData(
        train=datasets.Dataset.from_dict(train, features=example_features()).with_format("torch"),
        test=datasets.Dataset.from_dict(test, features=example_features()).with_format("torch"),
        tasks=tuple(specs),
    )


def _build_split(
    tasks: tuple[str, ...],
    images: np.ndarray,
    targets: np.ndarray,
    per_task: int,
    seed: int,
    split: int,
) -> dict[str, np.ndarray]:
    """Columns of one split: ``per_task`` examples of each task from these source images."""
    pixels, task_ids, labels = [], [], []
    for task_id, name in enumerate(tasks):
        rng = np.random.default_rng((seed, 1 + DIGIT_TASKS.index(name), split))
        task_pixels, task_labels = _draw_examples(name, images, targets, per_task, rng)
        pixels.append(task_pixels)
        labels.append(task_labels)
        task_ids.append(np.full(per_task, task_id, dtype=np.int64))
    return {
        "pixels": np.concatenate(pixels),
        "task": np.concatenate(task_ids),
        "label": np.concatenate(labels),
    }


def _draw_examples(
    task: str, images: np.ndarray, targets: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of ``task``: ``(n, 8, 12)`` float32 canvases and ``(n,)`` int64 labels.

    Source images are drawn uniformly with replacement from ``images`` (one split's pool).
    """
    if task in ("left", "right"):
        left = rng.integers(len(images), size=n)
        right = rng.integers(len(images), size=n)
        canvases = overlay(images[left], images[right])
        labels = targets[left] if task == "left" else targets[right]
        return canvases, labels.astype(np.int64)

    chosen = rng.integers(len(images), size=n)
    offsets = rng.integers(_MAX_OFFSET + 1, size=n)
    canvases = np.empty((n, *CANVAS_SHAPE), dtype=np.float32)
    for offset in range(_MAX_OFFSET + 1):  # 5 vectorized placements instead of n small ones
        at = offsets == offset
        canvases[at] = place(images[chosen[at]], offset)
    labels = targets[chosen] % 2 if task == "parity" else targets[chosen]
    return canvases, labels.astype(np.int64)


def _check_eval_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
