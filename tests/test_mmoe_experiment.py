"""Tests of moe_engine.mtl.synthetic (the MMoE paper's data) and moe_engine.mtl.mmoe_experiment.

The data is checked against the paper's recipe written out here; the experiment by a tiny run
(its files, table and progress lines) and by its config validation. The real default run, which
must reproduce the paper's ordering MMoE <= OMoE <= shared-bottom at p = 0.5, is marked slow:
`pytest tests/test_mmoe_experiment.py -m slow`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_engine.config import ConfigError
from moe_engine.mtl.mmoe_experiment import (
    ExperimentConfig,
    format_table,
    load_config,
    main,
    run_experiment,
    summarize,
)
from moe_engine.mtl.synthetic import NOISE_STD, make_synthetic_tasks, synthetic_tasks

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "mmoe_synthetic.yaml"

# Small enough for a few seconds: 2 correlations x 3 models x 1 seed.
TINY = dict(correlations=[1.0, 0.5], seeds=[0], steps=4, batch_size=16, num_train=64, num_test=32, d=10,
            num_experts=3, expert_hidden=4, tower_hidden=2)


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.7, -1.0])
def test_task_weights_follow_the_recipe(p):
    tasks = synthetic_tasks(p, d=100, c=2.5, m=10, seed=3)
    u1, u2 = tasks.u_2D
    torch.testing.assert_close(tasks.u_2D @ tasks.u_2D.t(), torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(tasks.w_2D[0], 2.5 * u1, atol=1e-12, rtol=0)
    torch.testing.assert_close(tasks.w_2D[1], 2.5 * (p * u1 + math.sqrt(1 - p * p) * u2), atol=1e-12, rtol=0)
    w1, w2 = tasks.w_2D
    assert abs(float(w1 @ w2 / (w1.norm() * w2.norm())) - p) < 1e-12
    assert tasks.alpha_M.shape == tasks.beta_M.shape == (10,)


def test_labels_follow_the_recipe():
    x, y = make_synthetic_tasks(4000, 0.9, d=20, m=5, seed=1)
    tasks = synthetic_tasks(0.9, d=20, m=5, seed=1)
    assert x.shape == (4000, 20) and y.shape == (4000, 2) and x.dtype == y.dtype == torch.float32
    x64 = x.double()
    noiseless = []
    for t in range(2):
        z = x64 @ tasks.w_2D[t]
        noiseless.append(z + sum(torch.sin(tasks.alpha_M[i] * z + tasks.beta_M[i]) for i in range(5)))
    residual = y.double() - torch.stack(noiseless, dim=1)
    # What is left is the N(0, 0.01) noise (plus the float32 rounding of x and y).
    assert abs(residual.mean().item()) < 0.01
    assert abs(residual.std().item() - NOISE_STD) < 0.01
    assert abs(x64.mean().item()) < 0.02 and abs(x64.std().item() - 1) < 0.02


def test_same_seed_same_tasks_and_samples():
    x_first, y_first = make_synthetic_tasks(10, 0.5, d=8, seed=4)
    x_again, y_again = make_synthetic_tasks(10, 0.5, d=8, seed=4)
    assert torch.equal(x_first, x_again) and torch.equal(y_first, y_again)
    x_other, _ = make_synthetic_tasks(10, 0.5, d=8, seed=5)
    assert not torch.equal(x_first, x_other)
    # Only p differs between the correlations of one seed: the same u, alpha, beta.
    a, b = synthetic_tasks(1.0, d=8, seed=4), synthetic_tasks(0.5, d=8, seed=4)
    assert torch.equal(a.u_2D, b.u_2D) and torch.equal(a.alpha_M, b.alpha_M) and torch.equal(a.beta_M, b.beta_M)


def test_label_correlation_falls_with_task_correlation():
    correlations = []
    for p in (1.0, 0.9, 0.5, 0.0):
        _, y = make_synthetic_tasks(20_000, p, seed=0)
        correlations.append(torch.corrcoef(y.t().double())[0, 1].item())
    assert correlations[0] > 0.99  # equal tasks up to the noise
    assert all(a > b for a, b in zip(correlations, correlations[1:])), correlations


@pytest.mark.parametrize("kwargs, match", [
    (dict(correlation=1.5), r"correlation = 1.5: expected a number in \[-1, 1\]"),
    (dict(correlation=-1.01), r"correlation = -1.01: expected a number in \[-1, 1\]"),
    (dict(correlation=float("nan")), r"correlation = nan: expected a number in \[-1, 1\]"),
    (dict(correlation=0.5, d=1), r"d = 1: expected an integer >= 2"),
    (dict(correlation=0.5, m=-1), r"m = -1: expected an integer >= 0"),
    (dict(correlation=0.5, c=float("inf")), r"c = inf: expected a finite number"),
    (dict(correlation=0.5, num_samples=0), r"num_samples = 0: expected an integer >= 1"),
])
def test_bad_data_arguments(kwargs, match):
    args = dict(num_samples=5, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        make_synthetic_tasks(args.pop("num_samples"), args.pop("correlation"), **args)


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def test_tiny_run_writes_results_plot_and_table(tmp_path):
    lines = []
    rng_before = torch.get_rng_state()
    threads = torch.get_num_threads()
    results = run_experiment(tmp_path / "out", progress=lines.append, **TINY)

    assert torch.equal(torch.get_rng_state(), rng_before) and torch.get_num_threads() == threads
    assert len(lines) == 6 and lines[0].startswith("[1/6] model=mmoe p=1 seed=0 test_mse=")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["records"]) == 6 and len(data["summary"]) == 6
    assert {(r["model"], r["p"], r["seed"]) for r in data["records"]} == {
        (m, p, 0) for m in ("mmoe", "omoe", "shared_bottom") for p in (1.0, 0.5)}
    for record in data["records"]:
        assert len(record["test_mse"]) == 2 and all(math.isfinite(v) and v > 0 for v in record["test_mse"])
        assert record["test_loss"] == pytest.approx(sum(record["test_mse"]) / 2)
        assert record["params"] > 0
    sizes = {r["model"]: r["params"] for r in data["records"]}
    assert sizes["omoe"] < sizes["mmoe"]
    assert abs(sizes["shared_bottom"] - sizes["mmoe"]) < 2 + 10 + 2 * 2  # within one unit of width
    for cell in data["summary"]:
        assert cell["runs"] == 1 and cell["std"] == 0.0
    assert data["config"]["steps"] == 4

    assert (tmp_path / "out" / "mmoe_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = results.table.splitlines()
    assert rows[0].split() == ["p", "mmoe", "omoe", "shared_bottom"]
    assert [row.split()[0] for row in rows[2:]] == ["1", "0.5"]
    assert all(row.count("±") == 3 for row in rows[2:])


def test_runs_are_reproducible(tmp_path):
    settings = TINY | dict(correlations=[0.9], models=["mmoe"])
    first = run_experiment(tmp_path / "a", progress=None, **settings).records
    second = run_experiment(tmp_path / "b", progress=None, **settings).records
    assert [r["test_mse"] for r in first] == [r["test_mse"] for r in second]


def test_summary_and_table():
    records = [
        {"model": "mmoe", "p": 0.5, "seed": s, "test_mse": [v, v], "test_loss": v} for s, v in enumerate([1.0, 2.0, 3.0])
    ]
    summary = summarize(records)
    assert summary["mmoe"][0.5]["mean"] == pytest.approx(2.0) and summary["mmoe"][0.5]["std"] == pytest.approx(1.0)
    assert summary["mmoe"][0.5]["mean_per_task"] == pytest.approx([2.0, 2.0]) and summary["mmoe"][0.5]["runs"] == 3
    assert format_table(summary, ["mmoe"], [0.5]).splitlines()[2].split() == ["0.5", "2.0000", "±", "1.0000"]


def test_summary_keeps_each_tasks_mean_and_separates_models_and_correlations():
    """mean_per_task averages each task's test MSE over the seeds, task by task (the two tasks'
    errors differ); cells are per (model, p)."""
    records = [
        {"model": "mmoe", "p": 0.5, "seed": 0, "test_mse": [1.0, 4.0], "test_loss": 2.5},
        {"model": "mmoe", "p": 0.5, "seed": 1, "test_mse": [3.0, 8.0], "test_loss": 5.5},
        {"model": "omoe", "p": 0.5, "seed": 0, "test_mse": [5.0, 7.0], "test_loss": 6.0},
        {"model": "mmoe", "p": 1.0, "seed": 0, "test_mse": [0.5, 1.5], "test_loss": 1.0},
    ]
    summary = summarize(records)
    assert summary["mmoe"][0.5]["mean_per_task"] == pytest.approx([2.0, 6.0])
    assert summary["mmoe"][0.5]["mean"] == pytest.approx(4.0) and summary["mmoe"][0.5]["runs"] == 2
    assert summary["omoe"][0.5]["mean_per_task"] == pytest.approx([5.0, 7.0]) and summary["omoe"][0.5]["std"] == 0.0
    assert summary["mmoe"][1.0]["mean_per_task"] == pytest.approx([0.5, 1.5])


@pytest.mark.parametrize("top_k", [None, 1, 8])
def test_top_k_from_one_to_num_experts_is_accepted(top_k):
    """top_k = num_experts (every expert, sparse gates renormalised over all of them) is allowed."""
    assert ExperimentConfig(top_k=top_k, num_experts=8).top_k == top_k


def test_main_reads_the_config_and_prints_the_table(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in (TINY | dict(models=["omoe", "shared_bottom"])).items()))
    assert main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("model=") == 4
    assert "results:" in out and (tmp_path / "run" / "results.json").exists()
    table_header = [line for line in out.splitlines() if line.split()[:1] == ["p"]]
    assert table_header and table_header[0].split() == ["p", "omoe", "shared_bottom"]


def test_shipped_config_is_the_default():
    assert load_config(CONFIG_PATH) == ExperimentConfig()


@pytest.mark.parametrize("text, match", [
    ("steps: 10\nlearning_rate: 0.1\n", r"unknown key 'learning_rate'; allowed: correlations, models, seeds, steps"),
    ("correlations: [1.0, 1.5]\n", r"correlations = \[1.0, 1.5\]: entry 1.5 is not a number in \[-1, 1\]"),
    ("correlations: 0.5\n", r"correlations = 0.5: expected a non-empty list"),
    ("correlations: []\n", r"correlations = \[\]: expected a non-empty list"),
    ("seeds: [0, 0]\n", r"seeds = \[0, 0\]: expected no repeated entries"),
    ("seeds: [-1]\n", r"seeds = \[-1\]: entry -1 is not an integer >= 0"),
    ("models: [mmoe, mlp]\n", r"models = \['mmoe', 'mlp'\]: entry 'mlp' is not one of mmoe, omoe, shared_bottom"),
    ("steps: 0\n", r"steps = 0: expected an integer >= 1"),
    ("batch_size: 1.5\n", r"batch_size = 1.5: expected an integer >= 1"),
    ("num_train: true\n", r"num_train = True: expected an integer >= 1"),
    ("lr: -0.1\n", r"lr = -0.1: expected a number > 0"),
    ("lr: fast\n", r"lr = 'fast': expected a number > 0"),
    ("lr_schedule: step\n", r"lr_schedule = 'step': allowed: constant, cosine"),
    ("d: 1\n", r"d = 1: expected an integer >= 2"),
    ("m: -2\n", r"m = -2: expected an integer >= 0"),
    ("c: .inf\n", r"c = inf: expected a finite number"),
    ("top_k: 9\n", r"top_k = 9: expected null \(dense gates\) or an integer in \[1, num_experts = 8\]"),
    ("num_threads: 0\n", r"num_threads = 0: expected null"),
    ("- steps\n", r"expected a mapping of settings, got list"),
    ("steps: [1\n", r"is not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the experiment config .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_run_experiment_validates_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"correlations = \[2.0\]: entry 2.0 is not a number in \[-1, 1\]"):
        run_experiment(tmp_path, correlations=(2.0,))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_default_run_reproduces_the_paper_ordering(tmp_path):
    results = run_experiment(tmp_path, **vars(load_config(CONFIG_PATH)))
    print("\n" + results.table)
    at_half = {model: results.summary[model][0.5]["mean"] for model in ("mmoe", "omoe", "shared_bottom")}
    assert at_half["mmoe"] <= at_half["omoe"] <= at_half["shared_bottom"], at_half


def test_cli_subcommand_runs_the_experiment(tmp_path, capsys):
    from moe_engine import cli

    config = tmp_path / "tiny.yaml"
    config.write_text("correlations: [0.5]\nseeds: [0]\nsteps: 3\nnum_train: 64\nnum_test: 32\nbatch_size: 16\nd: 8\n")
    assert cli.main(["mmoe-synthetic", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "mmoe" in out and "shared_bottom" in out and "0.5" in out
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "mmoe_synthetic.png").is_file()
    assert cli.main(["mmoe-synthetic", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "mmoe-synthetic: config error" in capsys.readouterr().err
