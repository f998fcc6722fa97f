"""Embedded generalist tasks built from scikit-learn's 8x8 digits and generated strings.

No download: images are ``sklearn.datasets.load_digits()``'s (moe_engine.mtl.digits.load_digit_images; 1,797 images, values
0..16, scaled to ``[0, 1]`` exactly in float32), texts are generated here. The tasks:

==================  ========  ===============  ====================================================
task                input     kind             what
==================  ========  ===============  ====================================================
``"digit"``         image     classification   one digit at a random offset -> ``"zero"``..``"nine"``
``"caption"``       image     retrieval        two overlapping digits (as in
                                               :func:`moe_engine.mtl.digits.overlay`) -> the true
                                               caption among all 100, e.g. ``"three and seven"``
``"sum"``           image     regression       two overlapping digits ``a``, ``b`` -> ``(a+b)/18``
``"text_parity"``   text      classification   e.g. ``"add three 4"`` -> ``"even"``/``"odd"`` of
                                               ``a + b``
``"compare"``       image     classification   two overlapping digits -> ``"left"`` (left digit is
                                               larger), ``"right"``, ``"same"``
``"text_digit"``    text      classification   a phrase naming one digit, e.g. ``"number 7"`` or
                                               ``"the digit seven"`` -> ``"zero"``..``"nine"`` (the
                                               targets of ``"digit"``: one label space, two modalities)
==================  ========  ===============  ====================================================

:data:`DEFAULT_EMBEDDED_TASKS` are digit, caption, sum and text_digit. ``"compare"`` is the
held-out task for fine-tuning a generalist pre-trained on them. ``"text_parity"`` (the parity
of a sum spelled in words) is much harder for a character-level encoder: a small model on CPU
stays near chance on it within a few thousand steps, so it is not a default.

Leakage: the source images are split first
(:func:`moe_engine.mtl.digits.split_source_indices`) and each split draws only from its own
images, so no test image (pairs included) contains a train image. ``"text_parity"`` has a
small input space (100 operand pairs x 2 spellings of each operand x 6 templates = 2,400
strings), ``"text_digit"`` a smaller one (10 digits x 2 spellings x 8 templates = 160); those
strings are split the same way, so every test string is unseen in training, while every
operand still occurs in training under other spellings or templates. Texts
are lowercase ASCII words and digits of at most 16 characters.

Determinism: every draw comes from a ``numpy`` generator seeded by ``(seed, stream, split)``,
one stream per task, so the same seed gives bit-identical data and a task's examples do not
depend on which other tasks are requested.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_engine.mtl.digits import load_digit_images, overlay, place, split_source_indices
from moe_engine.mtl.generalist.tasks import (
    IMAGE_SHAPE,
    KIND_METRICS,
    GeneralistData,
    GeneralistTask,
    task_split,
)

# New tasks go at the end: a task's random stream is its position here.
EMBEDDED_TASKS: tuple[str, ...] = ("digit", "caption", "sum", "text_parity", "compare", "text_digit")
DEFAULT_EMBEDDED_TASKS: tuple[str, ...] = ("digit", "caption", "sum", "text_digit")

DIGIT_NAMES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
CAPTIONS: tuple[str, ...] = tuple(f"{a} and {b}" for a in DIGIT_NAMES for b in DIGIT_NAMES)
PARITY_NAMES: tuple[str, ...] = ("even", "odd")
COMPARE_NAMES: tuple[str, ...] = ("left", "right", "same")
# Templates of "text_parity"; with 5-letter operands the longest string has 16 characters.
TEXT_TEMPLATES: tuple[str, ...] = (
    "{a} plus {b}", "{a} and {b}", "add {a} {b}", "sum {a} {b}", "{a} with {b}", "{a} {b}",
)  # fmt: skip
# Templates of "text_digit".
DIGIT_TEMPLATES: tuple[str, ...] = (
    "{a}", "the digit {a}", "number {a}", "a {a}", "it is {a}", "digit {a} here", "i see {a}", "write {a}",
)  # fmt: skip

_DIGIT_SIZE = 8
_MAX_OFFSET = IMAGE_SHAPE[1] - _DIGIT_SIZE  # 4: offsets 0..4 keep one digit on the canvas
_MIN_TEST_EXAMPLES = 200  # per task: keeps test metrics meaningful for small examples_per_task
_TRAIN, _TEST, _TEXT_POOL = 0, 1, 2  # last element of a generator seed (see module docstring)

_DESCRIPTIONS = {
    "digit": "name of one digit at a random horizontal offset",
    "caption": "caption 'a and b' of two overlapping digits, retrieved among all 100",
    "sum": "(a + b) / 18 of two overlapping digits a, b",
    "text_parity": "parity of a + b in a phrase such as 'add three 4'",
    "compare": "which of two overlapping digits is larger: left, right or same",
    "text_digit": "name of the digit a phrase such as 'number 7' mentions",
}


def build_embedded_tasks(
    names: Sequence[str] | None = None,
    *,
    examples_per_task: int = 2000,
    eval_fraction: float = 0.2,
    seed: int = 0,
) -> GeneralistData:
    """Train and test splits of the requested embedded tasks (see the module docstring).

    Args:
        names: task names from :data:`EMBEDDED_TASKS`, unique, in the order wanted;
            ``None`` means :data:`DEFAULT_EMBEDDED_TASKS`.
        examples_per_task: train examples per task; each task gets
            ``max(200, round(examples_per_task * eval_fraction))`` test examples.
        eval_fraction: share of the source images (and of the text strings) reserved for
            test, in ``(0, 1)``.
        seed: non-negative integer; the same seed gives bit-identical data.

    Returns:
        :class:`GeneralistData` with in-memory, torch-formatted splits; ``chance`` of each
        task computed on its test split.

    Raises:
        ValueError: unknown or repeated name, ``examples_per_task < 1``, ``eval_fraction``
            outside ``(0, 1)`` or a negative ``seed``.
    """
    if names is None:
        names = DEFAULT_EMBEDDED_TASKS
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of task names, not the string {names!r}")
    names = tuple(names)
    for name in names:
        if name not in EMBEDDED_TASKS:
            raise ValueError(f"unknown embedded task {name!r}; allowed: {list(EMBEDDED_TASKS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names must be non-empty and unique, got {list(names)}")
    if isinstance(examples_per_task, bool) or int(examples_per_task) != examples_per_task:
        raise ValueError(f"examples_per_task must be an integer, got {examples_per_task!r}")
    if examples_per_task < 1:
        raise ValueError(f"examples_per_task must be >= 1, got {examples_per_task}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie strictly between 0 and 1, got {eval_fraction}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")

    images, classes = load_digit_images()
    train_idx, test_idx = split_source_indices(classes, eval_fraction, seed)
    pools = {
        _TRAIN: (images[train_idx], classes[train_idx]),
        _TEST: (images[test_idx], classes[test_idx]),
    }
    text_pools = {name: _split_text_pool(name, eval_fraction, seed) for name in names if name in _TEXT_PHRASES}
    sizes = {
        _TRAIN: int(examples_per_task),
        _TEST: max(_MIN_TEST_EXAMPLES, round(examples_per_task * eval_fraction)),
    }

    tasks, train, test = [], {}, {}
    for name in names:
        stream = 1 + EMBEDDED_TASKS.index(name)
        columns = {}
        for split in (_TRAIN, _TEST):
            rng = np.random.default_rng((seed, stream, split))
            if name in _TEXT_PHRASES:
                columns[split] = _draw_text(_TEXT_PHRASES[name](), text_pools[name][split], sizes[split], rng)
            else:
                columns[split] = _draw_image_task(name, *pools[split], sizes[split], rng)
        task = _describe(name, test_labels=columns[_TEST][1])
        tasks.append(task)
        train[name] = task_split(task, *columns[_TRAIN])
        test[name] = task_split(task, *columns[_TEST])
    return GeneralistData(tasks=tuple(tasks), train=train, test=test)


def text_parity_phrases() -> tuple[tuple[str, int], ...]:
    """Every ``"text_parity"`` input with its label: ``(phrase, (a + b) % 2)``, 2,400 of them.

    Each operand is spelled as a word (``"three"``) or a numeral (``"3"``).
    """
    phrases = []
    for template in TEXT_TEMPLATES:
        for a in range(10):
            for b in range(10):
                for a_text in (DIGIT_NAMES[a], str(a)):
                    for b_text in (DIGIT_NAMES[b], str(b)):
                        phrases.append((template.format(a=a_text, b=b_text), (a + b) % 2))
    return tuple(phrases)


def text_digit_phrases() -> tuple[tuple[str, int], ...]:
    """Every ``"text_digit"`` input with its label: ``(phrase, digit)``, 160 of them."""
    return tuple(
        (template.format(a=spelling), a)
        for template in DIGIT_TEMPLATES
        for a in range(10)
        for spelling in (DIGIT_NAMES[a], str(a))
    )


_TEXT_PHRASES = {"text_parity": text_parity_phrases, "text_digit": text_digit_phrases}


def _describe(name: str, test_labels: np.ndarray) -> GeneralistTask:
    """The task record of ``name``, its ``chance`` from the test split's labels or values."""
    kind, modality, targets = {
        "digit": ("classification", "image", DIGIT_NAMES),
        "caption": ("retrieval", "image", CAPTIONS),
        "sum": ("regression", "image", ()),
        "text_parity": ("classification", "text", PARITY_NAMES),
        "compare": ("classification", "image", COMPARE_NAMES),
        "text_digit": ("classification", "text", DIGIT_NAMES),
    }[name]
    if kind == "classification":  # accuracy of always answering the majority class
        counts = np.bincount(test_labels, minlength=len(targets))
        chance = float(counts.max() / counts.sum())
    elif kind == "retrieval":  # recall@1 of a uniformly random candidate
        chance = 1.0 / len(targets)
    else:  # mse of always predicting the test mean
        chance = float(np.var(test_labels.astype(np.float64)))
    metric, higher_is_better = KIND_METRICS[kind]
    return GeneralistTask(
        name=name,
        kind=kind,
        modality=modality,
        targets=targets,
        metric=metric,
        higher_is_better=higher_is_better,
        chance=chance,
        description=_DESCRIPTIONS[name],
    )


def _draw_image_task(
    name: str, images: np.ndarray, classes: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of an image task from one split's source images.

    Returns ``(n, 8, 12)`` float32 canvases and ``(n,)`` int64 labels (float32 values for
    ``"sum"``). Source images are drawn uniformly with replacement.
    """
    if name == "digit":
        chosen = rng.integers(len(images), size=n)
        offsets = rng.integers(_MAX_OFFSET + 1, size=n)
        canvases = np.empty((n, *IMAGE_SHAPE), dtype=np.float32)
        for offset in range(_MAX_OFFSET + 1):  # 5 vectorized placements instead of n small ones
            at = offsets == offset
            canvases[at] = place(images[chosen[at]], offset)
        return canvases, classes[chosen]

    left = rng.integers(len(images), size=n)
    right = rng.integers(len(images), size=n)
    canvases = overlay(images[left], images[right])
    a, b = classes[left], classes[right]
    if name == "caption":
        return canvases, a * 10 + b  # index of f"{DIGIT_NAMES[a]} and {DIGIT_NAMES[b]}"
    if name == "sum":
        return canvases, ((a + b) / 18.0).astype(np.float32)
    if name == "compare":
        return canvases, np.select([a > b, a < b], [0, 1], default=2).astype(np.int64)
    raise AssertionError(f"no drawing rule for image task {name!r}")


def _split_text_pool(name: str, eval_fraction: float, seed: int) -> dict[int, np.ndarray]:
    """Disjoint train/test sets of a text task's phrase indices (a seeded permutation)."""
    count = len(_TEXT_PHRASES[name]())
    order = np.random.default_rng((seed, 1 + EMBEDDED_TASKS.index(name), _TEXT_POOL))
    order = order.permutation(count)
    n_test = min(max(round(count * eval_fraction), 1), count - 1)
    return {_TRAIN: np.sort(order[n_test:]), _TEST: np.sort(order[:n_test])}


def _draw_text(
    phrases: tuple[tuple[str, int], ...], pool: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[list[str], np.ndarray]:
    """``n`` phrases drawn uniformly with replacement from ``pool`` (indices into ``phrases``) and their labels."""
    chosen = pool[rng.integers(len(pool), size=n)]
    return [phrases[i][0] for i in chosen], np.array([phrases[i][1] for i in chosen], np.int64)
