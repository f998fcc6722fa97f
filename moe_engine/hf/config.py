"""`MoECausalLMConfig`: the shape of an MoE decoder-only LM, read from and written to the config
classes of Hugging Face transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE.

One dataclass covers the four families: what differs between them is a handful of switches
(q/k/v bias, q/k norm per head or over the whole projection, clip_qkv, a shared expert with a
sigmoid gate, dense layers, renormalised top-k weights, sliding-window attention). `from_hf`
reads each family's fields with the semantics its modeling code gives them (transformers 5.x);
`to_hf(family)` refuses, naming every reason, a model the family cannot express.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moe_engine.config import ConfigError, MoEConfig, RouterConfig
from moe_engine.experts import EXPERT_IMPLS

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
QK_NORMS = ("none", "per_head", "whole")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"hf.{name} = {value!r}: {allowed}")


@dataclass
class MoECausalLMConfig:
    """Every field the forward reads, plus a few (token ids, max_position_embeddings,
    initializer_range) carried only so an exported config.json keeps them."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    # Width F of each routed expert's SwiGLU MLP.
    moe_ffn_hidden: int
    # Width of the dense SwiGLU MLP of the layers in `dense_layers` (Qwen's intermediate_size).
    dense_ffn_hidden: int
    # Layers whose FFN is a dense MLP instead of an MoE layer (Qwen's mlp_only_layers / decoder_sparse_step).
    dense_layers: list[int] = field(default_factory=list)
    # Divide the top-k softmax weights by their sum (Mixtral always; the others' norm_topk_prob).
    renormalize: bool = True
    # Qwen2-MoE's shared expert: a dense SwiGLU MLP of this width every token passes through; 0: none.
    shared_expert_ffn_hidden: int = 0
    # Scale the shared expert's output by sigmoid(x . w_gate) per token (Qwen2-MoE).
    shared_expert_gate: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    # RMSNorm on queries and keys: "per_head" over head_dim (Qwen3-MoE), "whole" over the whole
    # projection before the heads are split (OLMoE), or "none".
    qk_norm: str = "none"
    # Clamp q, k and v to [-clip_qkv, clip_qkv] after the projections (OLMoE); None: no clamp.
    clip_qkv: float | None = None
    # Each query sees only the last `sliding_window` keys (itself included); None: full causal.
    sliding_window: int | None = None
    # Layers that keep full causal attention when sliding_window is set (Qwen2-MoE's layer_types).
    full_attention_layers: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    # Hugging Face's router_aux_loss_coef; see `moe_config` for how moe_engine's per-layer loss uses it.
    router_aux_loss_coef: float = 0.001
    # Mixtral's training-time multiplicative noise on the MoE input, uniform in [1 - j, 1 + j].
    router_jitter_noise: float = 0.0
    # moe_engine's choice of grouped-GEMM implementation (not part of any Hugging Face config).
    experts_impl: str = "auto"
    # moe_engine's moe.recompute_experts: the experts keep no activations for the backward (not HF's).
    recompute_experts: bool = False
    # moe_engine's model.activation_checkpointing: each decoder layer recomputed in the backward.
    activation_checkpointing: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "num_experts", "moe_ffn_hidden", "dense_ffn_hidden"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be >= 1")
        if self.num_heads % self.num_kv_heads:
            _fail("num_kv_heads", self.num_kv_heads, f"must divide num_heads = {self.num_heads}")
        if self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be even (rotary embeddings rotate pairs)")
        if not 1 <= self.top_k <= self.num_experts:
            _fail("top_k", self.top_k, f"must be in [1, num_experts = {self.num_experts}]")
        for name in ("dense_layers", "full_attention_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                _fail(name, getattr(self, name), f"layers {bad} are outside [0, num_layers = {self.num_layers})")
        if not self.moe_layer_ids:
            _fail("dense_layers", self.dense_layers, "leaves no MoE layer; this is a dense model")
        if self.shared_expert_ffn_hidden < 0:
            _fail("shared_expert_ffn_hidden", self.shared_expert_ffn_hidden, "must be >= 0")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden:
            _fail("shared_expert_gate", True, "needs shared_expert_ffn_hidden >= 1")
        if self.qk_norm not in QK_NORMS:
            _fail("qk_norm", self.qk_norm, f"allowed: {', '.join(QK_NORMS)}")
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            _fail("clip_qkv", self.clip_qkv, "must be > 0, or None")
        if self.sliding_window is not None and self.sliding_window < 1:
            _fail("sliding_window", self.sliding_window, "must be >= 1, or None")
        if self.experts_impl not in EXPERT_IMPLS:
            _fail("experts_impl", self.experts_impl, f"allowed: {', '.join(EXPERT_IMPLS)}")
        for name in ("recompute_experts", "activation_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        for name in ("rms_norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be > 0")
        if not 0.0 <= self.attention_dropout < 1.0:
            _fail("attention_dropout", self.attention_dropout, "must be in [0, 1)")
        if not 0.0 <= self.router_jitter_noise < 1.0:
            _fail("router_jitter_noise", self.router_jitter_noise, "must be in [0, 1)")
        if self.router_aux_loss_coef < 0:
            _fail("router_aux_loss_coef", self.router_aux_loss_coef, "must be >= 0")

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.dense_layers]

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, None for full causal attention."""
        return None if layer in self.full_attention_layers else self.sliding_window

    def moe_config(self) -> MoEConfig:
        """The routed part of each MoE layer as moe_engine's MoEConfig (what `make_dispatcher` sees).

        The shared expert is built by the model itself: its width need not be a multiple of the
        experts'. The balance loss is moe_engine's per-layer Switch loss, E * sum_i f_i P_i with
        f_i the share of the T*K choices; Hugging Face's is K times that, pooled over the layers
        (f and P summed over all layers before their product) and added once. Each layer here gets
        coef * K / L (L MoE layers), the same scale; the value differs from Hugging Face's where
        the layers' loads differ, since a product of sums is not a sum of products.
        """
        coef = self.router_aux_loss_coef * self.top_k / len(self.moe_layer_ids)
        router = RouterConfig(
            type="softmax_topk", top_k=self.top_k, renormalize=self.renormalize, aux_loss_type="switch",
            aux_loss_coef=coef, z_loss_coef=0.0,
        )
        return MoEConfig(
            num_experts=self.num_experts, ffn_hidden=self.moe_ffn_hidden, activation="swiglu",
            experts_impl=self.experts_impl, recompute_experts=self.recompute_experts, router=router,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoECausalLMConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"hf config has unknown fields {unknown}; allowed: {', '.join(sorted(names))}")
        return cls(**data)

    @classmethod
    def from_hf(cls, hf_config: Any) -> MoECausalLMConfig:
        """From a transformers config object (MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig)."""
        family = hf_family(hf_config)
        c = hf_config
        act = getattr(c, "hidden_act", "silu")
        if act != "silu":
            _fail("hidden_act", act, "allowed: 'silu' (moe_engine's experts are SwiGLU)")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        common = dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=_rope_theta(c),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            attention_dropout=float(getattr(c, "attention_dropout", 0.0)),
            router_aux_loss_coef=c.router_aux_loss_coef, max_position_embeddings=c.max_position_embeddings,
            initializer_range=c.initializer_range, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id, top_k=c.num_experts_per_tok,
        )
        if family == "mixtral":
            return cls(
                **common, num_experts=c.num_local_experts, moe_ffn_hidden=c.intermediate_size,
                dense_ffn_hidden=c.intermediate_size, renormalize=True, sliding_window=c.sliding_window,
                router_jitter_noise=float(c.router_jitter_noise),
            )
        if family == "olmoe":
            if head_dim != c.hidden_size // c.num_attention_heads:
                _fail("head_dim", head_dim, f"OLMoE needs hidden_size // num_attention_heads = {c.hidden_size // c.num_attention_heads}")
            return cls(
                **common, num_experts=c.num_experts, moe_ffn_hidden=c.intermediate_size,
                dense_ffn_hidden=c.intermediate_size, renormalize=bool(c.norm_topk_prob),
                qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias), qk_norm="whole", clip_qkv=c.clip_qkv,
            )
        # Qwen2-MoE and Qwen3-MoE: dense layers by mlp_only_layers and decoder_sparse_step.
        if c.num_experts < 1:
            _fail("num_experts", c.num_experts, "must be >= 1 (a config without experts is a dense model)")
        step = c.decoder_sparse_step
        dense = [i for i in range(c.num_hidden_layers) if i in (c.mlp_only_layers or []) or (i + 1) % step]
        qwen = dict(
            **common, num_experts=c.num_experts, moe_ffn_hidden=c.moe_intermediate_size,
            dense_ffn_hidden=c.intermediate_size, dense_layers=dense, renormalize=bool(c.norm_topk_prob),
        )
        if family == "qwen2_moe":
            types = list(c.layer_types)
            sliding = "sliding_attention" in types
            return cls(
                **qwen, shared_expert_ffn_hidden=c.shared_expert_intermediate_size, shared_expert_gate=True,
                qkv_bias=bool(c.qkv_bias), sliding_window=c.sliding_window if sliding else None,
                full_attention_layers=[i for i, t in enumerate(types) if t != "sliding_attention"] if sliding else [],
            )
        return cls(
            **qwen, qkv_bias=bool(c.attention_bias), o_bias=bool(c.attention_bias), qk_norm="per_head",
            sliding_window=c.sliding_window if getattr(c, "use_sliding_window", False) else None,
        )

    def unsupported_by(self, family: str) -> list[str]:
        """Why `family` cannot express this model (empty when it can)."""
        if family not in FAMILIES:
            return [f"family {family!r} is not one of {', '.join(FAMILIES)}"]
        reasons = []

        def need(ok: bool, why: str) -> None:
            if not ok:
                reasons.append(why)

        if family in ("mixtral", "olmoe"):
            need(not self.dense_layers, f"dense_layers = {self.dense_layers} (every {family} layer is MoE)")
        if family != "qwen2_moe":
            need(not self.shared_expert_ffn_hidden, f"a shared expert (shared_expert_ffn_hidden = {self.shared_expert_ffn_hidden})")
        else:
            need(self.shared_expert_ffn_hidden > 0 and self.shared_expert_gate, "no gated shared expert (qwen2_moe always has one)")
        if family == "mixtral":
            need(self.renormalize, "renormalize = False (Mixtral always renormalises)")
            need(not (self.qkv_bias or self.o_bias), "attention biases")
        if family == "qwen2_moe":
            need(not self.o_bias, "o_bias = True")
        if family in ("qwen3_moe", "olmoe"):
            need(self.qkv_bias == self.o_bias, f"qkv_bias = {self.qkv_bias} != o_bias = {self.o_bias} (one attention_bias)")
        expected_norm = {"qwen3_moe": "per_head", "olmoe": "whole"}.get(family, "none")
        need(self.qk_norm == expected_norm, f"qk_norm = {self.qk_norm!r} ({family} has {expected_norm!r})")
        if family != "olmoe":
            need(self.clip_qkv is None, f"clip_qkv = {self.clip_qkv}")
        else:
            need(self.sliding_window is None, f"sliding_window = {self.sliding_window}")
            need(self.head_dim == self.hidden_size // self.num_heads, f"head_dim = {self.head_dim} != hidden_size // num_heads")
        if family != "qwen2_moe":
            need(not self.full_attention_layers, f"full_attention_layers = {self.full_attention_layers} (one window for all layers)")
        if family != "mixtral":
            need(self.router_jitter_noise == 0, f"router_jitter_noise = {self.router_jitter_noise}")
        return reasons

    def to_hf(self, family: str) -> Any:
        """The transformers config of `family` for this model; ConfigError naming every field it cannot hold."""
        reasons = self.unsupported_by(family)
        if reasons:
            raise ConfigError(f"this model cannot be written as {family}: {'; '.join(reasons)}")
        import transformers
        from packaging.version import Version

        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, initializer_range=self.initializer_range,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=self.attention_dropout, router_aux_loss_coef=self.router_aux_loss_coef,
            num_experts_per_tok=self.top_k, bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if Version(transformers.__version__) >= Version("5"):
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            kwargs["rope_theta"] = self.rope_theta
        if self.head_dim != self.hidden_size // self.num_heads or family in ("mixtral", "qwen3_moe"):
            kwargs["head_dim"] = self.head_dim
        if family == "mixtral":
            kwargs.update(num_local_experts=self.num_experts, intermediate_size=self.moe_ffn_hidden,
                          sliding_window=self.sliding_window, router_jitter_noise=self.router_jitter_noise)
        elif family == "olmoe":
            kwargs.update(num_experts=self.num_experts, intermediate_size=self.moe_ffn_hidden,
                          norm_topk_prob=self.renormalize, attention_bias=self.qkv_bias, clip_qkv=self.clip_qkv)
        else:
            kwargs.update(num_experts=self.num_experts, moe_intermediate_size=self.moe_ffn_hidden,
                          intermediate_size=self.dense_ffn_hidden, norm_topk_prob=self.renormalize,
                          mlp_only_layers=list(self.dense_layers), decoder_sparse_step=1,
                          use_sliding_window=self.sliding_window is not None,
                          sliding_window=self.sliding_window if self.sliding_window is not None else 4096)
            if family == "qwen2_moe":
                kwargs.update(
                    shared_expert_intermediate_size=self.shared_expert_ffn_hidden, qkv_bias=self.qkv_bias,
                    max_window_layers=self.num_layers,
                    layer_types=[
                        "sliding_attention" if self.window_of(i) is not None else "full_attention"
                        for i in range(self.num_layers)
                    ],
                )
            else:
                kwargs.update(attention_bias=self.qkv_bias)
        return transformers.AutoConfig.for_model(family, **kwargs)


def hf_family(hf_config: Any) -> str:
    """The family name (transformers' model_type) of a transformers config; ConfigError if unsupported."""
    family = getattr(hf_config, "model_type", None)
    if family not in FAMILIES:
        raise ConfigError(f"hf config model_type = {family!r}: allowed: {', '.join(FAMILIES)}")
    return family


def _rope_theta(c: Any) -> float:
    """rope_theta of plain (default) rotary embeddings; ConfigError for scaled variants."""
    params = getattr(c, "rope_parameters", None)
    if isinstance(params, dict) and "rope_type" in params:
        rope_type, theta = params["rope_type"], params.get("rope_theta")
    else:  # transformers 4.x: rope_theta and rope_scaling
        scaling = getattr(c, "rope_scaling", None) or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        theta = getattr(c, "rope_theta", None)
    if rope_type != "default":
        _fail("rope_type", rope_type, "allowed: 'default' (scaled rotary embeddings are not implemented)")
    if theta is None:
        _fail("rope_theta", theta, "must be set")
    return float(theta)
