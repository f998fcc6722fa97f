"""In-process tests of moe_engine.cli's pieces: the end-of-run report, the baselines file and
Delta_p, and the configs `moe-engine baselines` builds. No training: the trainer and its result
are stand-ins (tests/test_cli.py runs the real commands end to end)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_engine import cli
from moe_engine.config import Config, load_config
from moe_engine.mtl.delta_p import delta_p

TASKS = ["digit", "left"]


def fake_trainer(tmp_path: Path) -> SimpleNamespace:
    workload = SimpleNamespace(
        chance=lambda: {"digit": 0.1, "left": 0.5},
        descriptions=lambda: {},
        primary_metrics=lambda: {"digit": "accuracy", "left": "accuracy"},
        metric_directions=lambda: {"accuracy": True},
    )
    return SimpleNamespace(
        workload=workload, run_info=SimpleNamespace(world_size=1), device=torch.device("cpu"), frozen=None,
        model=SimpleNamespace(routers=[]), task_names=TASKS, out_dir=tmp_path,
    )


def fake_result(counts_LXE: torch.Tensor, digit: float = 0.8, left: float = 0.6) -> SimpleNamespace:
    return SimpleNamespace(
        step=5, wall_seconds=1.0, eval_metrics={"accuracy_digit": digit, "accuracy_left": left},
        tokens_per_task_expert_LXE=counts_LXE, tokens_per_expert_LE=counts_LXE.sum(1),
    )


def test_report_imbalance_is_max_over_mean_per_layer(tmp_path: Path) -> None:
    """`max/mean` of the tokens-per-expert lines: the busiest expert against the mean of the layer's
    experts (1.00 when balanced), not against the layer's total."""
    counts_LXE = torch.tensor([[[20, 10, 0, 0], [10, 0, 0, 0]], [[5, 5, 5, 5], [5, 5, 5, 5]]])  # (2 layers, 2 tasks, 4 experts)
    report = cli.format_report(load_config(None, ["moe.num_experts=4"]), fake_trainer(tmp_path), fake_result(counts_LXE))
    lines = report.splitlines()
    assert next(line for line in lines if line.startswith("moe layer 0:")).endswith("max/mean 3.00")
    assert next(line for line in lines if line.startswith("moe layer 1:")).endswith("max/mean 1.00")


def test_task_expert_lines_list_only_the_experts_a_task_uses() -> None:
    """Per layer and task: the number of experts the task's tokens went to and their shares; an
    expert with no choice of the task is not listed (nor counted), and a task without tokens has none."""
    counts_LXE = torch.tensor([[[3, 1, 0, 0], [0, 0, 0, 0]], [[0, 0, 2, 2], [1, 1, 1, 1]]])
    lines = cli._task_expert_lines(TASKS, counts_LXE)[1:]
    assert [line.split() for line in lines] == [
        ["moe", "layer", "0", "digit", "2", "experts", "0:75%", "1:25%"],
        ["moe", "layer", "0", "left", "0", "experts"],
        ["moe", "layer", "1", "digit", "2", "experts", "2:50%", "3:50%"],
        ["moe", "layer", "1", "left", "4", "experts", "0:25%", "1:25%", "2:25%", "3:25%"],
    ]


def test_baselines_of_some_of_the_tasks_give_delta_p_over_those(tmp_path: Path) -> None:
    """A baselines file needs one of the run's tasks, not all: Delta_p is then over the tasks both have."""
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps({"results": {"digit": {"accuracy": 0.5}, "other": {"accuracy": 0.9}}}))
    baselines = cli.read_baselines(str(path), TASKS)
    assert set(baselines) == {"digit", "other"}
    delta = cli.delta_against(baselines, str(path), fake_trainer(tmp_path), fake_result(torch.zeros(1, 2, 4)))
    assert delta["tasks"] == ["digit"]
    assert delta["delta_p"] == pytest.approx(delta_p({"digit": {"accuracy": 0.5}}, {"digit": {"accuracy": 0.8}}, {"digit": True}))
    assert delta["delta_p"] == pytest.approx(60.0)


def test_baselines_train_each_task_without_the_mixing_weights(seen_configs: list[Config], tmp_path: Path) -> None:
    """A single-task run has nothing to mix: fixed mixing weights (one per task of the joint run) are
    dropped from each task's config instead of failing its validation."""
    code = cli.main([
        "baselines", "--set", "model.architecture=generalist", "--set", "data.name=generalist",
        "--set", "data.tasks=[digit, caption]", "--set", "data.mixing=fixed",
        "--set", "data.mixing_weights={digit: 2.0, caption: 1.0}", "--set", f"train.out_dir={tmp_path}",
    ])
    assert code == 2  # the stand-in Trainer's refusal
    (cfg,) = seen_configs
    assert cfg.data.tasks == ["digit"] and cfg.data.mixing_weights is None and cfg.data.mixing == "size"
