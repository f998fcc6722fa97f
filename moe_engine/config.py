"""Typed, nested run configuration, loaded from YAML and validated where each field lives.

Every section is a small dataclass that owns its fields and checks their values in
`__post_init__`; cross-field checks sit in the smallest section that holds both fields.
Values arrive from YAML (`load_config`) and from `--set a.b.c=value` overrides; anything a
user can get wrong raises `ConfigError` naming the field, the value and what is allowed,
before any work starts.

The dataclass defaults are the embedded default job (`moe-engine train` with no `--config`);
`configs/default.yaml` spells the same values out, and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moe_engine.kernels.router import MAX_EXPERTS
from moe_engine.routing import ROUTER_TYPES
from moe_engine.typed_config import ConfigError, _fail, apply_overrides, build_dataclass


def _check_choices(section_obj: Any, section: str) -> None:
    """Check every Literal-typed field, so sections built in code are held to what YAML is."""
    for f in dataclasses.fields(section_obj):
        tp = typing.get_type_hints(type(section_obj))[f.name]
        value = getattr(section_obj, f.name)
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            _fail(f"{section}.{f.name}", value, f"allowed: {', '.join(repr(a) for a in typing.get_args(tp))}")


def _check_positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            _fail(f"{section}.{name}", value, "must be > 0")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class TaskRoutingConfig:
    """Settings of the task-conditional routers (moe_engine.mtl).

    Which fields a router reads: task_gate (M3ViT) gate_mode, noise, mi_loss_coef; mod_squad
    score_epsilon, noise, mi_loss_coef (its gates are always per task); attribute (Conditional MoE)
    noise (fixed), num_attributes, attribute_dim, attribute_with_tokens; dselect_k dselect_gate,
    gamma, entropy_coef; task_level task_level_gate. RouterConfig refuses gate_mode, noise and
    mi_loss_coef changed from their defaults for a router that does not read them.
    """

    # "per_task": one gate per task (M3ViT, Mod-Squad); "concat": one gate over [token ; one-hot task].
    gate_mode: Literal["per_task", "concat"] = "per_task"
    # Noise on the gate logits in training: "learned" (Shazeer's softplus(x W_noise), task_gate only),
    # "fixed" (N(0, 1/E^2), V-MoE and Uni-Perceiver-MoE), "none".
    noise: Literal["none", "learned", "fixed"] = "none"
    # Mod-Squad: scores = softmax(logits) + score_epsilon before the top-k.
    score_epsilon: float = 1e-3
    # Mod-Squad's task-expert mutual-information loss weight (5e-3 in its config); 0 turns it off.
    mi_loss_coef: float = 0.0
    # Conditional MoE: attributes per token; null takes the model's count (moe_engine.mtl.model).
    num_attributes: int | None = None
    # Width of the attribute embedding (LayerNorm(Linear(attributes))); null: d_model.
    attribute_dim: int | None = None
    # The gate sees [attribute embedding ; token] instead of the attribute embedding alone.
    attribute_with_tokens: bool = False
    # DSelect-k: "static" (per-task selectors) or "per_example" (selectors computed from the token).
    dselect_gate: Literal["static", "per_example"] = "static"
    # DSelect-k smooth-step width gamma and its entropy regularisation weight.
    gamma: float = 1.0
    entropy_coef: float = 1e-6
    # Task-level MoE: "table" (learned per-task logits) or "embedding_mlp" (Ye et al.: task embedding -> MLP).
    task_level_gate: Literal["table", "embedding_mlp"] = "table"
    # AdaMV-MoE (task_gate, mod_squad): each task's k moves in [adaptive_k_min, top_k] with its
    # validation loss at every evaluation (moe_engine.mtl.adaptive_k); false: every task uses top_k.
    adaptive_k: bool = False
    adaptive_k_min: int = 1
    # Evaluations without improvement before a task's k rises.
    adaptive_patience: int = 1

    def __post_init__(self) -> None:
        _check_choices(self, "moe.router.task")
        _check_positive("moe.router.task", adaptive_k_min=self.adaptive_k_min, adaptive_patience=self.adaptive_patience)
        _check_positive("moe.router.task", gamma=self.gamma)
        for name in ("score_epsilon", "mi_loss_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                _fail(f"moe.router.task.{name}", getattr(self, name), "must be >= 0")
        if self.num_attributes is not None and self.num_attributes < 1:
            _fail("moe.router.task.num_attributes", self.num_attributes, "must be >= 1, or null")
        # A LayerNorm over one feature outputs a constant: the gate would see nothing.
        if self.attribute_dim is not None and self.attribute_dim < 2:
            _fail("moe.router.task.attribute_dim", self.attribute_dim, "must be >= 2, or null")


# moe.router.z_loss_coef's default; the routers without a z-loss accept it (and 0) and ignore it.
_ROUTER_Z_LOSS_DEFAULT = 0.001
_AUX_LOSS_COEF_DEFAULT = 0.01

# Routers that read RoutingContext.task_ids_T (and need the number of tasks).
TASK_ROUTERS = ("task_gate", "mod_squad", "dselect_k", "task_level")


@dataclass
class RouterConfig:
    """How tokens choose experts (moe_engine.routing)."""

    type: str = "softmax_topk"
    top_k: int = 2
    # Divide the k chosen weights by their sum (Mixtral, Qwen3-MoE) before scaling.
    renormalize: bool = True
    scaling_factor: float = 1.0
    # Load-balancing loss: "switch" (over the batch), "seq_switch" (per sequence, averaged),
    # "importance_load" (Shazeer's CV^2 losses: noisy_topk, task_gate), "none". noisy_topk has
    # importance_load only: its "switch" (the default) means its own losses.
    aux_loss_type: Literal["switch", "seq_switch", "importance_load", "none"] = "switch"
    aux_loss_coef: float = _AUX_LOSS_COEF_DEFAULT
    # ST-MoE's router z-loss: softmax_topk and sigmoid_topk only (the other routers' papers have none).
    z_loss_coef: float = _ROUTER_Z_LOSS_DEFAULT
    # None: dropless (expert_choice: 1.0). Otherwise each expert keeps ceil(capacity_factor * T * K / E) choices.
    capacity_factor: float | None = None
    # Which choices an over-full expert keeps: earliest (first choices before second) or highest weight.
    drop_policy: Literal["position", "score"] = "position"
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert selection bias moved by this much per step
    # toward balance (0.001 in the paper); 0 turns it off.
    expert_bias_rate: float = 0.0
    # Group-limited routing (DeepSeek-V3): experts in n_groups groups, tokens pick among the best topk_groups.
    n_groups: int = 1
    topk_groups: int = 1
    # The task-conditional routers' settings (moe_engine.mtl).
    task: TaskRoutingConfig = field(default_factory=TaskRoutingConfig)

    def __post_init__(self) -> None:
        _check_choices(self, "moe.router")
        if self.type not in ROUTER_TYPES:
            _fail("moe.router.type", self.type, f"allowed: {', '.join(ROUTER_TYPES)}")
        if self.top_k < 1:
            _fail("moe.router.top_k", self.top_k, "must be >= 1")
        _check_positive("moe.router", scaling_factor=self.scaling_factor)
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            _fail("moe.router.capacity_factor", self.capacity_factor, "must be > 0, or null for dropless")
        for name in ("aux_loss_coef", "z_loss_coef", "expert_bias_rate"):
            if getattr(self, name) < 0:
                _fail(f"moe.router.{name}", getattr(self, name), "must be >= 0")
        if self.n_groups < 1:
            _fail("moe.router.n_groups", self.n_groups, "must be >= 1")
        if not 1 <= self.topk_groups <= self.n_groups:
            _fail("moe.router.topk_groups", self.topk_groups, f"must be in [1, moe.router.n_groups = {self.n_groups}]")
        self._check_router_specific()

    def _check_expert_choice(self) -> None:
        """expert_choice (every expert picks its C tokens) has no balance loss, no renormalisation and
        no drops to order: settings that would ask for them are refused. top_k is the average number
        of experts per token; capacity_factor null means 1.0."""
        if self.aux_loss_type == "switch" and self.aux_loss_coef not in (0.0, _AUX_LOSS_COEF_DEFAULT):
            _fail("moe.router.aux_loss_coef", self.aux_loss_coef, "expert_choice is balanced by construction and "
                  "has no balance loss: use 0")
        if not self.renormalize:
            _fail("moe.router.renormalize", False, "expert_choice weights are the experts' softmax scores, never "
                  "renormalised: use true (the default, not read)")
        if self.drop_policy != "position":
            _fail("moe.router.drop_policy", self.drop_policy, "expert_choice drops nothing (each expert picks its "
                  "tokens): use position (the default, not read)")

    def _check_router_specific(self) -> None:
        """Options that only some router types implement are refused for the others: a value other
        than the default (for the z-loss: 0 too) of an option the chosen router does not read."""
        topk_types = ("softmax_topk", "sigmoid_topk")
        if self.type not in topk_types and self.scaling_factor != 1.0:
            _fail("moe.router.scaling_factor", self.scaling_factor, f"allowed with softmax_topk or sigmoid_topk only "
                  f"({self.type!r} does not scale its weights): use 1.0")
        if self.type in ("noisy_topk", "dselect_k") and not self.renormalize:
            _fail("moe.router.renormalize", False, f"{self.type!r} always gives weights that sum to 1: use true")
        if self.type == "expert_choice":
            self._check_expert_choice()
        if self.type == "task_level" and self.top_k == 1 and self.renormalize:
            _fail("moe.router.renormalize", True, "with task_level and top_k = 1 the one weight is p / p = 1, so the "
                  "task gate gets no gradient (it has no aux loss) and keeps its initial expert: use false (weight p)")
        if self.type not in topk_types and self.z_loss_coef not in (0.0, _ROUTER_Z_LOSS_DEFAULT):
            _fail("moe.router.z_loss_coef", self.z_loss_coef, f"the router z-loss belongs to softmax_topk and "
                  f"sigmoid_topk; {self.type!r} has none (as in its paper): use 0")
        if self.type not in topk_types and (self.n_groups > 1 or self.expert_bias_rate > 0):
            _fail("moe.router.type", self.type, "n_groups/topk_groups and expert_bias_rate need softmax_topk or sigmoid_topk")
        if self.aux_loss_type == "seq_switch" and self.type not in topk_types:
            _fail("moe.router.aux_loss_type", "seq_switch", "allowed with softmax_topk or sigmoid_topk only")
        if self.aux_loss_type == "importance_load" and self.type not in ("noisy_topk", "task_gate", "mod_squad"):
            _fail("moe.router.aux_loss_type", "importance_load", "allowed with noisy_topk, task_gate or mod_squad only")
        if self.type in ("dselect_k", "task_level") and self.capacity_factor is not None:
            _fail("moe.router.capacity_factor", self.capacity_factor, f"must be null for moe.router.type = {self.type!r}")
        if self.task.adaptive_k and self.type not in ("task_gate", "mod_squad"):
            _fail("moe.router.task.adaptive_k", True, "allowed with task_gate or mod_squad only")
        if self.task.adaptive_k and self.task.adaptive_k_min > self.top_k:
            _fail("moe.router.task.adaptive_k_min", self.task.adaptive_k_min, f"must be <= moe.router.top_k ({self.top_k})")
        if self.task.noise == "learned" and self.type not in ("task_gate", "mod_squad"):
            _fail("moe.router.task.noise", "learned", "allowed with task_gate or mod_squad only (noisy_topk always has it)")
        self._check_unread_options()

    def _check_unread_options(self) -> None:
        """Options the chosen router never reads (moe_engine.routers.build_any_router, routing.build_router),
        refused when changed from their defaults: a setting that does nothing would pass silently."""
        # DSelect-k (its own entropy term) and task_level (none) have no balance loss; 0 is accepted
        # like the z-loss's 0, to say "no balance loss" explicitly (configs/dselect_k.yaml does).
        if self.type in ("dselect_k", "task_level") and self.aux_loss_coef not in (0.0, _AUX_LOSS_COEF_DEFAULT):
            _fail("moe.router.aux_loss_coef", self.aux_loss_coef, f"{self.type!r} has no balance loss (read by softmax_topk, "
                  "sigmoid_topk, noisy_topk, task_gate, mod_squad and attribute): use 0")
        if self.task.noise == "fixed" and self.type not in ("task_gate", "mod_squad", "attribute"):
            _fail("moe.router.task.noise", "fixed", f"read by task_gate, mod_squad and attribute only, not {self.type!r}: "
                  "use none" + (" (noisy_topk has its own learned noise)" if self.type == "noisy_topk" else ""))
        if self.task.mi_loss_coef > 0 and self.type not in ("task_gate", "mod_squad"):
            _fail("moe.router.task.mi_loss_coef", self.task.mi_loss_coef, f"the mutual-information loss is read by "
                  f"task_gate and mod_squad only, not {self.type!r}: use 0")
        # Mod-Squad's gates are per task by construction (routers.py builds them so).
        if self.task.gate_mode != "per_task" and self.type != "task_gate":
            _fail("moe.router.task.gate_mode", self.task.gate_mode, f"read by task_gate only ({self.type!r} "
                  f"{'always has one gate per task' if self.type == 'mod_squad' else 'has no task gates'}): use per_task")
        # expert_choice refuses it in _check_expert_choice (its capacity is never null).
        if self.drop_policy != "position" and self.capacity_factor is None and self.type != "expert_choice":
            _fail("moe.router.drop_policy", self.drop_policy, "orders the drops of an over-full expert, and dropless "
                  "routing (moe.router.capacity_factor = null) drops nothing: set a capacity_factor, or use position")


@dataclass
class MoEConfig:
    """The MoE feed-forward layer: experts and their router."""

    num_experts: int = 8
    # Hidden width F of each expert's MLP.
    ffn_hidden: int = 96
    activation: Literal["swiglu", "gelu"] = "swiglu"
    # Dense experts every token passes through, added to the routed output (DeepSeek, Qwen2-MoE).
    num_shared_experts: int = 0
    # Qwen2-MoE's sigmoid gate on the shared experts' output.
    shared_expert_gate: bool = False
    # "auto": the Triton kernels where MOE_ENGINE_KERNELS selects them (CUDA by default), else
    # torch._grouped_mm where this torch supports the device and dtype, else the per-expert loop.
    experts_impl: Literal["auto", "loop", "grouped_mm", "triton"] = "auto"
    # Keep fewer expert activations for the backward and recompute them: the Triton experts keep no
    # up-projection output (T*K, H) (one more up-projection GEMM in the backward: +1/3 backward FLOPs
    # for SwiGLU); the torch paths checkpoint their MLP. Memory per layer for compute.
    recompute_experts: bool = False
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        _check_choices(self, "moe")
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            _fail("moe.num_experts", self.num_experts, f"must be in [1, {MAX_EXPERTS}] (the gating kernel holds a "
                  "token's scores over all experts at once)")
        if self.router.top_k > self.num_experts:
            _fail("moe.router.top_k", self.router.top_k, f"must be <= moe.num_experts ({self.num_experts})")
        groups = self.router.n_groups
        if self.num_experts % groups:
            _fail("moe.router.n_groups", groups, f"must divide moe.num_experts ({self.num_experts})")
        offered = self.router.topk_groups * (self.num_experts // groups)
        if self.router.top_k > offered:
            _fail("moe.router.top_k", self.router.top_k, f"must be <= the {offered} experts of moe.router.topk_groups groups")
        _check_positive("moe", ffn_hidden=self.ffn_hidden)
        if self.num_shared_experts < 0:
            _fail("moe.num_shared_experts", self.num_shared_experts, "must be >= 0")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            _fail("moe.shared_expert_gate", True, "needs moe.num_shared_experts >= 1")


@dataclass
class ModelConfig:
    """The multi-task transformer: patch tokens, a task token, MoE FFN in every `moe_every`-th block."""

    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 4
    # Hidden width of the dense FFN blocks.
    ffn_hidden: int = 128
    # Block i has an MoE FFN when (i + 1) % moe_every == 0: 2 gives MoE in alternate blocks.
    moe_every: int = 2
    # Image patches (patch_size x patch_size pixels) become tokens.
    patch_size: int = 2
    # MoE blocks also put experts in attention: per-expert query and output projections with shared
    # keys and values (Mod-Squad, Uni-Perceiver-MoE), routed by a router of moe.router's kind.
    moe_attention: bool = False
    # The FFN experts reuse the attention's routing of each token (Conditional MoE / Uni-Perceiver-MoE).
    share_routing: bool = False
    # A learned embedding of the token's task added to every token before each block (Mod-Squad);
    # multitask architecture only.
    block_task_embed: bool = False
    dropout: float = 0.1
    # Keep only each transformer block's input for the backward and run the block again there
    # (moe_engine.recompute): less activation memory for about one more forward. causal_lm too.
    activation_checkpointing: bool = False
    # "multitask": patch tokens + task token, one head per task (the default job).
    # "generalist": a Uni-Perceiver-style shared encoder of images and texts that scores inputs against
    # their target texts (moe_engine.mtl.generalist); needs data.name = "generalist".
    # "causal_lm": fine-tune an imported Hugging Face MoE language model (moe-engine convert) on text;
    # needs data.name = "text" and finetune.init_from; the architecture comes from that model.
    architecture: Literal["multitask", "generalist", "causal_lm"] = "multitask"
    # Generalist: texts are truncated to this many tokens. causal_lm: the sequence length.
    max_text_len: int = 24

    def __post_init__(self) -> None:
        _check_choices(self, "model")
        _check_positive("model", max_text_len=self.max_text_len)
        _check_positive(
            "model",
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            ffn_hidden=self.ffn_hidden,
            moe_every=self.moe_every,
            patch_size=self.patch_size,
        )
        if self.d_model % self.num_heads:
            _fail("model.num_heads", self.num_heads, f"must divide model.d_model ({self.d_model})")
        if not 0.0 <= self.dropout < 1.0:
            _fail("model.dropout", self.dropout, "must be in [0, 1)")
        if self.share_routing and not self.moe_attention:
            _fail("model.share_routing", True, "needs model.moe_attention = true (the routing it shares is the attention's)")
        # causal_lm takes its layers from the pre-trained model (Config refuses a changed num_layers there).
        if self.architecture != "causal_lm" and self.num_layers < self.moe_every:
            _fail("model.num_layers", self.num_layers, f"with model.moe_every = {self.moe_every} no block has an MoE FFN "
                  "(block i has one when (i + 1) % moe_every == 0), so every moe.* setting would do nothing: use "
                  f"model.num_layers >= {self.moe_every}, or a model.moe_every <= {self.num_layers}")
        if self.block_task_embed and self.architecture != "multitask":
            _fail("model.block_task_embed", True, f"allowed with model.architecture = 'multitask' only, not {self.architecture!r}")


@dataclass
class ParallelConfig:
    """How tokens reach experts and how ranks share work. Process groups are built at run time
    (moe_engine.parallel), never stored here. The world size comes from the launcher (torchrun,
    deepspeed): every rank holds the replicated parameters and E / expert_parallel_size experts."""

    # "local": every expert on every rank; "all_to_all": experts sharded over expert_parallel_size ranks.
    dispatcher: Literal["local", "all_to_all"] = "local"
    expert_parallel_size: int = 1
    # Capacity routing only: pad each expert's rows to the capacity so all-to-all splits are static.
    fixed_splits: bool = False
    # Split each all-to-all into this many chunks of tokens, so chunk i+1's exchange runs while the
    # experts compute chunk i (async collectives); 1: one exchange per direction.
    a2a_chunks: int = 1
    # Send each row's routing weight (fp32) with it, so the experts scale their own outputs and take the
    # weight's gradient in their backward: no rank keeps the returned expert rows (T*K, D) for it.
    # false: the rows are weighted on return, in the combine. Holds with a2a_chunks > 1 too (per chunk).
    weights_to_experts: bool = True
    # Collective backend: "auto" takes nccl on CUDA, gloo on CPU.
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # A DeepSpeed JSON config (e.g. configs/deepspeed_zero2.json): DeepSpeed's engine then runs
    # backward, ZeRO gradient reduction, clipping, the optimizer step and checkpoints. null: moe_engine's own loop.
    deepspeed_config: str | None = None

    def __post_init__(self) -> None:
        _check_choices(self, "parallel")
        if self.expert_parallel_size < 1:
            _fail("parallel.expert_parallel_size", self.expert_parallel_size, "must be >= 1")
        if self.a2a_chunks < 1:
            _fail("parallel.a2a_chunks", self.a2a_chunks, "must be >= 1")
        if self.dispatcher == "local":  # only the all-to-all dispatcher reads these (moe_engine.train)
            for name, default in (("fixed_splits", False), ("a2a_chunks", 1), ("weights_to_experts", True)):
                if getattr(self, name) != default:
                    _fail(f"parallel.{name}", getattr(self, name), "read by parallel.dispatcher = 'all_to_all' only: "
                          f"set it, or leave this at {default!r}")
        if self.expert_parallel_size > 1 and self.dispatcher != "all_to_all":
            _fail("parallel.expert_parallel_size", self.expert_parallel_size, "needs parallel.dispatcher = 'all_to_all'")


@dataclass
class DataConfig:
    """Multi-task data: embedded tasks, or a local folder.

    name "digits": the classification tasks of moe_engine.mtl.digits, or a folder laid out as
    moe_engine.mtl.data describes. name "generalist": the image and text tasks of
    moe_engine.mtl.generalist.embedded, or a folder laid out as moe_engine.mtl.generalist.data
    describes, mixed per step as `mixing` says.
    """

    name: Literal["digits", "generalist", "text"] = "digits"
    tasks: list[str] = field(default_factory=lambda: ["digit", "parity", "left", "right"])
    # A folder with train/test Parquet or JSON Lines files and tasks.json; null: build in memory.
    path: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 256
    eval_fraction: float = 0.2
    # Examples drawn per embedded task (digits: image pairs).
    pairs_per_task: int = 3000
    # Generalist only: how a training batch is mixed from the tasks. "size": each task in proportion to
    # its train split; "temperature": proportional to size^(1/mixing_temperature); "fixed": mixing_weights.
    mixing: Literal["size", "temperature", "fixed"] = "size"
    mixing_weights: dict[str, float] | None = None
    mixing_temperature: float = 2.0
    # "mixed": every batch draws each example's task; "per_task": each batch comes from one task.
    batching: Literal["mixed", "per_task"] = "mixed"
    # Text (causal_lm): "bytes", a local Hugging Face tokenizer folder, or null (the model's folder, then
    # data.path, if either holds a tokenizer; else bytes). packing: documents packed into full rows,
    # end-of-text between them, GPT-style: plain causal attention, so a document attends to the
    # ones before it in its row; false: one document per row (truncated, padded), attending to itself only.
    tokenizer: str | None = None
    packing: bool = True

    def __post_init__(self) -> None:
        _check_choices(self, "data")
        _check_positive("data", mixing_temperature=self.mixing_temperature)
        if self.name in ("digits", "text"):
            for name, value, default in (("mixing", self.mixing, "size"), ("batching", self.batching, "mixed"),
                                         ("mixing_weights", self.mixing_weights, None), ("mixing_temperature", self.mixing_temperature, 2.0)):
                if value != default:
                    _fail(f"data.{name}", value, f"{self.name} data is always mixed by task size in every batch; this needs data.name = 'generalist'")
        if self.mixing == "fixed" and not self.mixing_weights:
            _fail("data.mixing_weights", self.mixing_weights, "data.mixing = 'fixed' needs a weight per task, e.g. {digit: 2.0, caption: 1.0}")
        if self.name != "text":
            for name, value, default in (("tokenizer", self.tokenizer, None), ("packing", self.packing, True)):
                if value != default:
                    _fail(f"data.{name}", value, f"read by data.name = 'text' (causal_lm) only; {self.name} data has its "
                          f"own tokens: leave it at {default!r}")
        # The mixer (moe_engine.mtl.generalist.mixing) refuses these too, but only when training starts.
        if self.mixing_weights is not None and self.mixing != "fixed":
            _fail("data.mixing_weights", self.mixing_weights, f"read by data.mixing = 'fixed' only, and data.mixing = "
                  f"{self.mixing!r}: set data.mixing = fixed, or data.mixing_weights = null")
        if self.mixing_temperature != 2.0 and self.mixing != "temperature":
            _fail("data.mixing_temperature", self.mixing_temperature, f"read by data.mixing = 'temperature' only, and "
                  f"data.mixing = {self.mixing!r}: set data.mixing = temperature, or leave it at 2.0")
        if self.mixing_weights is not None:
            unknown = sorted(set(self.mixing_weights) - set(self.tasks))
            missing = sorted(set(self.tasks) - set(self.mixing_weights))
            if unknown or missing or any(w < 0 for w in self.mixing_weights.values()):
                _fail("data.mixing_weights", self.mixing_weights, f"needs one weight >= 0 per task of data.tasks {self.tasks} (unknown: {unknown}, missing: {missing})")
            if not any(w > 0 for w in self.mixing_weights.values()):
                _fail("data.mixing_weights", self.mixing_weights, "every weight is 0, so no task would be drawn: give at least one task a weight > 0")
        if not self.tasks:
            _fail("data.tasks", self.tasks, "must name at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            _fail("data.tasks", self.tasks, "must not repeat a task")
        if self.name == "text" and self.path is None:
            _fail("data.path", None, "data.name = 'text' needs a folder with train/test .jsonl or .parquet files (a `text` column)")
        if self.path is None:  # the embedded tasks; a data.path brings its own
            if self.name == "digits":
                from moe_engine.mtl.digits import DIGIT_TASKS as embedded
            else:
                from moe_engine.mtl.generalist.embedded import EMBEDDED_TASKS as embedded
            unknown = [t for t in self.tasks if t not in embedded]
            if unknown:
                _fail("data.tasks", self.tasks, f"{unknown} unknown; the embedded {self.name} tasks are {', '.join(embedded)}")
        _check_positive(
            "data", batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
            pairs_per_task=self.pairs_per_task,
        )
        if not 0.0 < self.eval_fraction < 1.0:
            _fail("data.eval_fraction", self.eval_fraction, "must be in (0, 1)")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and a decay schedule."""

    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 30
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # Fraction of lr the decay ends at.
    min_lr_ratio: float = 0.05
    # Clip the global gradient norm to this; null: no clipping.
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        _check_choices(self, "optim")
        _check_positive("optim", lr=self.lr, eps=self.eps)
        if self.weight_decay < 0:
            _fail("optim.weight_decay", self.weight_decay, "must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            _fail("optim.betas", self.betas, "must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            _fail("optim.warmup_steps", self.warmup_steps, "must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            _fail("optim.grad_clip", self.grad_clip, "must be > 0, or null for no clipping")


@dataclass
class MTLConfig:
    """How the per-task losses become one training loss (moe_engine.mtl.weighting)."""

    # equal, uncertainty, dwa, gradnorm, pcgrad, mgda, cagrad, imtl or nash_mtl.
    weighting: str = "equal"
    # Method options, e.g. {temperature: 2.0} for dwa, {alpha: 1.5} for gradnorm, {c: 0.5} for cagrad.
    weighting_options: dict[str, int | float | bool | str] = field(default_factory=dict)
    # Learning rate of the method's own parameters (uncertainty, gradnorm, imtl); null: optim.lr.
    weighting_lr: float | None = None

    def __post_init__(self) -> None:
        from moe_engine.mtl.weighting import METHODS, method_options

        if self.weighting not in METHODS:
            close = difflib.get_close_matches(self.weighting, METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _fail("mtl.weighting", self.weighting, f"unknown{hint}; allowed: {', '.join(METHODS)}")
        if self.weighting_lr is not None:
            _check_positive("mtl", weighting_lr=self.weighting_lr)
        allowed = [name for name in method_options(self.weighting) if name != "world_size"]  # the trainer sets world_size
        unknown = sorted(set(self.weighting_options) - set(allowed))
        if unknown:
            _fail("mtl.weighting_options", self.weighting_options, f"{unknown} unknown for {self.weighting!r}; its options: {', '.join(allowed) or 'none'}")
        method = self._check_option_values()
        # The trainer builds an optimizer for the method's own parameters only when it has some.
        if self.weighting_lr is not None and not any(p.requires_grad for p in method.parameters()):
            _fail("mtl.weighting_lr", self.weighting_lr, f"mtl.weighting = {self.weighting!r} (with these options) has no "
                  "parameters of its own to learn (uncertainty, gradnorm and imtl's hybrid and loss modes do): use null")

    def _check_option_values(self) -> Any:
        """Build the method once, so its own checks of the option values run with the config (not
        when training starts), reported under their full keys; returns it."""
        from moe_engine.mtl.weighting import build_weighting

        try:
            return build_weighting(self.weighting, 2, **self.weighting_options)
        except ValueError as err:
            # The method's messages start "<option> = <value>: expected ..." (mtl.weighting.base).
            message = str(err)
            key = next((k for k in self.weighting_options if message.startswith(f"{k} = ")), None)
            where = f"mtl.weighting_options.{message}" if key else f"mtl.weighting_options = {self.weighting_options!r}: {message}"
            raise ConfigError(f"{where} (mtl.weighting = {self.weighting!r})") from err

    def needs_gram(self) -> bool:
        """Whether the method weighs the tasks from the Gram matrix of their gradients."""
        from moe_engine.mtl.weighting import build_weighting

        return build_weighting(self.weighting, 1, **self.weighting_options).needs_gram


FREEZABLE = ("experts", "routers", "backbone")


@dataclass
class FinetuneConfig:
    """Start from a pre-trained checkpoint's weights (`moe-engine finetune --from`)."""

    # A checkpoint file or folder (or a run directory: its newest checkpoint); null: train from scratch.
    init_from: str | None = None
    # Parameter groups that stay fixed: "experts", "routers", "backbone" (every other shared parameter;
    # task-specific ones such as heads and task prompts always train).
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [g for g in self.freeze if g not in FREEZABLE]
        if bad:
            _fail("finetune.freeze", self.freeze, f"{bad} unknown; allowed: {', '.join(FREEZABLE)}")
        if self.freeze and self.init_from is None:
            _fail("finetune.freeze", self.freeze, "needs finetune.init_from (freezing random weights trains nothing useful)")


@dataclass
class TrainConfig:
    """The training loop: length, device, precision, evaluation and checkpoints."""

    max_steps: int = 1200
    seed: int = 0
    # "auto": CUDA with bf16 autocast when a GPU is present, else CPU in fp32.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = 400
    checkpoint_every: int = 400
    # How many step checkpoints to keep in out_dir/checkpoints (the newest ones).
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    # Intra-op CPU threads; null: torch's default.
    num_threads: int | None = None
    # Micro-batches per optimizer step: each rank runs forward and backward on data.batch_size /
    # (grad_accum_steps * ranks) examples at a time and the gradients add up before one update,
    # the same update as the whole batch at once (the losses are normalised by the whole batch).
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        _check_choices(self, "train")
        _check_positive(
            "train", max_steps=self.max_steps, eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints,
            grad_accum_steps=self.grad_accum_steps,
        )
        if not self.out_dir.strip():
            _fail("train.out_dir", self.out_dir, "must name a folder (empty would write the run into the current directory)")
        if self.num_threads is not None and self.num_threads < 1:
            _fail("train.num_threads", self.num_threads, "must be >= 1, or null for torch's default")


@dataclass
class LoggingConfig:
    """Where metrics go: a CSV file and TensorBoard in out_dir, a progress bar on the terminal."""

    log_every: int = 10
    csv: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    # Task x expert utilisation and routing entropy per MoE layer: logged every log_every steps,
    # drawn as out_dir/routing/task_expert_layer{l}.png at the end of the run.
    routing_telemetry: bool = True

    def __post_init__(self) -> None:
        _check_choices(self, "logging")
        _check_positive("logging", log_every=self.log_every)


# What model.architecture = 'causal_lm' does not read: the pre-trained model defines them.
_CAUSAL_LM_UNREAD_MODEL = (
    "d_model", "num_layers", "num_heads", "ffn_hidden", "moe_every", "patch_size", "moe_attention", "share_routing",
    "block_task_embed", "dropout",
)
_CAUSAL_LM_UNREAD_MOE = ("ffn_hidden", "activation", "num_shared_experts", "shared_expert_gate")


@dataclass
class Config:
    """One run: every section, each validated on construction."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mtl: MTLConfig = field(default_factory=MTLConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        data_of = {"multitask": "digits", "generalist": "generalist", "causal_lm": "text"}
        if data_of[self.model.architecture] != self.data.name:
            _fail(
                "model.architecture", self.model.architecture,
                f"data.name = {self.data.name!r}: multitask trains on 'digits', generalist on 'generalist', causal_lm on 'text'",
            )
        if self.model.architecture == "causal_lm" and self.finetune.init_from is None:
            _fail("finetune.init_from", None, "model.architecture = 'causal_lm' fine-tunes a model: give its file or folder "
                  "(moe-engine finetune --from MODEL, e.g. the output of moe-engine convert --from-hf)")
        if self.model.architecture == "causal_lm":
            self._check_causal_lm_unread()
        ep = self.parallel.expert_parallel_size
        if self.moe.num_experts % ep:
            _fail("parallel.expert_parallel_size", ep, f"must divide moe.num_experts ({self.moe.num_experts})")
        # Under parallel.deepspeed_config, EP > 1 needs ZeRO stage 1 or 2: the DeepSpeed JSON is checked
        # when it is read (moe_engine.parallel.deepspeed_engine.load_deepspeed_config).
        accum = self.train.grad_accum_steps
        if self.data.batch_size % accum:
            _fail("train.grad_accum_steps", accum, f"must divide data.batch_size ({self.data.batch_size})")
        if accum > 1 and self.mtl.needs_gram():
            # Its task weights come from the whole batch's task gradients, but each micro-batch's
            # backward needs them first: that would take every micro-batch's graph kept at once.
            _fail("train.grad_accum_steps", accum, f"mtl.weighting = {self.mtl.weighting!r} weighs the whole batch's task "
                  "gradients before any backward: use 1, or a loss-based method (equal, uncertainty, dwa)")
        # expert_choice always has a capacity (null means 1.0).
        dropless = self.moe.router.capacity_factor is None and self.moe.router.type != "expert_choice"
        if self.parallel.fixed_splits and dropless:
            _fail("parallel.fixed_splits", True, "needs moe.router.capacity_factor (dropless routing has no fixed splits)")
        if self.train.device == "cpu":  # train.device = 'auto': the Trainer checks, once it knows the device
            from moe_engine.parallel.runtime import check_backend  # the rule's one home

            try:
                check_backend(self.parallel.backend, "cpu")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if "experts" in self.finetune.freeze and self.parallel.deepspeed_config is not None and self.parallel.expert_parallel_size > 1:
            # ZeRO builds its expert-data-parallel reduction from the optimizer's MoE param group,
            # which frozen experts leave empty (DeepSpeed asserts deep inside its optimizer).
            _fail("finetune.freeze", self.finetune.freeze, "freezing experts under DeepSpeed with "
                  f"parallel.expert_parallel_size = {self.parallel.expert_parallel_size} is not supported: DeepSpeed's "
                  "ZeRO needs trainable experts; launch with torchrun (no DeepSpeed config), or use expert_parallel_size = 1")
        if self.parallel.fixed_splits and self.model.architecture == "generalist":
            _fail("parallel.fixed_splits", True, "needs the same token count on every rank, which the generalist's "
                  "text (its rows' lengths differ by rank) does not give: use false")

    def _check_causal_lm_unread(self) -> None:
        """causal_lm builds the pre-trained model's own architecture (moe_engine.workloads.causal_lm):
        a model.* or moe.* width or structure setting changed from its default would be ignored, so
        it is refused (moe.router: by the workload, which names the model's file)."""
        changed = [
            f"{section}.{f.name}"
            for section, obj, names in (("model", self.model, _CAUSAL_LM_UNREAD_MODEL), ("moe", self.moe, _CAUSAL_LM_UNREAD_MOE))
            for f in dataclasses.fields(obj)
            if f.name in names and getattr(obj, f.name) != f.default
        ]
        if changed:
            section, name = changed[0].split(".")
            value = getattr(getattr(self, section), name)
            _fail(changed[0], value, (f"(and {', '.join(changed[1:])}) " if changed[1:] else "")
                  + "model.architecture = 'causal_lm' takes the model's widths and structure from the pre-trained model "
                  "(finetune.init_from): leave it at its default; causal_lm reads model.max_text_len, "
                  "model.activation_checkpointing, moe.num_experts, moe.experts_impl and moe.recompute_experts")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (as YAML gives it)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(data).__name__}")
    return build_dataclass(Config, data)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> Config:
    """Load a YAML config (None: the embedded defaults), apply overrides (`a.b.c=YAML` strings), then
    `values` ({"a.b.c": value}, taken as given: what command-line options set), validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {str(path)!r}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"--config {str(path)!r}: must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides or [], values))
