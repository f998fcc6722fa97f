"""How each kernel's autotune candidates are narrowed: a pinned config, the interpreter, MOE_ENGINE_AUTOTUNE=0."""

from __future__ import annotations

import pytest

from moe_engine.kernels._triton import AUTOTUNE_ENV_VAR, autotune_enabled, config_env_var, kernel_configs, pinned_config

CANDIDATES = [
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
]


def _as_dicts(configs) -> list[dict]:
    return [{**c.kwargs, "num_warps": c.num_warps} for c in configs]


def test_all_candidates_when_compiling_for_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(AUTOTUNE_ENV_VAR, raising=False)
    configs = kernel_configs("my_op", CANDIDATES)
    assert _as_dicts(configs) == [{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}]
    assert configs[1].num_stages == 3


@pytest.mark.parametrize("env", [{"TRITON_INTERPRET": "1"}, {AUTOTUNE_ENV_VAR: "0"}])
def test_first_candidate_under_the_interpreter_or_with_autotuning_off(monkeypatch, env):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _as_dicts(kernel_configs("my_op", CANDIDATES)) == [CANDIDATES[0]]


def test_a_pinned_config_wins(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(config_env_var("my_op"), "BLOCK_M=128, BLOCK_N=32,num_warps=8")
    assert config_env_var("my_op") == "MOE_ENGINE_MY_OP_CONFIG"
    assert pinned_config("my_op") == {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8}
    assert _as_dicts(kernel_configs("my_op", CANDIDATES)) == [{"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8}]


@pytest.mark.parametrize(
    "value, message",
    [
        ("BLOCK_M", "expected KEY=INT pairs separated by commas"),
        ("BLOCK_M=big", "expected KEY=INT pairs separated by commas"),
        ("BLOCK_Q=16", r"names \['BLOCK_Q'\]; my_op takes \['BLOCK_M', 'BLOCK_N', 'num_ctas', 'num_stages', 'num_warps'\]"),
        ("BLOCK_M=16,num_warps=4", r"MOE_ENGINE_MY_OP_CONFIG lacks \['BLOCK_N'\]; .* e.g. MOE_ENGINE_MY_OP_CONFIG=BLOCK_M=64,BLOCK_N=64,num_warps=4"),
    ],
)
def test_a_bad_pinned_config_is_refused_by_name(monkeypatch, value, message):
    monkeypatch.setenv("MOE_ENGINE_MY_OP_CONFIG", value)
    with pytest.raises(ValueError, match=message):
        kernel_configs("my_op", CANDIDATES)


def test_autotune_switch_values(monkeypatch):
    monkeypatch.delenv(AUTOTUNE_ENV_VAR, raising=False)
    assert autotune_enabled()
    monkeypatch.setenv(AUTOTUNE_ENV_VAR, "0")
    assert not autotune_enabled()
    monkeypatch.setenv(AUTOTUNE_ENV_VAR, "off")
    with pytest.raises(ValueError, match=r"MOE_ENGINE_AUTOTUNE='off': allowed: 0 .* or 1"):
        autotune_enabled()


def test_autotune_choices_report_each_kernels_pick_and_how_to_pin_it(monkeypatch):
    import importlib

    import triton

    from moe_engine.kernels._triton import KERNEL_MODULES, autotune_choices

    modules = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in KERNEL_MODULES}
    permute_tuner = modules["permute"]._permute_kernel
    # Under the interpreter every kernel has one candidate: reported under key None.
    fixed = autotune_choices()["permute"]
    assert fixed["kernel"] == "_permute_kernel" and fixed["candidates"] == len(permute_tuner.configs) == 1
    (entry,) = fixed["chosen"]
    assert entry["key"] is None
    assert entry["pin"] == "MOE_ENGINE_PERMUTE_CONFIG=" + ",".join(f"{k}={v}" for k, v in entry["config"].items())
    # With several candidates, one entry per key the autotuner has seen, with the config it kept.
    picked = triton.Config({"BLOCK_R": 8, "BLOCK_D": 128}, num_warps=8, num_stages=2)
    monkeypatch.setattr(permute_tuner, "configs", [permute_tuner.configs[0], picked])
    monkeypatch.setattr(permute_tuner, "cache", {(4096, "torch.bfloat16"): picked})
    tuned = autotune_choices()["permute"]
    assert tuned["candidates"] == 2
    assert tuned["chosen"] == [{
        "key": ["4096", "torch.bfloat16"], "config": {"BLOCK_R": 8, "BLOCK_D": 128, "num_warps": 8, "num_stages": 2},
        "pin": "MOE_ENGINE_PERMUTE_CONFIG=BLOCK_R=8,BLOCK_D=128,num_warps=8,num_stages=2",
    }]
    assert {"grouped_gemm", "grouped_gemm_dw", "topk_gating", "unpermute", "balance_stats"} <= set(autotune_choices())
