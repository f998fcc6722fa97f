"""The generalist workload through the trainer and the CLI: training, resume, fine-tuning with
new tasks and frozen groups, single-task baselines and Delta_p, and loss weighting in the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_engine import cli
from moe_engine.checkpoint import CheckpointMismatchError, read_model_state
from moe_engine.config import ConfigError, load_config
from moe_engine.finetune import parameter_groups
from moe_engine.parallel.runtime import DistributedRun
from moe_engine.train import Trainer

TINY = [
    "model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption,sum,text_parity]",
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16", "model.dropout=0.0",
    "model.moe_attention=true", "model.share_routing=true", "model.max_text_len=16",
    "moe.num_experts=4", "moe.ffn_hidden=16", "moe.router.type=attribute", "moe.router.aux_loss_coef=0.0",
    "optim.warmup_steps=0", "optim.schedule=constant",
    "data.batch_size=16", "data.eval_batch_size=64", "data.pairs_per_task=60", "data.eval_fraction=0.2",
    "train.max_steps=4", "train.eval_every=1000", "train.checkpoint_every=2", "train.num_threads=1",
    "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
]


def _cfg(out_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"train.out_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Trainer]:
    out_dir = tmp_path_factory.mktemp("pretrained")
    trainer = Trainer(_cfg(out_dir))
    trainer.run()
    return out_dir, trainer


def test_generalist_trains_and_reports_every_task_metric(pretrained) -> None:
    out_dir, trainer = pretrained
    metrics, counts_LXE = trainer.evaluate()
    assert {"accuracy_digit", "recall@1_caption", "mse_sum", "accuracy_text_parity"} <= set(metrics)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    # Every task's tokens were routed somewhere in every routing decision (attention's, shared by the FFN).
    assert counts_LXE.shape == (len(trainer.model.routers), 4, 4)
    assert (counts_LXE.sum(-1) > 0).all()
    assert (out_dir / "checkpoints" / "step_00000004.pt").is_file()


def test_evaluation_metrics_are_each_test_splits_own(pretrained) -> None:
    """evaluate() walks each test split in batches of 64 (200 rows: a short last batch); its metric
    and loss per task are the means over the split's examples of one forward over the whole split."""
    import torch.nn.functional as F

    _, trainer = pretrained
    metrics, _ = trainer.evaluate()
    model, data = trainer.model.eval(), trainer.workload.data
    for task in data.tasks:
        split = data.test[task.name][:]
        assert len(data.test[task.name]) % 64 != 0
        with torch.no_grad():
            scores = model({task.name: split}).scores[task.name]
        labels = split[task.label_column]
        if task.kind == "regression":
            metric = loss = (scores - labels).square().mean()
        else:
            metric = (scores.argmax(-1) == labels).float().mean()
            loss = F.cross_entropy(scores, labels)
        assert metrics[f"{task.metric}_{task.name}"] == pytest.approx(metric.item(), rel=1e-4, abs=1e-6), task.name
        assert metrics[f"loss_{task.name}"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6), task.name


def test_freezing_the_backbone_leaves_every_per_task_parameter_training(pretrained) -> None:
    """Task prompts and the regression heads (weights and biases) are task parameters: they always train."""
    from moe_engine.finetune import freeze_groups

    _, trainer = pretrained
    model = trainer.workload.build_model(None)
    freeze_groups(model, trainer.workload, ["backbone"])
    assert all(p.requires_grad for p in (model.task_prompt, model.regression_weight, model.regression_bias))
    assert not model.logit_scale.requires_grad and not model.norm.weight.requires_grad


def _as_older_file(path: Path, trainer: Trainer) -> None:
    """Rewrite a checkpoint as files saved before logit_scale became (1,) were: a 0-dim parameter
    with 0-dim Adam moments."""
    saved = torch.load(path, weights_only=False)
    saved["model"]["logit_scale"] = saved["model"]["logit_scale"].reshape(())
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    index = next(i for i, p in enumerate(params) if p is trainer.model.logit_scale)
    moments = saved["optimizer"]["state"][index]
    assert moments["exp_avg"].shape == (1,)
    saved["optimizer"]["state"][index] = {k: v if k == "step" else v.reshape(()) for k, v in moments.items()}
    torch.save(saved, path)


@pytest.mark.parametrize("older_file", [False, True], ids=["current", "scalar-logit-scale-file"])
def test_generalist_resume_is_exact(older_file: bool, tmp_path: Path) -> None:
    whole = Trainer(_cfg(tmp_path / "whole"))
    whole.run()
    first = Trainer(_cfg(tmp_path / "split"))
    first.run(until_step=2)
    if older_file:
        _as_older_file(tmp_path / "split" / "checkpoints" / "step_00000002.pt", first)
    resumed = Trainer(_cfg(tmp_path / "split"), resume="auto")
    assert resumed.step == 2
    resumed.run()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, whole.model.state_dict()[name], rtol=0, atol=0, msg=name)


def test_finetune_adds_a_task_and_freezes_groups(pretrained, tmp_path: Path) -> None:
    out_dir, _ = pretrained
    saved = read_model_state(out_dir)
    cfg = _cfg(
        tmp_path / "ft", "data.tasks=[compare,sum]", f"finetune.init_from={out_dir}", "finetune.freeze=[experts,routers]",
    )
    trainer = Trainer(cfg)
    model = trainer.model
    # Pre-trained task rows are kept by name; the new task starts at the mean of the pre-trained prompts.
    pretrained_tasks = ["digit", "caption", "sum", "text_parity"]
    torch.testing.assert_close(model.task_prompt[1], saved["task_prompt"][pretrained_tasks.index("sum")])
    torch.testing.assert_close(model.task_prompt[0], saved["task_prompt"].mean(0))
    # The new task's regression row is the mean of the pre-trained regression heads (only "sum").
    torch.testing.assert_close(model.regression_weight[0], saved["regression_weight"][2])
    shared = {k: v for k, v in saved.items() if k not in ("task_prompt", "regression_weight", "regression_bias")}
    for name, tensor in model.state_dict().items():
        if name in shared:
            torch.testing.assert_close(tensor, shared[name], rtol=0, atol=0, msg=name)
    groups = parameter_groups(model, trainer.workload.task_parameters(model))
    frozen = {id(p) for p in groups["experts"] + groups["routers"]}
    assert frozen and all(not p.requires_grad for p in groups["experts"] + groups["routers"])
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not frozen & in_optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.run()
    for name, p in model.named_parameters():
        if id(p) in frozen:
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if id(p) not in frozen)


def test_finetune_refuses_what_it_cannot_do(pretrained, tmp_path: Path) -> None:
    out_dir, trainer = pretrained
    with pytest.raises(ConfigError, match="finetune.freeze"):
        _cfg(tmp_path, "finetune.freeze=[experts]")  # freezing needs pre-trained weights
    with pytest.raises(ConfigError, match="allowed: experts, routers, backbone"):
        _cfg(tmp_path, f"finetune.init_from={out_dir}", "finetune.freeze=[heads]")
    # The multi-task classifier has one head per task: it fine-tunes on its checkpoint's own tasks only.
    classifier = ("data.name=digits", "model.architecture=multitask", "model.moe_attention=false",
                  "model.share_routing=false", "moe.router.type=softmax_topk", "data.pairs_per_task=100")
    source = tmp_path / "classifier"
    Trainer(_cfg(source, *classifier, "data.tasks=[digit,parity]", "train.max_steps=2")).run()
    with pytest.raises(ValueError, match="fine-tunes on its checkpoint's own tasks"):
        Trainer(_cfg(tmp_path / "ft", *classifier, "data.tasks=[digit,left]", f"finetune.init_from={source}"))
    # A checkpoint of the other architecture is named as such (not as mismatched tasks or tensors).
    with pytest.raises(CheckpointMismatchError, match="'generalist' checkpoint; this run builds model.architecture = 'multitask'"):
        Trainer(_cfg(tmp_path / "ft2", *classifier, "data.tasks=[digit,parity]", f"finetune.init_from={out_dir}"))
    with pytest.raises(CheckpointMismatchError, match="'multitask' checkpoint; this run builds model.architecture = 'generalist'"):
        Trainer(_cfg(tmp_path / "ft3", f"finetune.init_from={source}"))
    # Freezing every group and the task parameters leaves nothing to train.
    from moe_engine.finetune import freeze_groups

    fresh = Trainer(_cfg(tmp_path / "frozen", f"finetune.init_from={out_dir}"))
    for p in fresh.workload.task_parameters(fresh.model):
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing is left to train"):
        freeze_groups(fresh.model, fresh.workload, ["experts", "routers", "backbone"])


def test_cli_finetune_baselines_and_delta_p(pretrained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir, _ = pretrained
    sets = [a for o in TINY for a in ("--set", o)]
    base = tmp_path / "base"
    assert cli.main(["baselines", *sets, "--set", "data.tasks=[digit,sum]", "--set", f"train.out_dir={base}"]) == 0
    baselines = json.loads((base / "baselines.json").read_text())["results"]
    assert set(baselines) == {"digit", "sum"} and set(baselines["sum"]) == {"mse"}
    ft = tmp_path / "ft"
    code = cli.main([
        "finetune", "--from", str(out_dir), "--freeze", "experts", *sets, "--set", "data.tasks=[digit,sum]",
        "--set", f"train.out_dir={ft}", "--baselines", str(base / "baselines.json"),
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "frozen: experts" in out and "Delta_p against the single-task baselines" in out
    report = json.loads((ft / "results.json").read_text())
    assert report["finetune"] == {"init_from": str(out_dir), "freeze": ["experts"]}
    from moe_engine.mtl.delta_p import delta_p

    expected = delta_p(baselines, report["results"], {"digit": True, "sum": False})
    assert report["delta_p"] == pytest.approx(expected)
    # A missing, malformed or unrelated baselines file is refused before any training (no checkpoint written).
    assert cli.main(["finetune", *sets, "--set", f"train.out_dir={tmp_path / 'x'}", "--baselines", str(tmp_path / "nope.json")]) == 2
    capsys.readouterr()
    for name, text, message in [
        ("broken.json", "{", "not valid JSON"),
        ("no_results.json", '{"tasks": []}', 'no "results" mapping'),
        ("other.json", '{"results": {"not_a_task": {"accuracy": 0.5}}}', "holds tasks ['not_a_task'], none of this run's"),
    ]:
        (tmp_path / name).write_text(text)
        out_dir = tmp_path / f"refused_{name}"
        assert cli.main(["finetune", *sets, "--set", f"train.out_dir={out_dir}", "--baselines", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
        assert not (out_dir / "checkpoints").exists() or not any((out_dir / "checkpoints").iterdir())


# In CI one method of each family (a learned weight, the Gram's min-norm point, projections); the
# others run with -m slow (each method's rule is tested alone in tests/test_weighting.py).
@pytest.mark.parametrize("method", [
    "uncertainty", pytest.param("dwa", marks=pytest.mark.slow), pytest.param("gradnorm", marks=pytest.mark.slow),
    "pcgrad", "mgda", pytest.param("cagrad", marks=pytest.mark.slow), pytest.param("imtl", marks=pytest.mark.slow),
    pytest.param("nash_mtl", marks=pytest.mark.slow),
])
def test_every_weighting_method_trains_in_the_loop_and_resumes(method: str, tmp_path: Path) -> None:
    extra = ("data.name=digits", "model.architecture=multitask", "data.tasks=[digit,parity,left,right]",
             "model.moe_attention=false", "model.share_routing=false", "moe.router.type=softmax_topk",
             f"mtl.weighting={method}", "data.pairs_per_task=100")
    if method == "dwa":
        extra += ("mtl.weighting_options={window: 1}",)
    whole = Trainer(_cfg(tmp_path / "whole", *extra))
    whole.run()
    rows = (tmp_path / "whole" / "train.csv").read_text().splitlines()
    header = rows[0].split(",")
    weights = [[float(v) for v in row.split(",")[header.index("weight_digit"):header.index("weight_digit") + 4]] for row in rows[1:]]
    assert all(torch.isfinite(torch.tensor(w)).all() for w in weights)
    split = Trainer(_cfg(tmp_path / "split", *extra))
    split.run(until_step=2)
    resumed = Trainer(_cfg(tmp_path / "split", *extra), resume="auto")
    resumed.run()
    for name, tensor in resumed.model.state_dict().items():
        torch.testing.assert_close(tensor, whole.model.state_dict()[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(resumed.weighting.state_dict(), whole.weighting.state_dict(), rtol=1e-6, atol=1e-7)


def test_weighting_options_are_checked_by_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mtl.weighting_options"):
        _cfg(tmp_path, "mtl.weighting=cagrad", "mtl.weighting_options={alpha: 1.5}")
    with pytest.raises(ConfigError, match="did you mean 'pcgrad'"):
        _cfg(tmp_path, "mtl.weighting=pcgrd")


def test_every_rank_builds_the_same_graph_whatever_tasks_its_rows_hold(tmp_path: Path) -> None:
    """DeepSpeed's ZeRO reduces gradients in buckets filled in the order they become ready: every
    rank's backward must produce a gradient for every parameter, in the same order, even when its
    slice of the batch holds other tasks than another rank's, or none of a task the batch lacks."""
    trainer = Trainer(_cfg(tmp_path, "data.batch_size=3"))
    workload, model = trainer.workload, trainer.model
    batch = next(iter(workload.train_batches(seed=0)))
    assert list(batch) == workload.task_names  # every task, drawn or not
    # Three rows of four tasks: at least one task is not drawn at all, and of two ranks (rows 0 and 2,
    # row 1) one holds a task the other does not.
    assert 0 in [len(next(iter(sub.values()))) for sub in batch.values()]
    orders, drawn = [], []
    for rank in range(2):
        run = DistributedRun(rank=rank, world_size=2, local_rank=rank, groups=None)
        model.zero_grad(set_to_none=True)
        order: list[str] = []
        names = {p: n for n, p in model.named_parameters()}
        hooks = [p.register_post_accumulate_grad_hook(lambda p: order.append(names[p]))
                 for p in model.parameters() if p.requires_grad]
        step = workload.forward_step(model, batch, run, trainer.device)
        (sum(step.loss_sums.values()) + step.aux_loss + step.anchor).backward()
        for hook in hooks:
            hook.remove()
        assert set(step.loss_sums) == set(workload.task_names)
        drawn.append(step.counts_T.tolist())
        orders.append(order)
    assert drawn[0] != drawn[1]  # the ranks hold different tasks' rows...
    assert sorted(orders[0]) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert orders[0] == orders[1]  # ...and still produce every gradient, in the same order
