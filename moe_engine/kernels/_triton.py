"""What every Triton kernel module shares: availability, the interpreter, and config selection.

- `TRITON_AVAILABLE`: triton imported (it is a dependency, but a broken install must not break
  the torch references).
- `interpreting()`: TRITON_INTERPRET=1, Triton's CPU interpreter, used by the CPU test suite.
- `upcast_dot_operands(dtype)`: triton 3.9's interpreter computes `tl.dot` on bf16 operands
  wrongly (see ../shared/DESIGN.md); kernels take a constexpr that casts dot operands to fp32
  there. On a GPU it is always False, so compiled kernels keep bf16 tensor-core dots.
- `kernel_configs(op, candidates)`: the autotune candidates of one kernel, narrowed to a single
  config pinned by `MOE_ENGINE_<OP>_CONFIG="BLOCK_M=64,BLOCK_N=128,num_warps=4,num_stages=3"`,
  and to the first candidate under the interpreter (autotuning there would only cost time) or
  with `MOE_ENGINE_AUTOTUNE=0` (correctness runs on a GPU: one compile per kernel instead of one
  per candidate, which for the grouped GEMM is ten). Both are read when the kernel modules are
  imported.
- `jit` and `autotune(op, candidates, key, ...)`: the decorators kernel modules use; without
  triton they leave the function undecorated (its op then only runs the torch reference).
- `launch(kernel, grid, config, ...)`: an autotuned launch, or one forced config (tests, benchmarks).
- `check_index(name, index, dims, device)`: the int32/int64 index check the launchers share.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:
    import triton

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton is a dependency; this guards broken installs
    triton = None
    TRITON_AVAILABLE = False

_LAUNCH_KEYS = ("num_warps", "num_stages", "num_ctas")
# The modules that define Triton kernels or register custom ops on them (mlp_combine: ops only);
# compile_check imports and compiles them, autotune_choices reads their tuners.
KERNEL_MODULES = tuple(
    f"moe_engine.kernels.{name}" for name in (
        "aux_losses", "cv_squared", "expert_order", "grouped_gemm", "grouped_mlp", "mlp_combine", "permute", "router",
    )
)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def config_env_var(op: str) -> str:
    return f"MOE_ENGINE_{op.upper()}_CONFIG"


def pinned_config(op: str) -> dict[str, int] | None:
    """The config MOE_ENGINE_<OP>_CONFIG pins, as {name: int}, or None when unset."""
    name = config_env_var(op)
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    config = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{name}={raw!r}: expected KEY=INT pairs separated by commas, e.g. BLOCK_M=64,num_warps=4")
        config[key.strip()] = int(value)
    return config


AUTOTUNE_ENV_VAR = "MOE_ENGINE_AUTOTUNE"


def env_switch(name: str, default: bool, off: str, on: str) -> bool:
    """The 0/1 environment switch `name` (unset: default); off / on say what 0 and 1 mean in the error."""
    value = os.environ.get(name, "1" if default else "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: allowed: 0 ({off}) or 1 ({on})")
    return value == "1"


def autotune_enabled() -> bool:
    """False when MOE_ENGINE_AUTOTUNE=0: every kernel takes its first candidate."""
    return env_switch(AUTOTUNE_ENV_VAR, True, "first candidate of every kernel", "autotune")


def kernel_configs(op: str, candidates: list[dict[str, int]], pre_hook: Any = None) -> list[Any]:
    """triton.Config objects for `triton.autotune`: the pinned one, the first under the interpreter
    or with MOE_ENGINE_AUTOTUNE=0, or all. pre_hook(nargs): run before each launch with a config
    (e.g. to give a tensor descriptor the config's block shape)."""
    pinned = pinned_config(op)
    if pinned is not None:
        unknown = set(pinned) - set(candidates[0]) - set(_LAUNCH_KEYS)
        if unknown:
            raise ValueError(f"{config_env_var(op)} names {sorted(unknown)}; {op} takes {sorted(set(candidates[0]) | set(_LAUNCH_KEYS))}")
        # The block sizes every candidate sets are the kernel's constexprs: a pin must set them too.
        missing = set.intersection(*(set(c) for c in candidates)) - set(pinned) - set(_LAUNCH_KEYS)
        if missing:
            raise ValueError(
                f"{config_env_var(op)} lacks {sorted(missing)}; a pin of {op} sets every one of "
                f"{sorted(set(candidates[0]) - set(_LAUNCH_KEYS))}, e.g. "
                f"{config_env_var(op)}={','.join(f'{k}={v}' for k, v in candidates[0].items())}"
            )
        chosen = [pinned]
    elif interpreting() or not autotune_enabled():
        chosen = candidates[:1]
    else:
        chosen = candidates
    configs = []
    for c in chosen:
        meta = {k: v for k, v in c.items() if k not in _LAUNCH_KEYS}
        launch = {k: v for k, v in c.items() if k in _LAUNCH_KEYS}
        configs.append(triton.Config(meta, **launch, pre_hook=pre_hook))
    return configs


def jit(fn):
    return triton.jit(fn) if TRITON_AVAILABLE else fn


def autotune(
    op: str,
    candidates: list[dict[str, int]],
    key: list[str],
    reset_to_zero: list[str] | None = None,
    prune: Any = None,
    pre_hook: Any = None,
):
    """`triton.autotune` over `kernel_configs(op, candidates, pre_hook)` around `triton.jit`.

    reset_to_zero: output buffers that accumulate (atomics) and must be zeroed between trials.
    prune: an `early_config_prune(configs, named_args, **kwargs)` function, or None.
    """
    if not TRITON_AVAILABLE:
        return lambda fn: fn
    prune_by = {"early_config_prune": prune} if prune is not None else None

    def decorate(fn):
        tuner = triton.autotune(
            configs=kernel_configs(op, candidates, pre_hook), key=key, reset_to_zero=reset_to_zero, prune_configs_by=prune_by
        )(triton.jit(fn))
        tuner.moe_engine_op = op  # what `autotune_choices` reports it as, and the name of its pin variable
        return tuner

    return decorate


def launch(kernel: Any, grid: Any, config: dict[str, int] | None, *args: Any, **constexprs: Any) -> None:
    """Autotuned launch of an `autotune`-decorated kernel, or one forced `config` on the kernel under the autotuner."""
    if config is None:
        kernel[grid](*args, **constexprs)
    else:
        kernel.fn[grid](*args, **constexprs, **config)


def check_index(name: str, index: torch.Tensor, dims: int, device: torch.device) -> None:
    """Refuse an index that is not a `dims`-D int32/int64 tensor on `device`, naming it."""
    if index.dim() != dims or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected a {dims}-D int32/int64 tensor, got {index.dim()}-D {index.dtype}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device}, expected {device} like the data")


def _config_dict(config: Any) -> dict[str, int]:
    launch = {k: getattr(config, k) for k in ("num_warps", "num_stages") if getattr(config, k, None) is not None}
    return {**config.kwargs, **launch}


def autotune_choices(modules: tuple[str, ...] = KERNEL_MODULES) -> dict[str, dict[str, Any]]:
    """What every autotuned kernel of the (already imported) kernel modules has chosen in this process.

    {op: {"kernel": name, "candidates": n, "chosen": [{"key": [...], "config": {...}, "pin": "VAR=..."}]}},
    one entry of "chosen" per autotune key seen (the key lists the key arguments' values, then the
    dtypes of the tensor arguments). A kernel with one candidate (interpreter, MOE_ENGINE_AUTOTUNE=0,
    a pinned config) reports that config under key None. `pin` is the environment setting that
    reproduces the choice without autotuning.
    """
    import sys

    choices: dict[str, dict[str, Any]] = {}
    for module in filter(None, map(sys.modules.get, modules)):
        for tuner in vars(module).values():
            op = getattr(tuner, "moe_engine_op", None)
            if op is None:
                continue
            cache = dict(tuner.cache) if len(tuner.configs) > 1 else {None: tuner.configs[0]}
            chosen = []
            for key, config in cache.items():
                values = _config_dict(config)
                pin = ",".join(f"{k}={v}" for k, v in values.items())
                chosen.append({"key": None if key is None else [str(k) for k in key], "config": values,
                               "pin": f"{config_env_var(op)}={pin}"})
            choices[op] = {"kernel": tuner.base_fn.__name__, "candidates": len(tuner.configs), "chosen": chosen}
    return choices
