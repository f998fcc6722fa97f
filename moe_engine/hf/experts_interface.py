"""Hugging Face transformers MoE models on moe_engine's kernels, through transformers' experts interface.

transformers 5.x runs the expert MLP of its MoE models (MixtralExperts, Qwen2MoeExperts, Qwen3MoeExperts,
OlmoeExperts, DeepseekV3Experts, GptOssExperts, ...) through a registry: the `@use_experts_implementation`
class decorator makes `forward(hidden_states, top_k_index, top_k_weights)` look up
`config._experts_implementation` in `transformers.integrations.moe.ExpertsInterface` ("eager" is the class's
own loop; "grouped_mm", "batched_mm", ... are registered functions called as `fn(module, ...)`).

`register_experts_implementation()` adds moe_engine's forward to that registry (an explicit call: importing
this module changes nothing), after which

    AutoModelForCausalLM.from_config(cfg, experts_implementation="moe_engine")
    model.set_experts_implementation("moe_engine")

run every expert MLP of the model as moe_engine's layer does:

    expert_order(top_k_index_TK) -> choice_N, tokens_per_expert_E     (rows grouped by expert)
    grouped GEMM up-projection (reading x_TD rows through choice_N // K; the Triton path fuses this
    gather, the torch paths `permute` first) -> activation -> grouped GEMM down-projection
    unpermute(y_ND, choice_N, top_k_weights_TK)                          (weighted sum of the K rows)
(with the fused activations below, the Triton path runs these as one op, `grouped_mlp_combine`, whose
backward takes the routing-weight gradient from its own GEMM instead of keeping y_ND),

Implementation per call, as `GroupedExperts(impl="auto")` picks it: the Triton kernels where
`select_backend` chooses Triton (CUDA by default, or MOE_ENGINE_KERNELS=triton); otherwise
torch._grouped_mm where it can run, else a loop of matmuls. The standard layout (gate_up_proj (E, 2F, D)
as [gate; up] rows, SiLU, no bias) runs the Triton grouped MLP with SwiGLU fused into the GEMM epilogue
(likewise exact GELU without a gate); any other layout the interface describes (transposed weights,
biases, an interleaved or custom `_apply_gate`, any `act_fn`, a post-expert norm) runs two grouped GEMMs
around the module's own gate / activation. Everything is differentiable (x, expert weights, biases,
routing weights).

Routing ids outside [0, E) contribute nothing, as in transformers: with expert parallelism
(`module._is_expert_parallel`) they are the sentinels of non-local experts and are dropped before the
GEMMs (one device-to-host sync counts the kept rows); otherwise they are sent to expert 0 with weight 0,
which keeps the call free of host syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.experts import resolve_experts_impl
from moe_engine.kernels.grouped_gemm import grouped_gemm_triton, grouped_linear_loop
from moe_engine.kernels.mlp_combine import grouped_mlp_combine_triton
from moe_engine.kernels.expert_order import expert_order
from moe_engine.kernels.permute import permute, unpermute
from moe_engine.kernels.torch_grouped_mm import grouped_linear_grouped_mm

DEFAULT_NAME = "moe_engine"
# The same forward keeping no up-projection output for the backward (moe.recompute_experts).
RECOMPUTE_NAME = "moe_engine_recompute"
# The names transformers dispatches itself ("eager" never reaches the registry in recent versions, but a
# registered "eager" would shadow the class's own forward in some): never ours to take.
RESERVED_NAMES = ("eager",)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def _experts_registry():
    """(ExpertsInterface, ALL_EXPERTS_FUNCTIONS): transformers' registry class and the instance models read.

    Raises ImportError naming the installed version when it has no experts interface.
    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"register_experts_implementation needs transformers >= 5 (not importable: {err})") from None
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    except ImportError:
        raise ImportError(
            f"transformers {transformers.__version__} has no experts-implementation interface "
            "(transformers.integrations.moe.ExpertsInterface, added in transformers 5): install transformers >= 5"
        ) from None
    return ExpertsInterface, ALL_EXPERTS_FUNCTIONS


def register_experts_implementation(name: str | None = None, *, recompute: bool = False) -> str:
    """Register moe_engine's experts forward under `name` in transformers' experts registry; returns `name`.

    Then `from_pretrained(..., experts_implementation=name)`, `from_config(..., experts_implementation=name)`
    and `model.set_experts_implementation(name)` run the model's experts on moe_engine. recompute: register
    `moe_engine_experts_forward_recompute` instead (default name "moe_engine_recompute"), whose fused
    Triton path keeps no up-projection output for the backward and recomputes it (moe.recompute_experts).
    Idempotent: registering the same name again is a no-op. Raises ValueError for an empty or reserved
    name ("eager") or one already mapped to another function (transformers' own "grouped_mm", say), and
    ImportError where the installed transformers has no experts interface.
    """
    if not isinstance(recompute, bool):
        raise ValueError(f"recompute = {recompute!r}: must be True or False")
    forward = moe_engine_experts_forward_recompute if recompute else moe_engine_experts_forward
    if name is None:
        name = RECOMPUTE_NAME if recompute else DEFAULT_NAME
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"name = {name!r}: expected a non-empty string without surrounding spaces")
    if name in RESERVED_NAMES:
        raise ValueError(f"name = {name!r} is transformers' own implementation; choose another (default {DEFAULT_NAME!r})")
    interface, registry = _experts_registry()
    if name in registry:
        if registry[name] is forward:
            return name
        taken = getattr(registry[name], "__qualname__", repr(registry[name]))
        raise ValueError(f"name = {name!r} is already registered to {taken}; choose another "
                         f"(taken: {', '.join(sorted(registry))})")
    interface.register(name, forward)
    return name


# ---------------------------------------------------------------------------------------------
# What the experts module looks like
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertsLayout:
    """The weights of an HF experts module as (out, in) per expert, and what runs between the GEMMs.

    w_in_EHD: (E, H, D), H = 2F for gated experts (the module's own gate_up layout), F otherwise.
    w_out_EDF: (E, D, F). bias_in_EH: (E, H) or None. bias_out_ED: (E, D) or None.
    activate: (N, H) -> (N, F), the module's `_apply_gate` or its `act_fn`.
    post_norm: the module's post-expert norm or None.
    fused_activation: "swiglu" or "gelu" when the Triton grouped MLP computes exactly `activate` in its
    epilogue (and nothing else sits between the GEMMs), else None.
    """

    w_in_EHD: torch.Tensor
    w_out_EDF: torch.Tensor
    bias_in_EH: torch.Tensor | None
    bias_out_ED: torch.Tensor | None
    activate: Callable[[torch.Tensor], torch.Tensor]
    post_norm: nn.Module | None
    fused_activation: str | None


def _is_silu(act: object) -> bool:
    from transformers import activations

    silu_classes = tuple(c for c in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if c is not None)
    return act is F.silu or isinstance(act, silu_classes)


def _is_exact_gelu(act: object) -> bool:
    from transformers import activations

    if act is F.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return True
    gelu_class = getattr(activations, "GELUActivation", None)
    return gelu_class is not None and isinstance(act, gelu_class) and getattr(act, "act", None) is F.gelu


def _has_default_gate(module: nn.Module) -> bool:
    """True when the gate is chunk(2) -> act_fn(gate) * up: no `_apply_gate`, or transformers' default one."""
    from transformers.integrations import moe as hf_moe

    gate = getattr(type(module), "_apply_gate", None)
    return gate is None or gate is getattr(hf_moe, "_default_apply_gate", None)


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """Read an HF experts module (one decorated with `@use_experts_implementation`).

    Reads the flags the decorator sets (has_gate, has_bias, is_transposed, is_concatenated,
    has_post_expert_norm) and, for transformers versions from before them, the attributes the
    interface looked at then (gate_up_proj, experts_are_transposed, *_proj_bias, _apply_gate).
    """
    name = type(module).__name__
    gated = getattr(module, "has_gate", None)
    if gated is None:
        gated = hasattr(module, "gate_up_proj")
    in_attr = "gate_up_proj" if gated else "up_proj"
    w_in, w_out = getattr(module, in_attr, None), getattr(module, "down_proj", None)
    if not isinstance(w_in, torch.Tensor) or not isinstance(w_out, torch.Tensor) or w_in.dim() != 3 or w_out.dim() != 3:
        raise TypeError(f"{name}: expected 3-D expert weights {in_attr} and down_proj, got {type(w_in).__name__} "
                        f"and {type(w_out).__name__}; is this an experts module of transformers' experts interface?")
    transposed = bool(getattr(module, "is_transposed", getattr(module, "experts_are_transposed", False)))
    w_in_EHD = w_in.transpose(1, 2) if transposed else w_in
    w_out_EDF = w_out.transpose(1, 2) if transposed else w_out
    num_experts, width_in, d_model = w_in_EHD.shape
    if w_out_EDF.shape[0] != num_experts or w_out_EDF.shape[1] != d_model:
        raise ValueError(f"{name}: {in_attr} is (E, H, D) = {tuple(w_in_EHD.shape)} and down_proj (E, D, F) = "
                         f"{tuple(w_out_EDF.shape)} (is_transposed = {transposed}): E and D must match")
    has_bias = getattr(module, "has_bias", True)  # older transformers: a bias is there when the attribute is
    bias_in = getattr(module, f"{in_attr}_bias", None) if has_bias else None
    bias_out = getattr(module, "down_proj_bias", None) if has_bias else None
    post_norm = module.post_expert_norm if getattr(module, "has_post_expert_norm", False) else None

    act_fn = getattr(module, "act_fn", None)
    default_gate = _has_default_gate(module)
    if gated and not default_gate:
        activate = module._apply_gate
    elif gated:
        def activate(h_NH: torch.Tensor) -> torch.Tensor:
            gate, up = h_NH.chunk(2, dim=-1)
            return act_fn(gate) * up
    else:
        activate = act_fn
    if activate is None:
        raise TypeError(f"{name}: no act_fn to apply between the expert GEMMs")

    fused = None
    plain = bias_in is None and bias_out is None and post_norm is None
    if plain and gated and default_gate and getattr(module, "is_concatenated", True) and _is_silu(act_fn):
        fused = "swiglu"
    elif plain and not gated and _is_exact_gelu(act_fn):
        fused = "gelu"
    if fused == "swiglu" and width_in != 2 * w_out_EDF.shape[2]:
        raise ValueError(f"{name}: gated experts need H = 2F, got {in_attr} H = {width_in}, down_proj F = "
                         f"{w_out_EDF.shape[2]}")
    return ExpertsLayout(w_in_EHD, w_out_EDF, bias_in, bias_out, activate, post_norm, fused)


# ---------------------------------------------------------------------------------------------
# The forward
# ---------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # torch._grouped_mm and the Triton ops are not on autocast's lists: cast by hand to what autocast would pick.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def resolve_impl(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> str:
    """'triton', 'grouped_mm' or 'loop' for expert GEMMs of inner widths `dims` on `device` in `dtype`:
    `GroupedExperts`'s choice for impl 'auto' (see moe_engine.experts.resolve_experts_impl)."""
    return resolve_experts_impl("auto", device, dtype, dims)


def _kept_choices(
    top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor, num_experts: int, expert_parallel: bool
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(experts_TK, weights_TK, num_rows) with ids outside [0, E) made harmless (see the module docstring)."""
    outside_TK = (top_k_index_TK < 0) | (top_k_index_TK >= num_experts)
    if expert_parallel:
        # Mostly sentinels under EP: drop them (-1) rather than compute them; num_rows=None counts the rest.
        return top_k_index_TK.masked_fill(outside_TK, -1), top_k_weights_TK, None
    return (top_k_index_TK.masked_fill(outside_TK, 0), top_k_weights_TK.masked_fill(outside_TK, 0.0),
            top_k_index_TK.numel())


def _check_inputs(name: str, x_TD: torch.Tensor, index_TK: torch.Tensor, weights_TK: torch.Tensor, d_model: int) -> None:
    if x_TD.dim() != 2 or x_TD.shape[1] != d_model:
        raise ValueError(f"{name}: hidden_states has shape {tuple(x_TD.shape)}, expected (tokens, {d_model})")
    if index_TK.dim() != 2 or index_TK.shape[0] != x_TD.shape[0] or index_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: top_k_index has shape {tuple(index_TK.shape)} and dtype {index_TK.dtype}, "
                         f"expected ({x_TD.shape[0]}, K) int64")
    if tuple(weights_TK.shape) != tuple(index_TK.shape) or not weights_TK.is_floating_point():
        raise ValueError(f"{name}: top_k_weights has shape {tuple(weights_TK.shape)} and dtype {weights_TK.dtype}, "
                         f"expected {tuple(index_TK.shape)} floating, one weight per top_k_index entry")


def _grouped_linear(impl: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    return {"triton": grouped_gemm_triton, "grouped_mm": grouped_linear_grouped_mm, "loop": grouped_linear_loop}[impl]


def moe_engine_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    recompute: bool = False,
) -> torch.Tensor:
    """The experts forward registered in transformers: `self` is the HF experts module.

    hidden_states: (T, D). top_k_index: (T, K) int64 expert ids. top_k_weights: (T, K) floating
    routing weights. Returns (T, D) in hidden_states' dtype: sum_k w[t, k] * expert_{i[t, k]}(x[t]).
    recompute: the fused Triton path keeps no up-projection output h for the backward (it recomputes
    it); the other paths are unchanged.
    """
    layout = experts_layout(self)
    num_experts, _, d_model = layout.w_in_EHD.shape
    _check_inputs(type(self).__name__, hidden_states, top_k_index, top_k_weights, d_model)
    num_tokens, top_k = top_k_index.shape
    experts_TK, weights_TK, num_rows = _kept_choices(
        top_k_index, top_k_weights, num_experts, bool(getattr(self, "_is_expert_parallel", False))
    )
    choice_N, tokens_per_expert_E = expert_order(experts_TK, num_experts, num_rows)

    dtype = _compute_dtype(hidden_states)
    x_TD = hidden_states.to(dtype)
    w_in_EHD, w_out_EDF = layout.w_in_EHD.to(dtype), layout.w_out_EDF.to(dtype)
    impl = resolve_impl(x_TD.device, dtype, (d_model, w_out_EDF.shape[2], w_in_EHD.shape[1]))
    if impl == "triton":
        # The up-projection reads x_TD rows through the index: no permuted copy of x.
        token_N = choice_N // top_k
        if layout.fused_activation is not None:
            # The MLP and the weighted combine as one op: no (N, D) expert outputs kept for the backward.
            y_TD = grouped_mlp_combine_triton(
                x_TD, w_in_EHD, w_out_EDF, tokens_per_expert_E, layout.fused_activation, choice_N, weights_TK,
                recompute_h=recompute,
            )
            return y_TD.to(hidden_states.dtype)
        h_NH = grouped_gemm_triton(x_TD, w_in_EHD, tokens_per_expert_E, token_N)
    else:
        h_NH = _grouped_linear(impl)(permute(x_TD, choice_N, top_k), w_in_EHD, tokens_per_expert_E)

    expert_N = None
    if layout.bias_in_EH is not None or layout.bias_out_ED is not None:
        expert_N = torch.repeat_interleave(
            torch.arange(num_experts, device=x_TD.device), tokens_per_expert_E, output_size=choice_N.numel()
        )
    if layout.bias_in_EH is not None:
        h_NH = h_NH + layout.bias_in_EH.to(dtype).index_select(0, expert_N)
    y_ND = _grouped_linear(impl)(layout.activate(h_NH).to(dtype), w_out_EDF, tokens_per_expert_E)
    if layout.bias_out_ED is not None:
        y_ND = y_ND + layout.bias_out_ED.to(dtype).index_select(0, expert_N)
    if layout.post_norm is not None:
        y_ND = layout.post_norm(y_ND)
    return unpermute(y_ND, choice_N, weights_TK, num_tokens).to(hidden_states.dtype)


def moe_engine_experts_forward_recompute(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`moe_engine_experts_forward` with recompute=True (registered as "moe_engine_recompute")."""
    return moe_engine_experts_forward(self, hidden_states, top_k_index, top_k_weights, recompute=True)
