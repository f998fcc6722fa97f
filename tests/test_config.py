"""Tests of moe_engine.config: defaults, YAML files, `--set` overrides and every error a user can cause.

Each error case checks that the ConfigError message names the dotted field, the bad value and
what is allowed, since that message is all a user sees (`moe-engine` prints it and exits 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_engine import cli
from moe_engine.config import Config, ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = REPO_ROOT / "configs" / "default.yaml"


def field_paths(data: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf of nested mappings: {"moe.router.top_k", ...}."""
    paths = set()
    for key, value in data.items():
        path = f"{prefix}{key}"
        paths |= field_paths(value, f"{path}.") if isinstance(value, dict) else {path}
    return paths


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------- defaults


def test_no_file_and_no_overrides_give_the_dataclass_defaults() -> None:
    assert load_config(None) == Config()
    assert load_config(None, []) == Config()


def test_default_yaml_is_the_embedded_default_job() -> None:
    assert DEFAULT_YAML.is_file(), f"{DEFAULT_YAML} is missing"
    assert load_config(DEFAULT_YAML) == Config()
    # The file spells out every field, so copying it is a complete starting point.
    assert field_paths(yaml.safe_load(DEFAULT_YAML.read_text())) == field_paths(Config().to_dict())


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["moe.num_experts=16", "optim.lr=1e-3", "data.tasks=[digit, left]"])
    assert load_config(write_yaml(tmp_path / "c.yaml", cfg.to_yaml())) == cfg


# --------------------------------------------------------------------- files and overrides


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "run.yaml",
        "model:\n  d_model: 32\n  num_heads: 2\n"
        "moe:\n  router:\n    top_k: 1\n"
        "optim:\n  lr: 1e-3\n",  # YAML 1.1 reads 1e-3 (no dot) as a string
    )
    cfg = load_config(
        path,
        [
            "model.d_model=48",                      # overrides the file's value
            "moe.router.capacity_factor=1.25",       # three levels deep
            "data.tasks=[digit, left]",              # a list value
            "optim.betas=[0.8, 0.9]",
            "optim.grad_clip=null",                  # null where the field allows it
            "train.num_threads=2",
            "train.num_threads=3",                   # the later --set wins
            "optim.weight_decay=1e-4",               # the string quirk in an override too
        ],
    )
    assert cfg.model.d_model == 48
    assert cfg.model.num_heads == 2                  # kept from the file
    assert cfg.moe.router.top_k == 1                 # kept from the file
    assert cfg.moe.router.capacity_factor == 1.25
    assert cfg.data.tasks == ["digit", "left"]
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.optim.grad_clip is None
    assert cfg.train.num_threads == 3
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 1e-4 and isinstance(cfg.optim.weight_decay, float)
    # Untouched sections keep their defaults.
    assert cfg.train.max_steps == Config().train.max_steps
    assert cfg.logging == Config().logging


def test_override_values_are_typed() -> None:
    cfg = load_config(None, ["optim.lr=1", "moe.router.capacity_factor=2", "moe.router.capacity_factor=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an integer is a fine number
    assert cfg.moe.router.capacity_factor is None
    cfg = load_config(None, ["moe.router.capacity_factor=1e-1", "logging.tensorboard=false"])
    assert cfg.moe.router.capacity_factor == pytest.approx(0.1)
    assert cfg.logging.tensorboard is False


def test_empty_yaml_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path / "empty.yaml", "")) == Config()


# --------------------------------------------------------------------- errors


# (overrides, substrings the message must contain: field, value, what is allowed)
ERROR_CASES = {
    "unknown key": (["moe.num_expert=4"], ["moe.num_expert", "4", "unknown key", "did you mean 'num_experts'", "allowed:"]),
    "unknown section": (["modle.d_model=4"], ["modle", "unknown key", "did you mean 'model'", "allowed: model, moe"]),
    "unknown section, no suggestion": (["foo.bar=1"], ["foo", "unknown key", "allowed: model, moe, parallel, data"]),
    "string for int": (["model.d_model=abc"], ["model.d_model", "'abc'", "must be an integer"]),
    "float for int": (["model.d_model=16.5"], ["model.d_model", "16.5", "must be an integer"]),
    "bool for int": (["moe.num_experts=true"], ["moe.num_experts", "True", "must be an integer"]),  # bool is an int subclass
    "int for bool": (["logging.csv=1"], ["logging.csv", "1", "must be true or false"]),
    "string for float": (["optim.lr=fast"], ["optim.lr", "'fast'", "must be a number"]),
    "bool for float": (["optim.lr=true"], ["optim.lr", "True", "must be a number"]),
    "scalar for list": (["data.tasks=digit"], ["data.tasks", "'digit'", "must be a list"]),
    "scalar for section": (["moe=3"], ["moe", "3", "must be a mapping of num_experts"]),
    "num_experts < 1": (["moe.num_experts=0"], ["moe.num_experts", "0", "must be in [1, 4096]"]),
    "num_experts above the gating kernel's": (["moe.num_experts=5000"], ["moe.num_experts", "5000", "must be in [1, 4096]"]),
    "top_k > num_experts": (["moe.num_experts=2", "moe.router.top_k=3"], ["moe.router.top_k", "3", "must be <= moe.num_experts (2)"]),
    "top_k < 1": (["moe.router.top_k=0"], ["moe.router.top_k", "0", "must be >= 1"]),
    "capacity_factor = 0": (["moe.router.capacity_factor=0"], ["moe.router.capacity_factor", "0", "must be > 0"]),
    "capacity_factor < 0": (["moe.router.capacity_factor=-1.5"], ["moe.router.capacity_factor", "-1.5", "must be > 0"]),
    "unknown router type": (["moe.router.type=soft_moe"], ["moe.router.type", "'soft_moe'", "softmax_topk", "expert_choice"]),
    "unknown activation": (["moe.activation=relu"], ["moe.activation", "'relu'", "'swiglu'", "'gelu'"]),
    "unknown aux loss": (["moe.router.aux_loss_type=entropy"], ["moe.router.aux_loss_type", "'entropy'", "'switch'", "'seq_switch'", "'none'"]),
    "num_heads not dividing d_model": (["model.d_model=64", "model.num_heads=3"], ["model.num_heads", "3", "must divide model.d_model (64)"]),
    "unknown data task": (["data.tasks=[digit, colour]"], ["data.tasks", "colour", "digit, parity, left, right"]),
    "eval_fraction = 0": (["data.eval_fraction=0"], ["data.eval_fraction", "0", "(0, 1)"]),
    "eval_fraction = 1": (["data.eval_fraction=1"], ["data.eval_fraction", "1", "(0, 1)"]),
    "eval_fraction > 1": (["data.eval_fraction=1.5"], ["data.eval_fraction", "1.5", "(0, 1)"]),
    "shared gate without shared experts": (["moe.shared_expert_gate=true"], ["moe.shared_expert_gate", "moe.num_shared_experts >= 1"]),
    "list item of wrong type": (["data.tasks=[digit, 3]"], ["data.tasks[1]", "3", "must be a string"]),
    "through a scalar, no earlier value": (["model.d_model.x=1"], ["model.d_model", "{'x': 1}", "must be an integer"]),
    "unknown task gate mode": (["moe.router.task.gate_mode=mixed"], ["moe.router.task.gate_mode", "'mixed'", "'per_task'", "'concat'"]),
    "unknown noise": (["moe.router.task.noise=uniform"], ["moe.router.task.noise", "'uniform'", "'learned'", "'fixed'"]),
    "gamma = 0": (["moe.router.task.gamma=0"], ["moe.router.task.gamma", "0", "must be > 0"]),
    "negative mi loss": (["moe.router.task.mi_loss_coef=-1"], ["moe.router.task.mi_loss_coef", "-1", "must be >= 0"]),
    "num_attributes = 0": (["moe.router.task.num_attributes=0"], ["moe.router.task.num_attributes", "0", ">= 1, or null"]),
    "learned noise on attribute router": (
        ["moe.router.type=attribute", "moe.router.task.noise=learned"], ["moe.router.task.noise", "learned", "task_gate or mod_squad"]
    ),
    "capacity with dselect_k": (["moe.router.type=dselect_k", "moe.router.capacity_factor=1.5"], ["moe.router.capacity_factor", "1.5", "null"]),
    "seq_switch with task router": (["moe.router.type=task_gate", "moe.router.aux_loss_type=seq_switch"], ["seq_switch", "softmax_topk or sigmoid_topk"]),
    "importance_load with softmax_topk": (["moe.router.aux_loss_type=importance_load"], ["importance_load", "noisy_topk, task_gate or mod_squad"]),
    "groups with a task router": (["moe.router.type=mod_squad", "moe.router.n_groups=2"], ["moe.router.type", "mod_squad", "n_groups"]),
    "adaptive k on dselect": (["moe.router.type=dselect_k", "moe.router.task.adaptive_k=true"], ["moe.router.task.adaptive_k", "task_gate or mod_squad"]),
    "adaptive k_min > top_k": (
        ["moe.router.type=task_gate", "moe.router.task.adaptive_k=true", "moe.router.task.adaptive_k_min=3"],
        ["moe.router.task.adaptive_k_min", "3", "<= moe.router.top_k (2)"],
    ),
    "negative a2a chunks": (["parallel.a2a_chunks=0"], ["parallel.a2a_chunks", "0", "must be >= 1"]),
    "scaling factor on a task router": (
        ["moe.router.type=task_gate", "moe.router.scaling_factor=2.5"], ["moe.router.scaling_factor", "2.5", "softmax_topk or sigmoid_topk only"],
    ),
    "no renormalisation on noisy_topk": (
        ["moe.router.type=noisy_topk", "moe.router.renormalize=false"], ["moe.router.renormalize", "'noisy_topk' always gives weights that sum to 1"],
    ),
    "renormalised top-1 task-level router": (
        ["moe.router.type=task_level", "moe.router.top_k=1"],
        ["moe.router.renormalize", "True", "task gate gets no gradient", "use false"],
    ),
    "z-loss on the attribute router": (
        ["moe.router.type=attribute", "moe.router.z_loss_coef=0.01"], ["moe.router.z_loss_coef", "0.01", "'attribute' has none", "use 0"],
    ),
    "frozen experts under DeepSpeed with EP": (
        ["finetune.init_from=runs/x", "finetune.freeze=[experts]", "parallel.deepspeed_config=configs/deepspeed_zero2.json",
         "parallel.dispatcher=all_to_all", "parallel.expert_parallel_size=2"],
        ["finetune.freeze", "['experts']", "expert_parallel_size = 2 is not supported", "launch with torchrun"],
    ),
    "block task embeddings on the generalist": (
        ["model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption]", "model.block_task_embed=true"],
        ["model.block_task_embed", "True", "'multitask' only, not 'generalist'"],
    ),
    "balance loss on task_level": (
        ["moe.router.type=task_level", "moe.router.renormalize=false", "moe.router.aux_loss_coef=0.5"],
        ["moe.router.aux_loss_coef = 0.5", "'task_level' has no balance loss", "task_gate", "use 0"],
    ),
    "balance loss on dselect_k": (
        ["moe.router.type=dselect_k", "moe.router.aux_loss_coef=0.5"], ["moe.router.aux_loss_coef = 0.5", "'dselect_k' has no balance loss"],
    ),
    "fixed noise on softmax_topk": (
        ["moe.router.task.noise=fixed"], ["moe.router.task.noise = 'fixed'", "task_gate, mod_squad and attribute only", "'softmax_topk'"],
    ),
    "fixed noise on noisy_topk": (["moe.router.type=noisy_topk", "moe.router.task.noise=fixed"], ["moe.router.task.noise", "its own learned noise"]),
    "mi loss on the attribute router": (
        ["moe.router.type=attribute", "moe.router.task.mi_loss_coef=0.05"],
        ["moe.router.task.mi_loss_coef = 0.05", "task_gate and mod_squad only, not 'attribute'", "use 0"],
    ),
    "mi loss on softmax_topk": (["moe.router.task.mi_loss_coef=0.05"], ["moe.router.task.mi_loss_coef = 0.05", "not 'softmax_topk'"]),
    "concat gate on mod_squad": (
        ["moe.router.type=mod_squad", "moe.router.task.gate_mode=concat"],
        ["moe.router.task.gate_mode = 'concat'", "task_gate only", "one gate per task", "use per_task"],
    ),
    "concat gate on softmax_topk": (["moe.router.task.gate_mode=concat"], ["moe.router.task.gate_mode = 'concat'", "task_gate only"]),
    "score drops without a capacity": (
        ["moe.router.drop_policy=score"], ["moe.router.drop_policy = 'score'", "moe.router.capacity_factor = null", "drops nothing"],
    ),
    "no MoE layer": (
        ["model.num_layers=1"], ["model.num_layers = 1", "model.moe_every = 2 no block has an MoE FFN", "model.num_layers >= 2", "model.moe_every <= 1"],
    ),
    "no MoE layer, generalist": (
        ["model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption]", "model.num_layers=2", "model.moe_every=3"],
        ["model.num_layers = 2", "model.moe_every = 3"],
    ),
    "causal_lm width": (
        ["model.architecture=causal_lm", "data.name=text", "data.path=d", "finetune.init_from=m", "model.d_model=32", "moe.activation=gelu"],
        ["model.d_model = 32", "(and moe.activation)", "takes the model's widths and structure from the pre-trained model", "moe.experts_impl"],
    ),
    "causal_lm shared experts": (
        ["model.architecture=causal_lm", "data.name=text", "data.path=d", "finetune.init_from=m", "moe.num_shared_experts=1"],
        ["moe.num_shared_experts = 1", "causal_lm"],
    ),
    "causal_lm moe attention": (
        ["model.architecture=causal_lm", "data.name=text", "data.path=d", "finetune.init_from=m", "model.moe_attention=true"],
        ["model.moe_attention = True"],
    ),
    "nccl on the CPU": (["train.device=cpu", "parallel.backend=nccl"], ["parallel.backend = 'nccl'", "NCCL needs CUDA", "'gloo'"]),
    "mixing weights with temperature mixing": (
        ["model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption]", "data.mixing=temperature", "data.mixing_weights={digit: 5, caption: 1}"],
        ["data.mixing_weights = {'digit': 5.0, 'caption': 1.0}", "data.mixing = 'fixed' only", "data.mixing = 'temperature'"],
    ),
    "all-zero fixed mixing weights": (
        ["model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption]", "data.mixing=fixed", "data.mixing_weights={digit: 0, caption: 0}"], ["data.mixing_weights", "every weight is 0"],
    ),
    "mixing temperature with size mixing": (
        ["model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption]", "data.mixing_temperature=4"], ["data.mixing_temperature = 4.0", "data.mixing = 'temperature' only", "'size'"],
    ),
    "mixing temperature with digits": (["data.mixing_temperature=3"], ["data.mixing_temperature = 3.0", "needs data.name = 'generalist'"]),
    "empty out_dir": (["train.out_dir="], ["train.out_dir = ''", "must name a folder"]),
    "blank out_dir": (["train.out_dir='  '"], ["train.out_dir = '  '", "must name a folder"]),
    "tokenizer with digits": (["data.tokenizer=bytes"], ["data.tokenizer = 'bytes'", "data.name = 'text' (causal_lm) only", "None"]),
    "packing with digits": (["data.packing=false"], ["data.packing = False", "data.name = 'text'", "True"]),
    "fixed splits with the local dispatcher": (
        ["moe.router.capacity_factor=1.0", "parallel.fixed_splits=true"],
        ["parallel.fixed_splits = True", "parallel.dispatcher = 'all_to_all' only", "False"],
    ),
    "a2a chunks with the local dispatcher": (["parallel.a2a_chunks=2"], ["parallel.a2a_chunks = 2", "'all_to_all' only", "1"]),
    "weights on return with the local dispatcher": (["parallel.weights_to_experts=false"], ["parallel.weights_to_experts = False", "'all_to_all' only"]),
    "weighting_lr with equal": (["mtl.weighting_lr=0.01"], ["mtl.weighting_lr = 0.01", "'equal'", "no parameters of its own", "use null"]),
    "weighting_lr with imtl's gradient mode": (
        ["mtl.weighting=imtl", "mtl.weighting_options.mode=gradient", "mtl.weighting_lr=0.01"], ["mtl.weighting_lr = 0.01", "'imtl'"],
    ),
    "dwa temperature 0": (
        ["mtl.weighting=dwa", "mtl.weighting_options.temperature=0"],
        ["mtl.weighting_options.temperature = 0", "> 0", "mtl.weighting = 'dwa'"],
    ),
    "cagrad c < 0": (["mtl.weighting=cagrad", "mtl.weighting_options.c=-3"], ["mtl.weighting_options.c = -3", ">= 0"]),
    "cagrad c not a number": (["mtl.weighting=cagrad", "mtl.weighting_options.c=abc"], ["mtl.weighting_options.c = 'abc'", "number"]),
    # needs_gram() builds the method inside Config's check of grad_accum_steps: a ConfigError, not a ValueError.
    "cagrad c not a number, accumulating": (
        ["mtl.weighting=cagrad", "mtl.weighting_options.c=abc", "train.grad_accum_steps=2"], ["mtl.weighting_options.c = 'abc'"],
    ),
    "fixed splits on the generalist": (
        ["model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption]",
         "moe.router.capacity_factor=1.0", "parallel.dispatcher=all_to_all", "parallel.fixed_splits=true"],
        ["parallel.fixed_splits", "True", "same token count on every rank", "use false"],
    ),
}


def test_options_a_router_does_not_read_keep_their_defaults() -> None:
    # The defaults (and a z-loss of 0) are accepted by every router, so any config of any router loads.
    for router in ("noisy_topk", "task_gate", "mod_squad", "attribute", "dselect_k", "task_level"):
        load_config(None, [f"moe.router.type={router}"])
        load_config(None, [f"moe.router.type={router}", "moe.router.z_loss_coef=0"])


@pytest.mark.parametrize("overrides, expected", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_value_names_field_value_and_allowed(overrides: list[str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=nan", "optim.lr"),               # the string path: float("nan")
        ("optim.lr=.inf", "optim.lr"),              # a YAML float
        ("moe.router.capacity_factor=.nan", "moe.router.capacity_factor"),
        ("optim.grad_clip=nan", "optim.grad_clip"),  # would multiply every gradient by NaN
    ],
)
def test_non_finite_numbers_are_refused(override: str, field: str) -> None:
    # `value <= 0` is False for NaN, so range checks alone let NaN through to the training loop.
    with pytest.raises(ConfigError, match=f"^{field} = "):
        load_config(None, [override])


@pytest.mark.parametrize("item", ["moe.num_experts", "=4", ""])
def test_malformed_set_without_key_or_equals(item: str) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE") as info:
        load_config(None, [item])
    assert repr(item) in str(info.value)


def test_overrides_leave_the_given_data_untouched() -> None:
    """apply_overrides returns new data: the caller's nested sections (a YAML file's mapping, reused
    for several runs) keep their values."""
    from moe_engine.typed_config import apply_overrides

    data = {"moe": {"num_experts": 4, "router": {"top_k": 2}}, "data": {"tasks": ["digit"]}}
    updated = apply_overrides(data, ["moe.router.top_k=1", "moe.num_experts=8"], {"train.out_dir": "runs/x"})
    assert updated == {"moe": {"num_experts": 8, "router": {"top_k": 1}}, "data": {"tasks": ["digit"]},
                       "train": {"out_dir": "runs/x"}}
    assert data == {"moe": {"num_experts": 4, "router": {"top_k": 2}}, "data": {"tasks": ["digit"]}}
    assert updated["data"]["tasks"] is not data["data"]["tasks"]


def test_set_through_a_scalar() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.d_model=16", "model.d_model.x=1"])
    message = str(info.value)
    assert "model.d_model.x=1" in message and "'d_model' is a value, not a section" in message


def test_set_through_a_scalar_from_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", "moe:\n  router: softmax_topk\n")
    with pytest.raises(ConfigError, match="'router' is a value, not a section"):
        load_config(path, ["moe.router.top_k=1"])


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value) and "no such file" in str(info.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "bad.yaml", "model: [d_model: 16\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_yaml_list_is_not_a_config(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "list.yaml", "- model\n- moe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "mapping of sections" in str(info.value) and "list" in str(info.value)


def test_yaml_section_errors_name_the_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "run.yaml", "moe:\n  router:\n    top_k: two\n")
    with pytest.raises(ConfigError, match=r"^moe\.router\.top_k = 'two': must be an integer"):
        load_config(path)


def test_dataclass_checks_run_on_direct_construction() -> None:
    from moe_engine.config import MoEConfig

    with pytest.raises(ConfigError, match="moe.num_experts"):
        MoEConfig(num_experts=0)


# --------------------------------------------------------------------- through the command line


@pytest.mark.parametrize("command", ["config", "train"])
def test_cli_config_error_exits_2_with_one_line(command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli.main([command, "--set", "moe.num_experts=0", "--set", f"train.out_dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "config error" in err and "moe.num_experts = 0: must be in [1, 4096]" in err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line, no stack
    assert not (tmp_path / "run").exists()  # refused before any work


def test_cli_malformed_set_and_missing_file_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["config", "--set", "moe.num_experts"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["config", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_config_prints_the_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "--set", "moe.num_experts=16"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["moe"]["num_experts"] == 16
    assert printed == load_config(None, ["moe.num_experts=16"]).to_dict()


@pytest.mark.parametrize("value", ["[digit,", "{a: 1", "'open"])
def test_cli_malformed_yaml_in_a_set_value_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "--set", f"data.tasks={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-engine config: config error: --set ") and repr(f"data.tasks={value}") in err
    assert "not valid YAML" in err and err.count("\n") == 1



@pytest.mark.parametrize("path", ["2024", "runs/a #1", "x: y"])
def test_cli_paths_are_taken_literally_not_as_yaml(path: str, seen_configs: list[Config]) -> None:
    # A number-like folder, " #" (a YAML comment) and ": " (a YAML mapping) stay part of the path.
    args = ["finetune", "--from", path, "--freeze", "experts, routers", "--deepspeed_config", f"{path}.json"]
    assert cli.main(args) == 2
    (cfg,) = seen_configs
    assert cfg.finetune.init_from == path and cfg.parallel.deepspeed_config == f"{path}.json"
    assert cfg.finetune.freeze == ["experts", "routers"]


def test_cli_baselines_run_directories_are_taken_literally(seen_configs: list[Config]) -> None:
    assert cli.main(["baselines", "--set", "train.out_dir='runs/a #1'"]) == 2
    (cfg,) = seen_configs
    assert cfg.train.out_dir == "runs/a #1/single_digit" and cfg.data.tasks == ["digit"]


def test_cli_profile_out_is_taken_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    import moe_engine.profiling

    seen: list[Config] = []

    def profile_training(cfg: Config, **_: object) -> None:
        seen.append(cfg)
        raise FileNotFoundError("stand-in")

    monkeypatch.setattr(moe_engine.profiling, "profile_training", profile_training)
    assert cli.main(["profile", "--out", "2024 #1"]) == 2
    assert seen[0].train.out_dir == "2024 #1/run"


def test_causal_lm_accepts_what_it_reads() -> None:
    load_config(None, [
        "model.architecture=causal_lm", "data.name=text", "data.path=d", "finetune.init_from=m", "moe.num_experts=4",
        "moe.experts_impl=loop", "moe.recompute_experts=true", "model.activation_checkpointing=true", "model.max_text_len=64",
    ])


@pytest.mark.parametrize("value", [".inf", "-.inf", "inf", "nan"])
def test_a_non_finite_optional_number_says_finite(value: str) -> None:
    # optim.grad_clip is "a number or null": the reason to give is "finite", not "a number".
    with pytest.raises(ConfigError, match=r"^optim\.grad_clip = .*: must be a finite number, or null$"):
        load_config(None, [f"optim.grad_clip={value}"])


def test_weighting_lr_and_all_to_all_options_stay_accepted_where_read() -> None:
    load_config(None, ["mtl.weighting=uncertainty", "mtl.weighting_lr=0.01"])
    load_config(None, ["parallel.dispatcher=all_to_all", "parallel.a2a_chunks=2", "parallel.weights_to_experts=false"])
