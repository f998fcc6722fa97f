"""The training run's side of task-conditional routing: every router type trains from the config,
the task x expert telemetry reaches the log and the heatmaps, and AdaMV-MoE moves each task's k."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_engine.config import load_config
from moe_engine.mtl.gates import TaskGateRouter
from moe_engine.routing import ROUTER_TYPES
from moe_engine.train import Trainer
from test_train import TINY, read_rows


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("router_type", ROUTER_TYPES)
def test_every_router_type_trains_from_the_config(tmp_path: Path, router_type: str) -> None:
    trainer = Trainer(_cfg(tmp_path, f"moe.router.type={router_type}", "train.max_steps=4", "train.eval_every=4"))
    result = trainer.run()
    losses = [float(r["loss"]) for r in read_rows(tmp_path / "train.csv")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert result.tokens_per_expert_LE.sum() > 0
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == [
        "task_expert.json", "task_expert_layer0.png", "test_task_expert.json", "test_task_expert_layer0.png",
    ]


def test_routing_log_and_heatmaps_match_the_routed_tokens(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "moe.router.type=mod_squad", "moe.router.task.mi_loss_coef=0.05", "logging.log_every=2")
    trainer = Trainer(cfg)
    result = trainer.run()
    rows = read_rows(tmp_path / "routing.csv")
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    tasks = trainer.data.task_names
    assert set(rows[0]) == {"step", "layer0/task_expert_mi"} | {
        f"layer0/{kind}/{t}" for t in tasks for kind in ("token_entropy", "usage_entropy")
    }
    summary = json.loads((tmp_path / "routing" / "task_expert.json").read_text())
    assert summary["task_names"] == list(tasks) and len(summary["layers"]) == 1
    counts_XE = torch.tensor(summary["layers"][0]["counts"])
    tokens_X = torch.tensor(summary["layers"][0]["tokens"])
    # Every training token of every step was counted, with its K choices, under its own task.
    torch.testing.assert_close(counts_XE.sum(1), tokens_X * cfg.moe.router.top_k, check_dtype=False)
    tokens_per_example = trainer.model.pos_embed.shape[0]
    assert tokens_X.sum() == cfg.train.max_steps * cfg.data.batch_size * tokens_per_example
    utilisation_XE = torch.tensor(summary["layers"][0]["utilisation"])
    torch.testing.assert_close(utilisation_XE, counts_XE / counts_XE.sum(1, keepdim=True), check_dtype=False)
    # The end-of-run test-split heatmaps show the final evaluation's counts.
    test_summary = json.loads((tmp_path / "routing" / "test_task_expert.json").read_text())
    assert torch.tensor(test_summary["layers"][0]["counts"]).long().tolist() == result.tokens_per_task_expert_LXE[0].tolist()
    from PIL import Image

    with Image.open(tmp_path / "routing" / "task_expert_layer0.png") as image:
        assert image.width > 200 and image.height > 100


def _script_validation_losses(monkeypatch: pytest.MonkeyPatch, trainer: Trainer, losses, then) -> list[int]:
    """Make trainer.evaluate report each evaluation's per-task validation losses from `losses` (one list
    per evaluation), then `then`, with everything else real. Returns the steps it is called at."""
    script, evaluate, calls = iter(losses), trainer.evaluate, []

    def scripted_evaluate():
        metrics, counts = evaluate()
        calls.append(trainer.step)
        metrics.update({f"loss_{name}": loss for name, loss in zip(trainer.data.task_names, next(script, then))})
        return metrics, counts

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    return calls


def test_adaptive_k_follows_the_validation_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(
        tmp_path, "moe.router.type=task_gate", "moe.router.top_k=3", "moe.router.task.adaptive_k=true",
        "train.eval_every=2", "train.max_steps=8",
    )
    trainer = Trainer(cfg)
    router = trainer.model.moe_layers[0].router
    assert isinstance(router, TaskGateRouter) and router.task_top_k_X.tolist() == [3, 3, 3, 3]
    # Scripted validation losses per evaluation: task 0 keeps improving (k falls to k_min), task 1
    # stalls (k rises back to top_k after falling once), tasks 2 and 3 stay flat.
    script = [[1.0, 1.0, 1.0, 1.0], [0.5, 0.9, 1.0, 1.0], [0.2, 0.95, 1.0, 1.0], [0.1, 0.97, 1.0, 1.0]]
    _script_validation_losses(monkeypatch, trainer, script, then=[1.0] * 4)
    trainer.run()
    rows = read_rows(tmp_path / "eval.csv")
    ks = [[int(float(r[f"top_k_{t}"])) for t in trainer.data.task_names] for r in rows]
    # First validation sets the baselines; then improvement lowers k, a stall (patience 1) raises it.
    # The last evaluation (step 8 = max_steps) moves nothing: the final results are measured with the
    # k the model trained with (its scripted loss 0.1 would otherwise keep task 0 at k_min anyway).
    assert ks == [[3, 3, 3, 3], [2, 2, 3, 3], [1, 3, 3, 3], [1, 3, 3, 3]]
    assert router.task_top_k_X.tolist() == [1, 3, 3, 3]
    assert trainer.model.moe_layers[0].router.task_top_k_X.tolist() == trainer.model.moe_layers[-1].router.task_top_k_X.tolist()


def test_the_final_results_are_those_of_the_last_evaluation_with_the_trained_k(tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg(tmp_path, "moe.router.type=task_gate", "moe.router.top_k=3", "moe.router.task.adaptive_k=true",
               "train.eval_every=2", "train.max_steps=8")
    trainer = Trainer(cfg)
    # Flat losses keep every k at 3; the last evaluation shows task 1 improving, which would lower its k.
    calls = _script_validation_losses(monkeypatch, trainer, [[1.0] * 4] * 3 + [[1.0, 0.5, 1.0, 1.0]], then=[1.0] * 4)
    result = trainer.run()
    assert calls == [2, 4, 6, 8]  # the step-8 evaluation is the final one, not repeated
    assert all(layer.router.task_top_k_X.tolist() == [3, 3, 3, 3] for layer in trainer.model.moe_layers)
    assert result.eval_metrics[f"loss_{trainer.data.task_names[1]}"] == 0.5
    last = read_rows(tmp_path / "eval.csv")[-1]
    assert [int(float(last[f"top_k_{t}"])) for t in trainer.data.task_names] == [3, 3, 3, 3]


def test_routing_telemetry_can_be_switched_off(tmp_path: Path) -> None:
    Trainer(_cfg(tmp_path, "logging.routing_telemetry=false", "train.max_steps=2")).run()
    assert not (tmp_path / "routing.csv").exists() and not (tmp_path / "routing").exists()


@pytest.mark.parametrize("share", [False, True])
def test_experts_in_attention_train_and_share_the_ffn_routing(tmp_path: Path, share: bool) -> None:
    cfg = _cfg(
        tmp_path, "moe.router.type=attribute", "model.moe_attention=true", f"model.share_routing={str(share).lower()}",
        "train.max_steps=4", "train.eval_every=4",
    )
    trainer = Trainer(cfg)
    model = trainer.model
    block = model.blocks[1]
    assert block.moe_attention and block.moe_ffn and block.share_routing == share
    assert (block.ffn.router is block.attn.router) == share
    # One routing decision for the shared block, two (attention, then FFN) otherwise.
    assert model.routers == ([block.attn.router] if share else [block.attn.router, block.ffn.router])
    batch = next(iter(trainer.batches))
    out = model(batch["pixels"], batch["task"])
    assert len(out.routings) == len(model.routers)
    result = trainer.run()
    losses = [float(r["loss"]) for r in read_rows(tmp_path / "train.csv")]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.tokens_per_expert_LE.shape == (len(model.routers), cfg.moe.num_experts)
    assert len(list((tmp_path / "routing").glob("task_expert_layer*.png"))) == len(model.routers)
    assert len(list((tmp_path / "routing").glob("test_task_expert_layer*.png"))) == len(model.routers)
    # The attention experts are trained: their query projections got gradients.
    assert block.attn.w_q.grad is not None and block.attn.w_q.grad.abs().sum() > 0



def _check_router_parameter_sharing(tmp_path: Path, overrides: list[str]) -> tuple[int, int]:
    """(per-task, shared) router parameter counts of the trainer's model, after checking both kinds:
    on a per-task gate the tasks' gradients have disjoint supports (task t's loss reaches only its own
    rows, so it would add to the Gram's diagonal only), on a shared one two tasks' gradients meet."""
    trainer = Trainer(_cfg(tmp_path, *overrides, "mtl.weighting=mgda"))
    shared = {id(p) for p in trainer.shared_params}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    router_params = [p for router in trainer.model.routers for p in router.parameters()]
    fwd = trainer.workload.forward_step(trainer.model, next(trainer.batches), trainer.run_info, torch.device("cpu"))
    grads = [torch.autograd.grad(fwd.loss_sums[name], router_params, retain_graph=True, allow_unused=True)
             for name in trainer.task_names]
    pairs = [(s, t) for s in range(len(grads)) for t in range(s)]
    for i, param in enumerate(router_params):
        rows = [g[i] if g[i] is not None else torch.zeros_like(param) for g in grads]
        assert any(r.abs().sum() > 0 for r in rows), names[id(param)]
        overlap = [float((rows[s] * rows[t]).abs().max()) for s, t in pairs]
        if id(param) in shared:
            assert max(overlap) > 0, names[id(param)]
        else:
            assert max(overlap) == 0, names[id(param)]
    num_shared = sum(id(p) in shared for p in router_params)
    return len(router_params) - num_shared, num_shared


@pytest.mark.parametrize("overrides", [
    ["moe.router.type=task_gate", "moe.router.task.noise=learned"],
    ["moe.router.type=mod_squad"],
    ["moe.router.type=dselect_k"],
    ["moe.router.type=dselect_k", "moe.router.task.dselect_gate=per_example"],
    ["moe.router.type=task_level"],
    ["moe.router.type=task_level", "moe.router.task.task_level_gate=embedding_mlp"],
], ids=lambda o: "-".join(v.split("=")[1] for v in o))
def test_per_task_gates_are_not_shared_parameters_for_gradient_weighting(tmp_path: Path, overrides) -> None:
    per_task, _ = _check_router_parameter_sharing(tmp_path, overrides)
    assert per_task > 0


def test_the_concat_gate_stays_shared(tmp_path: Path) -> None:
    # Its token columns are read by every task (its task columns are per task, in the same tensor).
    overrides = ["moe.router.type=task_gate", "moe.router.task.gate_mode=concat"]
    assert _check_router_parameter_sharing(tmp_path, overrides) == (0, 1)


def test_a_partial_run_reports_the_model_it_returns(tmp_path: Path, monkeypatch) -> None:
    # run(until_step) below max_steps: the evaluation at that step moves k, so the results are measured again.
    cfg = _cfg(tmp_path, "moe.router.type=task_gate", "moe.router.top_k=3", "moe.router.task.adaptive_k=true",
               "train.eval_every=2", "train.max_steps=8")
    trainer = Trainer(cfg)
    evaluate = trainer.evaluate
    _script_validation_losses(monkeypatch, trainer, [[1.0] * 4, [0.5] * 4], then=[0.4] * 4)  # k falls at step 4
    result = trainer.run(until_step=4)
    assert trainer.model.moe_layers[0].router.task_top_k_X.tolist() == [2, 2, 2, 2]
    assert torch.equal(result.tokens_per_task_expert_LXE, evaluate()[1])


def test_frozen_routers_keep_their_expert_bias_and_task_k(tmp_path: Path, monkeypatch) -> None:
    bias = ("moe.router.expert_bias_rate=0.05", "train.max_steps=2")
    Trainer(_cfg(tmp_path / "pre", *bias)).run()
    tuned = Trainer(_cfg(tmp_path / "ft", *bias, f"finetune.init_from={tmp_path / 'pre'}", "finetune.freeze=[routers]"))
    before = [layer.router.expert_bias.clone() for layer in tuned.model.moe_layers]
    assert any(b.abs().sum() > 0 for b in before)  # the pre-trained bias moved, and was loaded
    tuned.run()
    for layer, old in zip(tuned.model.moe_layers, before):
        assert torch.equal(layer.router.expert_bias, old)

    adaptive = ("moe.router.type=task_gate", "moe.router.top_k=3", "moe.router.task.adaptive_k=true",
                "train.eval_every=1", "train.max_steps=3")
    Trainer(_cfg(tmp_path / "pre_k", *adaptive[:3], "train.max_steps=1")).run()
    tuned = Trainer(_cfg(tmp_path / "ft_k", *adaptive, f"finetune.init_from={tmp_path / 'pre_k'}",
                         "finetune.freeze=[routers]"))
    _script_validation_losses(monkeypatch, tuned, [[1.0] * 4, [0.5] * 4, [0.2] * 4], then=[0.1] * 4)  # k would fall
    tuned.run()
    assert all(layer.router.task_top_k_X.tolist() == [3, 3, 3, 3] for layer in tuned.model.moe_layers)
