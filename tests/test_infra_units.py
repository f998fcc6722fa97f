"""In-process unit tests of the plumbing's edges, each in milliseconds, no process group and no
DeepSpeed launch: all-to-all byte accounting and argument checks (moe_engine.parallel.collectives),
DeepSpeed checkpoint pruning and loading with a stand-in engine (moe_engine.parallel.deepspeed_checkpoint),
load-imbalance and traffic statistics (moe_engine.parallel.telemetry), the synthetic MMoE data's random
streams (moe_engine.mtl.synthetic), the generalist losses' label checks (moe_engine.mtl.generalist.losses)
and the workloads' routed-choice counts, forward step and fine-tuning check (moe_engine.workloads).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moe_engine.checkpoint import CheckpointManager, CheckpointMismatchError, expert_shard_file, write_checkpoint_file
from moe_engine.parallel import collectives
from moe_engine.parallel.deepspeed_checkpoint import load_deepspeed_checkpoint, save_deepspeed_checkpoint


# ---- collectives ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, input_splits, output_splits, me",
    [
        (5, [2, 3, 0], [1, 1, 4], 1),  # sends 2 rows off-rank, receives 5: the two directions differ
        (5, [2, 3, 0], [1, 1, 4], 2),  # no own-rank block to send, 4 rows kept
        (0, [0, 0, 0], [3, 0, 1], 0),  # sends no rows at all: sized from the shape, not x[0]
    ],
)
def test_offrank_bytes_counts_sent_and_received_rows_of_other_ranks(monkeypatch, rows, input_splits, output_splits, me):
    """(sent, received) in that order, each without the own-rank block, from x's row size (3 * 4 fp32 = 48 bytes)."""
    monkeypatch.setattr(collectives.dist, "get_rank", lambda group: me)
    x = torch.zeros(rows, 3, 4)
    sent, received = collectives.offrank_bytes(x, output_splits, input_splits, group=None)
    assert sent == (sum(input_splits) - input_splits[me]) * 48
    assert received == (sum(output_splits) - output_splits[me]) * 48


@pytest.mark.parametrize("w_shape", [(3,), (5,), (4, 1)])
def test_all_to_all_with_weights_refuses_a_weight_count_other_than_the_rows(w_shape):
    """w_N must be (N,) for x_ND (N, D) = (4, 2): refused before any collective is issued."""
    with pytest.raises(ValueError, match=r"expected \(4,\): one weight per row of x_ND"):
        collectives.all_to_all_with_weights(torch.zeros(4, 2), torch.zeros(w_shape), [4], [4], group=None)


# ---- DeepSpeed checkpoints with a stand-in engine --------------------------------------------------


class _FakeEngine:
    """What the checkpoint helpers call on a DeepSpeed engine: save writes the tag folder, load returns `client`."""

    def __init__(self, client=None) -> None:
        self.client = client

    def save_checkpoint(self, directory: str, tag: str, client_state) -> None:
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "latest").write_text(tag)

    def load_checkpoint(self, directory: str, tag: str):
        return directory, self.client


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_save_deepspeed_checkpoint_keeps_exactly_the_newest_keep_tags(tmp_path: Path, keep: int) -> None:
    """After 5 saves, rank 0 has removed all but the newest `keep` step_* folders."""
    checkpoints = CheckpointManager(tmp_path, keep=keep)
    barriers = []
    for step in range(1, 6):
        folder = save_deepspeed_checkpoint(_FakeEngine(), nn.Linear(2, 2), None, checkpoints, step, {"step": step},
                                           is_main=True, barrier=lambda: barriers.append(1))
        assert folder == checkpoints.sharded_path_for(step) and folder.is_dir()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_{s:08d}" for s in range(6 - keep, 6)]
    assert len(barriers) == 5


def test_load_deepspeed_checkpoint_refuses_a_tag_deepspeed_could_not_read(tmp_path: Path) -> None:
    """DeepSpeed returns (None, None) for a tag it cannot read (it only logs): that is an error, not an empty state."""
    (tmp_path / "step_00000004").mkdir()
    with pytest.raises(CheckpointMismatchError, match="DeepSpeed could not read it"):
        load_deepspeed_checkpoint(_FakeEngine(client=None), nn.Linear(2, 2), None, tmp_path / "step_00000004")
    assert load_deepspeed_checkpoint(_FakeEngine(client={"step": 4}), nn.Linear(2, 2), None, tmp_path / "step_00000004") == {"step": 4}


class _TwoExpertTensors(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.zeros(2, 3))
        self.w_out = nn.Parameter(torch.zeros(2, 3))
        self.dense = nn.Parameter(torch.zeros(3))
        for p in (self.w_in, self.w_out):
            p.allreduce = False  # DeepSpeed's mark of expert parameters


@pytest.mark.parametrize("names", [("w_in",), ("w_in", "w_out", "dense")])
def test_load_deepspeed_checkpoint_refuses_an_expert_shard_of_other_tensors(tmp_path: Path, names) -> None:
    """EP 2, rank 1: a shard holding a subset or a superset of the model's expert tensors is refused by name;
    the exact set loads this rank's experts into the model."""
    tag = tmp_path / "step_00000007"
    groups = SimpleNamespace(ep_size=2, ep_rank=1, rank=1)

    def write_shard(tensor_names):
        model_state = {n: torch.full((2, 3) if n != "dense" else (3,), 5.0) for n in tensor_names}
        write_checkpoint_file(tag / expert_shard_file(1, 2), 7, {"ep_rank": 1, "ep_size": 2, "expert_ids": {}, "model": model_state, "optimizer": {}})

    write_checkpoint_file(tag / expert_shard_file(0, 2), 7, {"ep_rank": 0, "ep_size": 2, "expert_ids": {}, "model": {}, "optimizer": {}})
    write_shard(names)
    model = _TwoExpertTensors()
    with pytest.raises(CheckpointMismatchError, match=r"its expert shard holds .* this model's experts are \['w_in', 'w_out'\]"):
        load_deepspeed_checkpoint(_FakeEngine(client={"step": 7}), model, groups, tag)
    write_shard(("w_in", "w_out"))
    load_deepspeed_checkpoint(_FakeEngine(client={"step": 7}), model, groups, tag)
    assert torch.equal(model.w_in, torch.full((2, 3), 5.0)) and torch.equal(model.dense, torch.zeros(3))


# ---- telemetry -----------------------------------------------------------------------------------


def test_rank_imbalance_of_several_replicas_and_layers_is_per_layer_over_every_replicas_ranks():
    """(R, L, E) = (2, 2, 4), EP 2: layer 0's ranks compute 16, 0 | 0, 16 rows (max / mean 2), layer 1's
    8, 8 | 8, 8 (1); averaged 1.5. Mixing layers with replicas would give 2 for both layers."""
    from moe_engine.parallel.telemetry import load_imbalance

    counts_RLE = torch.tensor([
        [[10.0, 6.0, 0.0, 0.0], [4.0, 4.0, 4.0, 4.0]],
        [[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 4.0, 4.0]],
    ])
    stats = load_imbalance(counts_RLE, ep_size=2)
    assert stats["rank_imbalance"] == pytest.approx(1.5)
    assert stats["expert_imbalance"] == pytest.approx((10.0 / 8.0 + 1.0) / 2)


def test_load_imbalance_of_layers_without_routed_tokens_is_finite():
    """A layer that routed no token (all its counts 0) is balanced, 1.0, not 0 / 0 and not 0: (R, L, E) =
    (2, 2, 4), layer 0 empty, layer 1 all on expert 0 of replica 0 (expert ratio 4, rank ratio 4 over
    the 2 * 2 ranks): the averages are (1 + 4) / 2."""
    from moe_engine.parallel.telemetry import load_imbalance

    assert load_imbalance(torch.zeros(2, 2, 4), ep_size=2) == {"expert_imbalance": 1.0, "rank_imbalance": 1.0}
    counts = torch.zeros(2, 2, 4)
    counts[0, 1, 0] = 8
    assert load_imbalance(counts, ep_size=2) == {"expert_imbalance": 2.5, "rank_imbalance": 2.5}


def test_traffic_meter_times_cpu_exchanges_and_resets_on_read():
    """The wall time inside measure() is reported in seconds (here at least the 20 ms slept), then reset."""
    import time

    from moe_engine.parallel.telemetry import TrafficMeter

    meter = TrafficMeter()
    with meter.measure(10, 20, on_cuda=False):
        time.sleep(0.02)
    with meter.measure(1, 2, on_cuda=False):
        pass
    stats = meter.read_and_reset()
    assert stats["seconds"] >= 0.02 and (stats["bytes_sent"], stats["bytes_received"], stats["calls"]) == (11, 22, 2)
    assert meter.read_and_reset() == {"bytes_sent": 0, "bytes_received": 0, "seconds": 0.0, "calls": 0}


# ---- the MMoE paper's synthetic data -------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 4])
def test_synthetic_samples_are_drawn_independently_of_the_task_directions(seed):
    """The inputs have their own random stream: no sample repeats the Gaussian draws the task directions
    u1, u2 came from (cosines of N(0, I_100) samples with a fixed unit vector are ~0.1, never near 1)."""
    from moe_engine.mtl.synthetic import make_synthetic_tasks, synthetic_tasks

    tasks = synthetic_tasks(0.5, d=100, seed=seed)
    x_ND, _ = make_synthetic_tasks(8, 0.5, d=100, seed=seed)
    cosines = (x_ND.double() / x_ND.double().norm(dim=1, keepdim=True)) @ tasks.u_2D.t()
    assert cosines.abs().max() < 0.6, cosines


# ---- generalist losses ---------------------------------------------------------------------------


@pytest.mark.parametrize("label_shape", [(2, 1), (1, 2)])
def test_generalist_losses_refuse_labels_of_another_shape_than_the_scores_rows(label_shape):
    """Regression scores (2,) with values (2, 1) would broadcast to a (2, 2) squared error and sum
    silently: the labels must be exactly (B_t,)."""
    from moe_engine.mtl.generalist.losses import task_loss_sums, task_metric_sums
    from moe_engine.mtl.generalist.model import GeneralistOutput
    from moe_engine.mtl.generalist.tasks import GeneralistTask

    task = GeneralistTask(name="length", kind="regression", modality="text", targets=(), metric="mse",
                          higher_is_better=False, chance=0.1, description="a regression task")
    out = GeneralistOutput({"length": torch.tensor([1.0, 2.0])}, torch.zeros(()), (), torch.zeros(0, dtype=torch.int64))
    batch = {"length": {"text": ["x", "y"], "value": torch.zeros(label_shape)}}
    for fn in (task_loss_sums, task_metric_sums):
        with pytest.raises(ValueError, match=r"value has shape \(\d, \d\): expected \(2,\)"):
            fn([task], out, batch)


# ---- workloads -----------------------------------------------------------------------------------


def test_count_routed_choices_counts_expert_0_skips_dropped_choices_and_adds_up():
    """(L, num_tasks, E) = (2, 2, 3), T = 4 tokens, K = 2: dropped choices (-1) are not counted, choices
    of expert 0 are; the counts add to what out_LXE already holds."""
    from moe_engine.workloads.base import count_routed_choices

    routings = [
        SimpleNamespace(experts_TK=torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1]])),
        SimpleNamespace(experts_TK=torch.tensor([[1, 0], [0, 1], [0, 2], [2, 1]])),
    ]
    out_LXE = torch.ones(2, 2, 3, dtype=torch.long)
    count_routed_choices(routings, torch.tensor([0, 0, 1, 1]), 2, 3, out_LXE)
    assert out_LXE.tolist() == [[[2, 2, 2], [2, 1, 2]], [[3, 3, 1], [2, 2, 3]]]


def test_classifier_forward_step_aligns_task_ids_with_the_routed_tokens_and_counts_absent_tasks(monkeypatch):
    """B = 5 examples of S = 1 + 24 tokens, 3 tasks, task 2 absent: routing_task_ids_T is the task of each
    routed row exactly as the model gave it to its routers (example-major), counts_T has all 3 tasks
    (0 for the absent one) and the absent task still has its zero loss sum (same graph on every rank)."""
    from moe_engine.config import ModelConfig, MoEConfig
    from moe_engine.mtl import model as model_module
    from moe_engine.mtl.model import MultiTaskTransformer
    from moe_engine.mtl.tasks import TaskSpec
    from moe_engine.parallel.runtime import DistributedRun
    from moe_engine.workloads.classifier import ClassifierWorkload

    seen = []
    real_context = model_module.RoutingContext
    monkeypatch.setattr(model_module, "RoutingContext", lambda **kw: seen.append(kw["task_ids_T"]) or real_context(**kw))
    torch.manual_seed(0)
    tasks = [TaskSpec(f"task{i}", 3, 1 / 3, "a test task") for i in range(3)]
    model = MultiTaskTransformer(ModelConfig(d_model=16, num_layers=2, num_heads=2, ffn_hidden=16, dropout=0.0),
                                 MoEConfig(num_experts=4, ffn_hidden=12), tasks, (8, 12))
    batch = {"pixels": torch.rand(5, 8, 12), "task": torch.tensor([1, 0, 1, 1, 0]), "label": torch.tensor([0, 1, 2, 0, 1])}
    workload = SimpleNamespace(task_names=[t.name for t in tasks])
    step = ClassifierWorkload.forward_step(workload, model, batch, DistributedRun(0, 1, 0, None), torch.device("cpu"))
    assert len(seen) == 1 and torch.equal(step.routing_task_ids_T, seen[0])
    assert all(r.experts_TK.shape[0] == step.routing_task_ids_T.numel() == step.num_tokens == 5 * 25 for r in step.routings)
    assert step.counts_T.tolist() == [2.0, 3.0, 0.0]
    assert set(step.loss_sums) == {"task0", "task1", "task2"} and step.loss_sums["task2"].item() == 0.0


def test_default_fine_tuning_refuses_the_checkpoints_tasks_in_another_order():
    """One head per task, by position: the same tasks reordered would put each task on another's head."""
    from moe_engine.workloads.base import Workload

    workload = SimpleNamespace(task_names=["digit", "parity"])
    state = {"w": torch.zeros(1)}
    assert Workload.adapt_pretrained_state(workload, None, state, ["digit", "parity"]) is state
    for pretrained in (["parity", "digit"], ["digit"], ["digit", "parity", "left"]):
        with pytest.raises(ValueError, match="fine-tunes on its checkpoint's own tasks"):
            Workload.adapt_pretrained_state(workload, None, state, pretrained)


def test_classifier_evaluate_reports_zero_not_nan_for_a_task_without_test_examples():
    """Test split of 6 examples of tasks 0 and 1 (3 tasks), batches of 4: task 2's accuracy and loss are 0
    (0 / max(0, 1)), the others are the means over their examples, and every routed choice is counted once."""
    import contextlib

    import datasets

    from moe_engine.config import ModelConfig, MoEConfig
    from moe_engine.mtl.model import MultiTaskTransformer
    from moe_engine.mtl.tasks import TaskSpec
    from moe_engine.parallel.runtime import DistributedRun
    from moe_engine.workloads.classifier import ClassifierWorkload

    torch.manual_seed(1)
    tasks = [TaskSpec(f"task{i}", 3, 1 / 3, "a test task") for i in range(3)]
    model = MultiTaskTransformer(ModelConfig(d_model=16, num_layers=2, num_heads=2, ffn_hidden=16, dropout=0.0),
                                 MoEConfig(num_experts=4, ffn_hidden=12), tasks, (8, 12)).eval()
    pixels, task, label = torch.rand(6, 8, 12), torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([0, 1, 2, 2, 1, 0])
    test = datasets.Dataset.from_dict({"pixels": pixels.numpy(), "task": task.numpy(), "label": label.numpy()})
    workload = SimpleNamespace(task_names=[t.name for t in tasks], data=SimpleNamespace(test=test),
                               cfg=SimpleNamespace(data=SimpleNamespace(eval_batch_size=4)))
    metrics, counts_LXE = ClassifierWorkload.evaluate(workload, model, DistributedRun(0, 1, 0, None), torch.device("cpu"),
                                                      contextlib.nullcontext, 4)
    assert metrics["accuracy_task2"] == 0.0 and metrics["loss_task2"] == 0.0
    with torch.no_grad():
        out = model(pixels, task)
    for t in (0, 1):
        rows = task == t
        logits = model.logits(out.features_BD[rows], t)
        assert metrics[f"accuracy_task{t}"] == pytest.approx((logits.argmax(-1) == label[rows]).float().mean().item())
        assert metrics[f"loss_task{t}"] == pytest.approx(torch.nn.functional.cross_entropy(logits, label[rows]).item(), rel=1e-5)
    assert counts_LXE.shape == (1, 3, 4) and counts_LXE[:, 2].sum() == 0
    assert counts_LXE.sum() == (out.routings[0].experts_TK >= 0).sum()
