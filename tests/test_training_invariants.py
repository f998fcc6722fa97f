"""Invariants of checkpointing, the training loop, logging, HF conversion and fine-tuning that no
other test pinned down: each test here kills a mutant (a plausible one-line bug) that the rest of the
suite let through (mutation testing, 2026-12-01: 53 mutants of checkpoint, sharding, train, metrics,
telemetry, hf, finetune, delta_p, runtime and groups; 17 real survivors). The comment above each test
names the code it guards.

All CPU, no network, a few seconds each.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointMismatchError,
    config_mismatches,
    expert_shard_file,
    read_expert_shard,
)
from moe_engine.config import load_config
from moe_engine.metrics import MetricsLogger
from moe_engine.parallel.telemetry import TrafficMeter
from moe_engine.train import Trainer

# The tiny classifier run of tests/test_train.py, and the tiny generalist run (MoE attention on) of
# tests/test_generalist_train.py.
from test_generalist_train import TINY as GENERALIST  # noqa: E402
from test_train import TINY  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(None, [*TINY, f"train.out_dir={tmp_path}", *overrides]))


def _grad_norm(model: torch.nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))


# Beside tests/test_train.py: (checkpoint checks)
@pytest.mark.parametrize(
    "override, field",
    [("moe.router.top_k=1", "moe.router.top_k"), ("moe.activation=gelu", "moe.activation"),
     ("data.tasks=[parity,digit,left,right]", "data.tasks")],  # heads in another order: same shapes
)
def test_structural_fields_that_keep_tensor_shapes_are_still_mismatches(override: str, field: str) -> None:
    """top_k, the activation and the task order leave every tensor's shape alone: the config check refuses
    them by name, before any state is touched."""
    saved = load_config(None, TINY).to_dict()
    current = load_config(None, [*TINY, override]).to_dict()
    problems = config_mismatches(saved, current)
    assert [p.split(":")[0] for p in problems] == [field]


# Beside tests/test_checkpoint_shards.py:
def test_an_expert_shard_of_another_step_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    shard = {"format_version": FORMAT_VERSION, "step": 3, "ep_rank": 1, "ep_size": 2,
             "expert_ids": {"w": [2, 3]}, "model": {"w": torch.zeros(2, 3)}, "optimizer": {}}
    torch.save(shard, folder / expert_shard_file(1, 2))
    with pytest.raises(CheckpointMismatchError, match=r"at step 3, expected rank 1 of 2 at step 4"):
        read_expert_shard(folder, 1, 2, step=4)
    assert read_expert_shard(folder, 1, 2, step=3)["step"] == 3
    assert read_expert_shard(folder, 1, 2)["step"] == 3


# Beside tests/test_train.py: (a new section: gradient clipping)
@pytest.mark.parametrize("clip", [1e-3, 1e3])
def test_gradients_are_clipped_to_grad_clip_and_the_logged_norm_is_the_l2_norm_before(tmp_path: Path, clip: float) -> None:
    trainer = _trainer(tmp_path, f"optim.grad_clip={clip}")
    metrics = trainer.train_step(next(trainer.batches))
    after = _grad_norm(trainer.model)  # the gradients the optimizer stepped with stay until the next step
    assert 1e-3 < metrics["grad_norm"] < 1e3
    if clip < metrics["grad_norm"]:
        assert after == pytest.approx(clip, rel=1e-3)
    else:  # below the limit: untouched, so the measured norm is theirs
        assert after == pytest.approx(metrics["grad_norm"], rel=1e-5)


# Beside tests/test_distributed_training.py: (or a unit test next to it)
def test_traffic_counts_bytes_sent_and_received() -> None:
    meters = [TrafficMeter(), TrafficMeter()]
    with meters[0].measure(1_000_000, 3_000_000, on_cuda=False):
        pass
    with meters[1].measure(500_000, 0, on_cuda=False):
        pass
    fake = SimpleNamespace(model=SimpleNamespace(moe_layers=[SimpleNamespace(dispatcher=SimpleNamespace(traffic=m)) for m in meters]))
    stats = Trainer._traffic(fake)
    assert stats["all_to_all_mb"] == pytest.approx(4.5)
    assert Trainer._traffic(fake)["all_to_all_mb"] == 0  # read and reset


# Beside tests/test_train.py: (metrics files)
def test_a_logger_that_must_not_clear_keeps_the_logs_of_rank_0(tmp_path: Path) -> None:
    """Ranks other than 0 open their logger with clear=False (no CSV, no TensorBoard): they must not
    delete the files rank 0 is writing."""
    (tmp_path / "train.csv").write_text("step,loss\n1,0.5\n")
    (tmp_path / "tensorboard").mkdir()
    MetricsLogger(tmp_path, csv_files=False, tensorboard=False, resume_step=None, clear=False).close()
    assert (tmp_path / "train.csv").read_text() == "step,loss\n1,0.5\n"
    assert (tmp_path / "tensorboard").is_dir()


# Beside tests/test_hf_convert.py:
def test_a_tied_checkpoint_with_its_own_output_projection_is_refused() -> None:
    """A tied config has no place for an lm_head that is not the embedding: dropping it silently
    would change the model's logits."""
    import transformers
    from moe_engine.hf import HFCheckpointMismatchError, import_hf

    config = transformers.AutoConfig.for_model(
        "olmoe", vocab_size=97, num_hidden_layers=1, num_experts_per_tok=2, hidden_size=16, intermediate_size=8,
        num_attention_heads=2, num_key_value_heads=2, num_experts=4, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = dict(hf.state_dict())
    import_hf(state, config)  # lm_head.weight present, and the embedding itself: fine
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(HFCheckpointMismatchError) as err:
        import_hf(state, config)
    assert err.value.unexpected == ["lm_head.weight"]




# Beside tests/test_generalist_train.py:
def test_the_experts_group_holds_attention_experts_and_shared_experts(tmp_path: Path) -> None:
    from moe_engine.finetune import parameter_groups
    from moe_engine.mtl.moe_attention import MoEAttention

    trainer = Trainer(load_config(None, [*GENERALIST, "moe.num_shared_experts=1", f"train.out_dir={tmp_path}"]))
    model = trainer.model
    groups = parameter_groups(model, trainer.workload.task_parameters(model))
    experts = {id(p) for p in groups["experts"]}
    attention = [m for m in model.modules() if isinstance(m, MoEAttention)]
    assert attention and all(id(m.w_q) in experts and id(m.w_o) in experts for m in attention)
    shared = [p for m in model.modules() if isinstance(getattr(m, "shared_experts", None), torch.nn.Module)
              for p in m.shared_experts.parameters()]
    assert shared and all(id(p) in experts for p in shared)
    backbone = {id(p) for p in groups["backbone"]}
    assert not experts & backbone


# Beside tests/test_train.py: (checkpoints)
@pytest.mark.parametrize("keep", [1, 2])
def test_pruning_keeps_exactly_the_newest_keep_checkpoints(tmp_path: Path, keep: int) -> None:
    from moe_engine.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, keep=keep)
    for step in (2, 4, 6, 8):
        manager.save({"x": torch.tensor(step)}, step)
    assert [p.name for p in manager.list()] == [f"step_{s:08d}.pt" for s in (2, 4, 6, 8)[-keep:]]


# Beside tests/test_expert_bias.py:
def test_each_router_moves_its_bias_by_its_own_layers_counts(tmp_path: Path) -> None:
    """Two MoE layers (moe_every=1): layer l's counts update layer l's router, not another's."""
    rate = 0.01
    trainer = _trainer(tmp_path, "model.moe_every=1", f"moe.router.expert_bias_rate={rate}")
    routers = [layer.router for layer in trainer.model.moe_layers]
    assert len(routers) == 2
    batch = next(trainer.batches)
    with torch.no_grad():
        out = trainer.model(batch["pixels"], batch["task"])
    counts = [torch.bincount(r.experts_TK.flatten(), minlength=4).float() for r in out.routings]
    expected = [rate * torch.sign(c.mean() - c) for c in counts]
    assert not torch.equal(expected[0], expected[1])  # the two layers route differently
    trainer.train_step(batch)
    for router, bias in zip(routers, expected):
        torch.testing.assert_close(router.expert_bias, bias)


# Beside tests/test_train.py: (or tests/test_train_routing.py next to the partial-run test)
def test_a_partial_run_between_evaluations_reports_the_model_it_returns(tmp_path: Path) -> None:
    """run(until_step=6) with evaluations every 4 steps: the results are those of the step-6 model,
    not the step-4 evaluation."""
    trainer = _trainer(tmp_path)
    result = trainer.run(until_step=6)
    assert result.step == 6
    metrics, counts = trainer.evaluate()
    assert result.eval_metrics == metrics
    assert torch.equal(result.tokens_per_task_expert_LXE, counts)



# Beside tests/test_generalist_train.py: (next to test_finetune_adds_a_task_and_freezes_groups)
def test_load_pretrained_weights_names_the_new_tasks(tmp_path: Path) -> None:
    from moe_engine.finetune import load_pretrained_weights

    source = tmp_path / "pre"
    Trainer(load_config(None, [*GENERALIST, "data.tasks=[digit,sum]", "train.max_steps=2", f"train.out_dir={source}"])).run()
    trainer = Trainer(load_config(None, [*GENERALIST, "data.tasks=[compare,sum]", f"train.out_dir={tmp_path / 'ft'}"]))
    info = load_pretrained_weights(trainer.model, trainer.workload, source, None, "generalist")
    assert info["pretrained_tasks"] == ["digit", "sum"]
    assert info["new_tasks"] == ["compare"]


# Beside tests/test_train.py: (loss weighting in the loop); the multi-rank check of the same reduction,
# test_distributed_training.py::test_loss_weighting_under_expert_parallelism_follows_one_process[uncertainty],
# is marked slow (about 8 s), so the default run never exercises it.
def test_weighting_gradients_are_summed_over_ranks_before_their_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moe_engine.train as train_module
    from moe_engine.parallel.runtime import DistributedRun

    trainer = _trainer(tmp_path, "mtl.weighting=uncertainty")
    params = [p for group in trainer.weighting_optimizer.param_groups for p in group["params"]]
    assert params
    for p in params:
        p.grad = torch.ones_like(p)
    # Two ranks with the same gradients: their sum is twice this rank's.
    monkeypatch.setattr(train_module, "all_reduce_sum", lambda values, run: values * 2)
    seen = []
    step = trainer.weighting_optimizer.step
    monkeypatch.setattr(trainer.weighting_optimizer, "step", lambda *a, **k: (seen.append([p.grad.clone() for p in params]), step(*a, **k))[1])
    task = SimpleNamespace(global_losses_T=torch.ones(len(trainer.task_names)),
                           present_T=torch.ones(len(trainer.task_names), dtype=torch.bool))
    trainer._weighting_step(task, DistributedRun(0, 2, 0, None))
    assert len(seen) == 1 and all(torch.equal(g, torch.full_like(g, 2.0)) for g in seen[0])


def _train_ep2_on_ranks(rank: int, world_size: int, out_dir: str) -> None:
    Trainer(load_config(None, [*TINY, "train.max_steps=3", "train.eval_every=1000", "train.checkpoint_every=1000",
                               "parallel.dispatcher=all_to_all", "parallel.expert_parallel_size=2",
                               f"train.out_dir={out_dir}"])).run()


# Beside tests/test_distributed_training.py: (as an assertion in test_parallel_run_follows_the_single_process_run[ep2_*])
def test_rank_imbalance_of_an_expert_parallel_run_is_over_ranks_not_experts(tmp_path: Path) -> None:
    """World 2, EP 2, E 4 (one replica): each rank's load is its block of 2 experts, so the rank ratio lies
    between 1 and the expert ratio, and is above 1 when the ranks compute different numbers of rows
    (measured over one rank per replica, it would read 1.0 whatever the load)."""
    import csv
    import sys

    tests_dir = Path(__import__("moe_engine").__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests_dir))
    from distributed import run_ranks

    run_ranks(2, _train_ep2_on_ranks, str(tmp_path))
    with (tmp_path / "train.csv").open() as f:
        rows = [(float(r["rank_imbalance"]), float(r["expert_imbalance"])) for r in csv.DictReader(f)]
    assert len(rows) == 3
    assert all(1.0 <= rank <= expert + 1e-9 for rank, expert in rows)
    assert any(rank > 1.0 + 1e-6 for rank, _ in rows)  # two ranks: one computes more rows than the other
