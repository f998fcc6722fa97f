"""Tests of moe_engine.mtl.telemetry.TaskExpertTelemetry.

Small routings built by hand are checked against numbers worked out on paper (closed forms in
the comments); random routings are checked against a per-token Python loop in float64.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from moe_engine.mtl.telemetry import TaskExpertTelemetry
from moe_engine.routing.types import Routing

LN2, LN3 = math.log(2.0), math.log(3.0)


def make_routing(experts_TK, scores_TE) -> Routing:
    experts_TK = torch.as_tensor(experts_TK, dtype=torch.long)
    scores_TE = torch.as_tensor(scores_TE, dtype=torch.float32)
    weights_TK = torch.where(experts_TK >= 0, 0.5, 0.0)
    return Routing(weights_TK, experts_TK, scores_TE, torch.zeros(()), capacity=max(1, experts_TK.shape[0]))


# T=5 tokens, K=2, E=3, tasks [0, 1, 0, 1, 1]; -1 marks dropped choices.
HAND_EXPERTS = [[0, 1], [2, -1], [0, 2], [2, 1], [-1, -1]]
HAND_SCORES = [
    [0.5, 0.5, 0.0],  # H = ln 2
    [1 / 3, 1 / 3, 1 / 3],  # H = ln 3
    [1.0, 0.0, 0.0],  # H = 0
    [0.25, 0.25, 0.5],  # H = 1.5 ln 2
    [0.5, 0.25, 0.25],  # H = 1.5 ln 2
]
HAND_TASKS = torch.tensor([0, 1, 0, 1, 1])
# Task 0 choices: experts 0, 1, 0, 2 -> counts [2, 1, 1]; task 1: 2, 2, 1 -> [0, 1, 2].
HAND_COUNTS = [[2.0, 1.0, 1.0], [0.0, 1.0, 2.0]]
HAND_UTILISATION = [[0.5, 0.25, 0.25], [0.0, 1 / 3, 2 / 3]]
HAND_TOKEN_ENTROPY = [LN2 / 2, (LN3 + 3 * LN2) / 3]
HAND_USAGE_ENTROPY = [1.5 * LN2, LN3 - (2 / 3) * LN2]
# Joint P = C / 7, P(task) = [4/7, 3/7], P(expert) = [2/7, 2/7, 3/7]: sum of P log(P / (P(t) P(e))).
HAND_MI = (
    (2 / 7) * math.log(7 / 4)
    + (1 / 7) * math.log(7 / 8)
    + (1 / 7) * math.log(7 / 12)
    + (1 / 7) * math.log(7 / 6)
    + (2 / 7) * math.log(14 / 9)
)


def hand_telemetry(num_layers: int = 1, **kwargs) -> TaskExpertTelemetry:
    telemetry = TaskExpertTelemetry(num_layers, 3, 2, **kwargs)
    telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)] * num_layers, HAND_TASKS)
    return telemetry


def random_routing(T: int, K: int, E: int, drop: float, generator: torch.Generator) -> Routing:
    scores_TE = torch.softmax(torch.randn(T, E, generator=generator) * 2, -1)
    experts_TK = torch.stack([torch.randperm(E, generator=generator)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    dropped_TK = torch.rand(T, K, generator=generator) < drop
    return make_routing(experts_TK.masked_fill(dropped_TK, -1), scores_TE)


def loop_reference(steps, num_layers: int, num_tasks: int, E: int):
    """Per-token float64 loops over [(routings, task_ids)]: counts, tokens and entropy sums."""
    counts = [[[0.0] * E for _ in range(num_tasks)] for _ in range(num_layers)]
    tokens = [[0.0] * num_tasks for _ in range(num_layers)]
    entropy = [[0.0] * num_tasks for _ in range(num_layers)]
    for routings, task_ids in steps:
        for layer, routing in enumerate(routings):
            for t, task in enumerate(task_ids.tolist()):
                tokens[layer][task] += 1
                for e in routing.experts_TK[t].tolist():
                    if e >= 0:
                        counts[layer][task][e] += 1
                p = routing.scores_TE[t].double()
                p = p / p.sum()
                entropy[layer][task] += sum(-q * math.log(q) for q in p.tolist() if q > 0)
    return torch.tensor(counts, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64), torch.tensor(entropy, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def test_hand_built_routing_gives_hand_computed_statistics():
    telemetry = hand_telemetry()
    counts_LXE, tokens_LX, _ = telemetry.tensors()
    assert counts_LXE[0].tolist() == HAND_COUNTS  # the -1 choices (token 1's second, token 4's both) are not counted
    assert tokens_LX[0].tolist() == [2.0, 3.0]  # token 4 counts as a token though all its choices were dropped
    torch.testing.assert_close(telemetry.utilisation(0), torch.tensor(HAND_UTILISATION, dtype=torch.float64))
    torch.testing.assert_close(telemetry.mean_entropy(), torch.tensor([HAND_TOKEN_ENTROPY], dtype=torch.float64))
    torch.testing.assert_close(telemetry.usage_entropy(), torch.tensor([HAND_USAGE_ENTROPY], dtype=torch.float64))
    torch.testing.assert_close(telemetry.mutual_information(), torch.tensor([HAND_MI], dtype=torch.float64))


def test_scalars_have_flat_names_and_hand_computed_values():
    telemetry = hand_telemetry(num_layers=2, task_names=["digits", "parity"])
    scalars = telemetry.scalars()
    expected = {}
    for layer in range(2):
        for t, task in enumerate(["digits", "parity"]):
            expected[f"routing/layer{layer}/token_entropy/{task}"] = HAND_TOKEN_ENTROPY[t]
            expected[f"routing/layer{layer}/usage_entropy/{task}"] = HAND_USAGE_ENTROPY[t]
        expected[f"routing/layer{layer}/task_expert_mi"] = HAND_MI
    assert scalars.keys() == expected.keys()
    for name, value in expected.items():
        # Token entropies come from fp32 scores; the rest are float64 functions of exact counts.
        assert scalars[name] == pytest.approx(value, rel=1e-6 if "token_entropy" in name else 1e-12), name
    assert all(type(v) is float for v in scalars.values())
    assert set(telemetry.scalars(prefix="eval_routing")) == {"eval_" + name for name in expected}


def test_mutual_information_limits():
    # Each task on its own expert: I = H(task) = ln 2. Both tasks alike: I = 0.
    separate = TaskExpertTelemetry(1, 2, 2)
    separate.update([make_routing([[0], [1], [0], [1]], [[0.5, 0.5]] * 4)], torch.tensor([0, 1, 0, 1]))
    assert separate.mutual_information().item() == pytest.approx(LN2, rel=1e-12)
    assert separate.usage_entropy().tolist() == [[0.0, 0.0]]
    alike = TaskExpertTelemetry(1, 2, 2)
    alike.update([make_routing([[0, 1], [1, 0]], [[0.5, 0.5]] * 2)], torch.tensor([0, 1]))
    assert alike.mutual_information().item() == pytest.approx(0.0, abs=1e-15)
    assert alike.usage_entropy()[0].tolist() == pytest.approx([LN2, LN2], rel=1e-12)


def test_sigmoid_scores_are_normalised_before_the_entropy():
    telemetry = TaskExpertTelemetry(1, 3, 1)
    telemetry.update([make_routing([[0]], [[0.9, 0.9, 0.0]])], torch.tensor([0]))
    assert telemetry.mean_entropy().item() == pytest.approx(LN2, rel=1e-6)


@pytest.mark.parametrize(
    "T, K, E, num_tasks, num_layers, drop",
    [
        (1, 1, 2, 1, 1, 0.0),  # T = 1
        (13, 2, 7, 3, 2, 0.3),  # odd T, prime E, drops
        (9, 5, 5, 4, 3, 0.5),  # K = E
        (31, 3, 12, 2, 1, 0.0),  # E not a power of two, dropless
    ],
)
def test_matches_loop_reference_over_several_updates(T, K, E, num_tasks, num_layers, drop):
    generator = torch.Generator().manual_seed(T * 1000 + E)
    telemetry = TaskExpertTelemetry(num_layers, E, num_tasks)
    steps = []
    for _ in range(3):
        routings = [random_routing(T, K, E, drop, generator) for _ in range(num_layers)]
        task_ids = torch.randint(num_tasks, (T,), generator=generator)
        telemetry.update(routings, task_ids)
        steps.append((routings, task_ids))
    counts_LXE, tokens_LX, entropy_LX = loop_reference(steps, num_layers, num_tasks, E)
    torch.testing.assert_close(telemetry.counts_LXE, counts_LXE, rtol=0, atol=0)
    torch.testing.assert_close(telemetry.tokens_LX, tokens_LX, rtol=0, atol=0)
    torch.testing.assert_close(telemetry.entropy_sum_LX, entropy_LX, rtol=1e-6, atol=1e-6)  # fp32 scores
    for layer in range(num_layers):
        rows = counts_LXE[layer].sum(-1, keepdim=True)
        expected = torch.where(rows > 0, counts_LXE[layer] / rows.clamp_min(1), 0.0)
        torch.testing.assert_close(telemetry.utilisation(layer), expected)
        used = rows.squeeze(-1) > 0
        torch.testing.assert_close(telemetry.utilisation(layer)[used].sum(-1), torch.ones(int(used.sum()), dtype=torch.float64))


def test_accumulation_adds_up_and_reset_zeroes():
    telemetry = hand_telemetry()
    telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], HAND_TASKS)
    assert telemetry.counts_LXE[0].tolist() == [[2 * c for c in row] for row in HAND_COUNTS]
    assert telemetry.tokens_LX[0].tolist() == [4.0, 6.0]
    # Doubling every count leaves every normalised statistic as it was.
    torch.testing.assert_close(telemetry.utilisation(0), torch.tensor(HAND_UTILISATION, dtype=torch.float64))
    torch.testing.assert_close(telemetry.mean_entropy(), torch.tensor([HAND_TOKEN_ENTROPY], dtype=torch.float64))
    assert telemetry.mutual_information().item() == pytest.approx(HAND_MI, rel=1e-12)
    telemetry.reset()
    assert all(int(t.count_nonzero()) == 0 for t in telemetry.tensors())


def test_tasks_without_tokens_or_without_kept_choices():
    telemetry = TaskExpertTelemetry(1, 3, 3, task_names=["a", "b", "c"])
    # Task 1 has no token; task 2 has a token whose choices were all dropped.
    telemetry.update([make_routing([[0, 1], [-1, -1]], [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])], torch.tensor([0, 2]))
    assert telemetry.utilisation(0).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    token_entropy, usage_entropy = telemetry.mean_entropy()[0], telemetry.usage_entropy()[0]
    assert token_entropy[0].item() == pytest.approx(LN2) and math.isnan(token_entropy[1]) and token_entropy[2].item() == 0.0
    assert usage_entropy[0].item() == pytest.approx(LN2) and math.isnan(usage_entropy[1]) and math.isnan(usage_entropy[2])
    scalars = telemetry.scalars()
    assert scalars["routing/layer0/token_entropy/b"] is None and scalars["routing/layer0/usage_entropy/c"] is None
    assert scalars["routing/layer0/token_entropy/c"] == 0.0
    assert scalars["routing/layer0/task_expert_mi"] == pytest.approx(0.0, abs=1e-15)  # only task a routed


def test_empty_totals_and_empty_batch():
    telemetry = TaskExpertTelemetry(2, 4, 2)
    telemetry.update([make_routing(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 4))] * 2, torch.zeros(0, dtype=torch.long))
    assert all(int(t.count_nonzero()) == 0 for t in telemetry.tensors())
    assert telemetry.utilisation(1).tolist() == [[0.0] * 4] * 2
    assert all(math.isnan(v) for v in telemetry.mutual_information().tolist())
    scalars = telemetry.scalars()
    assert len(scalars) == 2 * (2 * 2 + 1) and all(v is None for v in scalars.values())


def test_update_detaches_from_the_graph():
    logits_TE = torch.randn(4, 3, requires_grad=True)
    routing = Routing(torch.ones(4, 1), torch.tensor([[0], [1], [2], [0]]), torch.softmax(logits_TE, -1), torch.zeros(()))
    telemetry = TaskExpertTelemetry(1, 3, 2)
    telemetry.update([routing], torch.tensor([0, 1, 1, 0]))
    assert not any(t.requires_grad for t in telemetry.tensors())
    assert telemetry.scalars()["routing/layer0/token_entropy/task0"] > 0


def test_check_task_range_false_skips_only_the_range_check():
    telemetry = TaskExpertTelemetry(1, 3, 2)
    telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], HAND_TASKS.int(), check_task_range=False)
    assert telemetry.counts_LXE[0].tolist() == HAND_COUNTS
    with pytest.raises(ValueError, match=r"task_ids_T has shape \(5, 1\): expected \(5,\)"):
        telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], HAND_TASKS[:, None], check_task_range=False)
    with pytest.raises(ValueError, match=r"routes 5 tokens but task_ids_T has 4"):
        telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], HAND_TASKS[:4], check_task_range=False)
    with pytest.raises(ValueError, match=r"task_ids_T .*got None"):
        telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], None, check_task_range=False)
    with pytest.raises(ValueError, match=r"dtype torch.float32: expected an integer dtype"):
        telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], HAND_TASKS.float(), check_task_range=False)


# ---------------------------------------------------------------------------------------------
# Data parallelism and checkpoints
# ---------------------------------------------------------------------------------------------


def test_summing_tensors_over_ranks_equals_one_process():
    generator = torch.Generator().manual_seed(0)
    routings = [random_routing(20, 2, 5, 0.2, generator) for _ in range(2)]
    task_ids = torch.randint(3, (20,), generator=generator)
    whole = TaskExpertTelemetry(2, 5, 3)
    whole.update(routings, task_ids)
    ranks = [TaskExpertTelemetry(2, 5, 3) for _ in range(2)]
    for rank, rows in zip(ranks, (slice(0, 12), slice(12, 20))):
        rank.update([make_routing(r.experts_TK[rows], r.scores_TE[rows]) for r in routings], task_ids[rows])
    reduced = ranks[0].copy()  # what an all-reduce of copy().tensors() gives on every rank
    for mine, theirs in zip(reduced.tensors(), ranks[1].tensors()):
        mine += theirs
    for got, expected in zip(reduced.tensors(), whole.tensors()):
        torch.testing.assert_close(got, expected)
    assert reduced.scalars() == pytest.approx(whole.scalars())
    # The copy is independent: rank 0's own totals did not change.
    assert ranks[0].tokens_LX.sum().item() == 12 * 2


def test_state_dict_round_trip_resumes_accumulation():
    uninterrupted = hand_telemetry(num_layers=2, task_names=["x", "y"])
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = TaskExpertTelemetry(2, 3, 2, task_names=["x", "y"])
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for telemetry in (uninterrupted, resumed):
        telemetry.update([make_routing(HAND_EXPERTS[:3], HAND_SCORES[:3])] * 2, HAND_TASKS[:3])
    for got, expected in zip(resumed.tensors(), uninterrupted.tensors()):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    state = resumed.state_dict()
    assert all(t.device.type == "cpu" for k, t in state.items() if k != "task_names")
    state["counts_LXE"].zero_()  # a copy: the live totals are untouched
    assert resumed.counts_LXE.sum().item() > 0


def test_load_state_dict_rejects_another_setup():
    state = hand_telemetry().state_dict()
    with pytest.raises(ValueError, match=r"counts_LXE of shape \(1, 2, 3\): expected \(2, 2, 3\)"):
        TaskExpertTelemetry(2, 3, 2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"task_names = \['task0', 'task1'\]: expected \['a', 'b'\]"):
        TaskExpertTelemetry(1, 3, 2, task_names=["a", "b"]).load_state_dict(state)
    del state["entropy_sum_LX"]
    with pytest.raises(ValueError, match="lacks 'entropy_sum_LX'"):
        TaskExpertTelemetry(1, 3, 2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Output files and TensorBoard
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tasks, num_experts", [(2, 3), (5, 64)])  # annotated cells; too many to annotate
def test_save_heatmaps_writes_one_png_per_layer(tmp_path, num_tasks, num_experts):
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    telemetry = TaskExpertTelemetry(2, num_experts, num_tasks, task_names=[f"task_{t}" for t in range(num_tasks)])
    telemetry.update([random_routing(40, 2, num_experts, 0.1, generator) for _ in range(2)], torch.randint(num_tasks, (40,), generator=generator))
    paths = telemetry.save_heatmaps(tmp_path / "heatmaps")
    assert [p.name for p in paths] == ["task_expert_layer0.png", "task_expert_layer1.png"]
    for path in paths:
        assert path.stat().st_size > 1000
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
        assert 300 <= width <= 1600 and 200 <= height <= 1200, (width, height)
        assert width > height  # experts run along the wider axis


def test_save_heatmaps_of_empty_totals(tmp_path):
    import matplotlib.image

    paths = TaskExpertTelemetry(1, 4, 2).save_heatmaps(tmp_path)
    pixels = matplotlib.image.imread(paths[0])
    assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 300


def test_save_json(tmp_path):
    telemetry = TaskExpertTelemetry(1, 3, 3, task_names=["a", "b", "c"])
    telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)], HAND_TASKS)  # task c has no tokens
    doc = json.loads(telemetry.save_json(tmp_path / "sub" / "telemetry.json").read_text())
    assert doc["task_names"] == ["a", "b", "c"] and doc["num_experts"] == 3 and doc["num_layers"] == 1
    (layer,) = doc["layers"]
    assert layer["counts"] == HAND_COUNTS + [[0.0, 0.0, 0.0]]
    assert layer["tokens"] == [2.0, 3.0, 0.0]
    for got, expected in zip(layer["utilisation"], HAND_UTILISATION + [[0.0, 0.0, 0.0]], strict=True):
        assert got == pytest.approx(expected, rel=1e-12)
    assert layer["token_entropy"][:2] == pytest.approx(HAND_TOKEN_ENTROPY) and layer["token_entropy"][2] is None
    assert layer["usage_entropy"][:2] == pytest.approx(HAND_USAGE_ENTROPY) and layer["usage_entropy"][2] is None
    assert layer["task_expert_mi"] == pytest.approx(HAND_MI)


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_image(self, tag, image, step, dataformats):
        self.images[tag] = (image, step, dataformats)


def test_log_tensorboard_writes_scalars_and_heatmap_images():
    telemetry = TaskExpertTelemetry(2, 3, 3)
    telemetry.update([make_routing(HAND_EXPERTS, HAND_SCORES)] * 2, HAND_TASKS)  # task2 has no tokens
    writer = RecordingWriter()
    telemetry.log_tensorboard(writer, step=7)
    expected = {k: (v, 7) for k, v in telemetry.scalars().items() if v is not None}
    assert writer.scalars == expected and "routing/layer0/token_entropy/task2" not in writer.scalars
    assert set(writer.images) == {"routing/layer0/task_expert", "routing/layer1/task_expert"}
    image, step, dataformats = writer.images["routing/layer1/task_expert"]
    assert step == 7 and dataformats == "HWC" and image.dtype.name == "uint8"
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] >= 200 and image.shape[1] >= 300
    no_images = RecordingWriter()
    telemetry.log_tensorboard(no_images, step=8, images=False)
    assert not no_images.images and len(no_images.scalars) == len(expected)


def test_log_tensorboard_with_a_summary_writer(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    hand_telemetry().log_tensorboard(writer, step=3)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    (mi,) = events.Scalars("routing/layer0/task_expert_mi")
    assert mi.step == 3 and mi.value == pytest.approx(HAND_MI, rel=1e-6)
    assert events.Tags()["images"] == ["routing/layer0/task_expert"]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 3, 2), {}, r"num_layers = 0: expected an int >= 1"),
        ((1, 0, 2), {}, r"num_experts = 0: expected an int >= 1"),
        ((1, 3, 2.0), {}, r"num_tasks = 2.0: expected an int >= 1"),
        ((1, 3, 2), {"task_names": ["a"]}, r"task_names = \['a'\]: expected 2 names"),
        ((1, 3, 2), {"task_names": ["a", "a"]}, r"expected distinct non-empty strings"),
        ((1, 3, 2), {"task_names": ["a", ""]}, r"expected distinct non-empty strings"),
    ],
)
def test_constructor_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskExpertTelemetry(*args, **kwargs)


def test_update_errors_leave_the_totals_untouched():
    telemetry = TaskExpertTelemetry(2, 3, 2)
    good = make_routing(HAND_EXPERTS, HAND_SCORES)
    cases = [
        ([good], HAND_TASKS, r"got 1 routings: expected 2, one per MoE layer"),
        ([good, make_routing([[0]] * 5, [[0.25] * 4] * 5)], HAND_TASKS, r"layer 1 has scores_TE of shape \(5, 4\): expected \(T, 3\)"),
        ([good, make_routing([[0]] * 4, HAND_SCORES)], HAND_TASKS, r"layer 1 has experts_TK of shape \(4, 1\) and scores_TE of shape \(5, 3\)"),
        ([good, good], HAND_TASKS[:4], r"layer 0 routes 5 tokens but task_ids_T has 4"),
        ([good, good], None, r"TaskExpertTelemetry needs RoutingContext.task_ids_T"),
        ([good, good], HAND_TASKS + 1, r"task_ids_T has values in \[1, 2\]: allowed \[0, 1\]"),
        ([good, good], HAND_TASKS.float(), r"task_ids_T has dtype torch.float32"),
    ]
    for routings, task_ids, match in cases:
        with pytest.raises(ValueError, match=match):
            telemetry.update(routings, task_ids)
    assert all(int(t.count_nonzero()) == 0 for t in telemetry.tensors())


def test_utilisation_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layer = 2: expected 0 <= layer < 2"):
        TaskExpertTelemetry(2, 3, 2).utilisation(2)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_update_on_cuda_stays_on_device_without_sync():
    generator = torch.Generator().manual_seed(2)
    routings = [random_routing(33, 2, 7, 0.2, generator) for _ in range(2)]
    task_ids = torch.randint(3, (33,), generator=generator)
    on_cpu = TaskExpertTelemetry(2, 7, 3)
    on_cpu.update(routings, task_ids)
    cuda_routings = [make_routing(r.experts_TK.cuda(), r.scores_TE.cuda()) for r in routings]
    on_gpu = TaskExpertTelemetry(2, 7, 3)
    task_ids_cuda = task_ids.cuda()  # a blocking host-to-device copy: before the sync check starts
    on_gpu.update(cuda_routings, task_ids_cuda)  # the first update moves the totals to the GPU
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu.update(cuda_routings, task_ids_cuda, check_task_range=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.device.type == "cuda" for t in on_gpu.tensors())
    for got, expected in zip(on_gpu.tensors(), on_cpu.tensors()):
        torch.testing.assert_close(got.cpu(), 2 * expected)


def test_from_counts_gives_the_statistics_of_given_counts(tmp_path):
    counts_LXE = torch.tensor([[[3, 1, 0], [0, 0, 4]]])
    telemetry = TaskExpertTelemetry.from_counts(counts_LXE, ["a", "b"])
    torch.testing.assert_close(telemetry.utilisation(0), torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    # Tasks on disjoint experts with equal mass: I(task; expert) = log 2.
    assert telemetry.mutual_information().item() == pytest.approx(math.log(2))
    paths = telemetry.save_heatmaps(tmp_path, stem="test_task_expert", caption=" on the test split")
    assert [p.name for p in paths] == ["test_task_expert_layer0.png"] and paths[0].stat().st_size > 0
    with pytest.raises(ValueError, match=r"counts_LXE has shape \(2, 3\): expected \(layers, tasks, experts\)"):
        TaskExpertTelemetry.from_counts(torch.ones(2, 3))
