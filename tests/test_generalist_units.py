"""Generalist pieces the broader tests leave loose: the score heads (clamped logit scale, the
regression bias), the embedded tasks' drawing rules (compare's label meaning, every digit
offset, a text test pool that is never empty), the split and task checks on the low side of
their ranges, and the image tokenizer's shape check on both axes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_engine.mtl.generalist import GeneralistData, build_embedded_tasks, task_split
from moe_engine.mtl.generalist.embedded import COMPARE_NAMES, _draw_image_task
from moe_engine.mtl.generalist.model import MAX_LOGIT_SCALE
from moe_engine.mtl.generalist.tasks import IMAGE_SHAPE, GeneralistTask
from moe_engine.mtl.generalist.tokenizers import ImagePatchTokenizer
from test_generalist_model import build, make_batch

DIGIT = GeneralistTask("digit", "classification", "image", ("a", "b", "c"), "accuracy", True, 0.5, "x")


# ------------------------------------------------------------------------------------------ score heads


def test_logit_scale_is_clamped_at_100_and_regression_adds_its_bias() -> None:
    """A learned temperature past 1/100 scores with 100 * cosine (CLIP's clamp); a regression
    head with zero weight predicts its bias."""
    model = build(router="softmax_topk", share_routing=False).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        model.regression_weight.zero_()
        model.regression_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.7]))
        out = model(make_batch(names=("digit", "length")))
    digit = out.scores["digit"]
    assert digit.abs().max() <= MAX_LOGIT_SCALE + 1e-3 and digit.abs().max() > 1.0
    torch.testing.assert_close(out.scores["length"], torch.full((2,), 0.7))


# ------------------------------------------------------------------------------------------ embedded tasks


def _flat_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n 8x8 images, image i all ink (i + 1) / n, class i: a canvas column tells which image is there."""
    images = np.stack([np.full((8, 8), (i + 1) / n, np.float32) for i in range(n)])
    return images, np.arange(n)


def test_compare_labels_name_the_side_of_the_larger_digit() -> None:
    images, classes = _flat_images(4)
    canvases, labels = _draw_image_task("compare", images, classes, 300, np.random.default_rng(0))
    left = np.rint(canvases[:, 0, 0] * 4).astype(int) - 1  # columns 0..3 show only the left digit
    right = np.rint(canvases[:, 0, 11] * 4).astype(int) - 1  # columns 8..11 only the right one
    names = np.array(COMPARE_NAMES)[labels]
    assert set(names) == {"left", "right", "same"}
    assert (names == np.where(left > right, "left", np.where(left < right, "right", "same"))).all()


def test_digit_is_drawn_at_every_offset() -> None:
    images, classes = _flat_images(1)
    canvases, _ = _draw_image_task("digit", images, classes, 200, np.random.default_rng(0))
    first_inked = canvases.any(1).argmax(1)
    assert set(first_inked.tolist()) == {0, 1, 2, 3, 4}


def test_a_tiny_eval_fraction_still_leaves_test_phrases() -> None:
    """160 text_digit phrases * 0.001 rounds to 0: the test pool keeps one phrase, unseen in training."""
    data = build_embedded_tasks(["text_digit"], examples_per_task=5, eval_fraction=0.001, seed=0)
    test, train = data.test["text_digit"][:]["text"], data.train["text_digit"][:]["text"]
    assert len(test) == 200 and len(set(test)) == 1 and not set(test) & set(train)


# ------------------------------------------------------------------------------------------ checks


@pytest.mark.parametrize("pixels, labels, message", [
    (0.5, [-1], r"labels must lie in 0..2"),
    (-0.25, [0], r"image values must be finite and lie in \[0, 1\]"),
], ids=["negative_label", "negative_pixels"])
def test_split_values_below_their_range_are_refused(pixels, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        task_split(DIGIT, np.full((1, *IMAGE_SHAPE), pixels, np.float32), labels)


def test_negative_chance_and_repeated_tasks_are_refused() -> None:
    with pytest.raises(ValueError, match="chance must lie in"):
        GeneralistTask("t", "classification", "text", ("a", "b"), "accuracy", True, -0.1, "x")
    split = task_split(DIGIT, np.zeros((2, *IMAGE_SHAPE), np.float32), [0, 1])
    with pytest.raises(ValueError, match="task names must be unique"):
        GeneralistData(tasks=(DIGIT, DIGIT), train={"digit": split}, test={"digit": split})


@pytest.mark.parametrize("image_shape", [(4, 6), (6, 4)], ids=["width", "height"])
def test_patch_size_must_divide_both_image_sides(image_shape) -> None:
    with pytest.raises(ValueError, match="patch_size = 4: must be >= 1 and divide"):
        ImagePatchTokenizer(image_shape, 4, 5)
