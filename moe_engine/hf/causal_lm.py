"""`MoECausalLM`: a decoder-only MoE language model of moe_engine parts that computes what
transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE compute.

Each layer: x + attn(rms(x)), then x + ffn(rms(x)), with ffn an `MoELayer` (softmax top-k router,
`GroupedExperts`, optionally Qwen2-MoE's sigmoid-gated shared expert) or a dense SwiGLU `MLP`.
Attention is grouped-query attention over rotary embeddings (Hugging Face's rotate_half
convention: the head's first and second halves are the pair rotated together) through
`F.scaled_dot_product_attention`. Tokens are B sequences of S; T = B*S tokens enter the MoE layers.

Parameter names follow Hugging Face's where the tensors are the same (q_proj, ..., o_proj, q_norm,
k_norm); the MoE and dense MLPs are moe_engine's (router.weight, experts.w_in (E, 2F, D) gate rows
first, experts.w_out (E, D, F), w_in/w_out of an MLP). moe_engine.hf.state maps the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from packaging.version import Version
from torch import nn

from moe_engine.config import MoEConfig
from moe_engine.experts import MLP, GroupedExperts
from moe_engine.hf.config import MoECausalLMConfig
from moe_engine.layer import MoELayer
from moe_engine.mtl.moe_attention import unpadded_tokens
from moe_engine.parallel import TokenDispatcher
from moe_engine.recompute import run_block
from moe_engine.routing import Routing
from moe_engine.routing.router import TopKRouter

# SDPA's enable_gqa (keys and values shared by groups of query heads, no copy) arrived in torch 2.5.
_SDPA_HAS_GQA = Version(torch.__version__.split("+")[0]) >= Version("2.5")
IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, normalised in fp32 and cast back to x's
    dtype before the weight, as Hugging Face's LlamaRMSNorm family does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(
    position_ids_BS: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, S, head_dim) in `dtype`: angle p * theta^(-2i/head_dim) at dims i and i + head_dim/2.
    Computed in fp32 from int positions, as transformers' default rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids_BS.device) / head_dim))
    freqs_BSH = position_ids_BS[..., None].float() * inv_freq
    angles = torch.cat((freqs_BSH, freqs_BSH), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x_BHSd: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] for halves x1, x2 of the head dim."""
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHSd * cos_BSd[:, None] + rotated * sin_BSd[:, None]


def attention_mask(
    batch: int, seq: int, window: int | None, keep_BS: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """bool (B or 1, 1, S, S), True where query q may read key k: k <= q, k > q - window, and k not
    padding. None when that is plain causal attention (SDPA's is_causal then does it).

    A padded query that may read nothing reads itself: SDPA would return NaN for an empty row,
    and NaN at a padded position would reach the real ones through 0 * NaN in later layers.
    """
    if keep_BS is None and (window is None or window >= seq):
        return None
    q = torch.arange(seq, device=device)[:, None]
    k = torch.arange(seq, device=device)[None, :]
    allowed_SS = k <= q
    if window is not None:
        allowed_SS = allowed_SS & (k > q - window)
    if keep_BS is None:
        return allowed_SS[None, None]
    allowed_BSS = allowed_SS[None] & keep_BS.bool()[:, None, :]
    allowed_BSS = allowed_BSS | torch.eye(seq, dtype=torch.bool, device=device)[None]
    return allowed_BSS[:, None]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and the families' optional q/k norms,
    biases and clamp. forward(x_BSD, cos, sin, mask) -> (B, S, D)."""

    def __init__(self, cfg: MoECausalLMConfig) -> None:
        super().__init__()
        D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, d
        self.q_proj = nn.Linear(D, H * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            per_head = cfg.qk_norm == "per_head"
            self.q_norm = RMSNorm(d if per_head else H * d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d if per_head else G * d, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.dropout = cfg.attention_dropout

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "whole":  # OLMoE: over the whole projection, before the heads split
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, self.num_heads, self.head_dim)
        k = k.view(B, S, self.num_kv_heads, self.head_dim)
        v = v.view(B, S, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":  # Qwen3-MoE: over each head's head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = {}
        if self.num_kv_heads != self.num_heads:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
                v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=mask is None,
            scale=self.head_dim**-0.5, **gqa,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


def build_moe_layer(cfg: MoECausalLMConfig, dispatcher: TokenDispatcher | None = None) -> MoELayer:
    """One MoE FFN: softmax top-k router, SwiGLU GroupedExperts (the dispatcher's local share of
    them) and, for Qwen2-MoE, the shared expert with its sigmoid gate."""
    moe_cfg = cfg.moe_config()
    D = cfg.hidden_size
    num_local = dispatcher.num_local_experts if dispatcher is not None else cfg.num_experts
    shared = MLP(D, cfg.shared_expert_ffn_hidden, "swiglu") if cfg.shared_expert_ffn_hidden else None
    return MoELayer(
        router=TopKRouter.from_config(D, cfg.num_experts, moe_cfg.router),
        experts=GroupedExperts(num_local, D, cfg.moe_ffn_hidden, "swiglu", cfg.experts_impl,
                               recompute=cfg.recompute_experts),
        dispatcher=dispatcher,
        shared_experts=shared,
        shared_expert_gate=nn.Linear(D, 1, bias=False) if cfg.shared_expert_gate else None,
    )


class DecoderLayer(nn.Module):
    """x + attn(input_norm(x)), then x + mlp(post_attn_norm(x)); mlp an MoELayer or a dense MLP."""

    def __init__(self, cfg: MoECausalLMConfig, layer: int, dispatcher: TokenDispatcher | None) -> None:
        super().__init__()
        self.window = cfg.window_of(layer)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = layer not in cfg.dense_layers
        self.mlp: nn.Module = (
            build_moe_layer(cfg, dispatcher) if self.is_moe else MLP(cfg.hidden_size, cfg.dense_ffn_hidden, "swiglu")
        )
        self.jitter = cfg.router_jitter_noise

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, masks: dict[int | None, torch.Tensor | None],
        token_R: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Routing | None, torch.Tensor | None]:
        """-> (x_BSD, the MoE layer's routing or None, its weighted aux loss or None).

        token_R (R,) int64: the flat (B*S) indices of the real tokens, in order, when some are padding:
        only those are routed (the routing covers them alone, the balance loss counts them alone, and
        under expert parallelism no padding row is exchanged); a padding position gets no MoE output.
        None: every token is real."""
        x_BSD = x_BSD + self.attn(self.input_norm(x_BSD), cos, sin, masks[self.window])
        h_BSD = self.post_attn_norm(x_BSD)
        if not self.is_moe:
            return x_BSD + self.mlp(h_BSD), None, None
        if self.training and self.jitter > 0:
            # Mixtral's jitter: multiplicative noise on what both the router and the experts read.
            h_BSD = h_BSD * torch.empty_like(h_BSD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        if token_R is None:
            out = self.mlp(h_BSD)
            return x_BSD + out.y, out.routing, out.aux_loss
        B, S, D = h_BSD.shape
        h_TD = h_BSD.reshape(B * S, D)
        out = self.mlp(h_TD.index_select(0, token_R))
        y_BSD = h_TD.new_zeros(B * S, D).index_copy(0, token_R, out.y.to(h_TD.dtype)).view(B, S, D)
        return x_BSD + y_BSD, out.routing, out.aux_loss


@dataclass(frozen=True)
class CausalLMOutput:
    """logits: (B, S, V) in the model's dtype. aux_loss: () float32, the MoE layers' weighted balance
    losses summed. lm_loss: () float32 mean next-token cross-entropy over labels != -100, None
    without labels. loss: lm_loss + aux_loss, None without labels. routings: one per MoE layer."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    lm_loss: torch.Tensor | None
    loss: torch.Tensor | None
    routings: tuple[Routing, ...]


class MoECausalLM(nn.Module):
    """Token ids (B, S) -> next-token logits (B, S, V).

    make_dispatcher: builds each MoE layer's token dispatcher from the layers' MoEConfig (default:
    all experts local), the seam through which expert parallelism attaches, as in
    moe_engine.mtl.model.MultiTaskTransformer.
    """

    def __init__(
        self, config: MoECausalLMConfig, make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        moe_cfg = config.moe_config()
        # As transformers: the pad token's row gets no gradient from the lookup (an id outside the
        # vocabulary, which some configs carry, means no padding row).
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, make_dispatcher(moe_cfg) if make_dispatcher and i in config.moe_layer_ids else None)
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output projection where the config ties them (after any
        load that assigns new tensors)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFN layers (whose experts a dispatcher places), in order."""
        return [layer.mlp for layer in self.layers if layer.is_moe]

    @property
    def routers(self) -> list[nn.Module]:
        """The router of each MoE layer, in the order of `CausalLMOutput.routings`."""
        return [moe.router for moe in self.moe_layers]

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        position_ids_BS: torch.Tensor | None = None,
        labels_BS: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """input_ids_BS (B, S) int64. attention_mask_BS (B, S): 1 for tokens, 0 for padding (padded
        positions' logits are meaningless; padding is not routed, so the routings and the balance
        loss cover the real tokens only, as transformers' balance loss with an attention mask). position_ids_BS (B, S): default 0..S-1 in every row, as
        Hugging Face's forward without a cache. labels_BS (B, S) int64: the token ids to predict,
        shifted inside (position s predicts labels[s + 1]), -100 where ignored."""
        if input_ids_BS.dim() != 2:
            raise ValueError(f"input_ids has shape {tuple(input_ids_BS.shape)}: expected (batch, seq)")
        B, S = input_ids_BS.shape
        device = input_ids_BS.device
        x_BSD = self.embed_tokens(input_ids_BS)
        if position_ids_BS is None:
            position_ids_BS = torch.arange(S, device=device)[None]
        cos, sin = rotary_cos_sin(position_ids_BS, self.config.head_dim, self.config.rope_theta, x_BSD.dtype)
        if attention_mask_BS is not None and attention_mask_BS.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask_BS.shape)}: expected {(B, S)}")
        windows = {layer.window for layer in self.layers}
        masks = {w: attention_mask(B, S, w, attention_mask_BS, device) for w in windows}
        token_R = None
        if attention_mask_BS is not None and not bool(attention_mask_BS.all()):
            token_R = unpadded_tokens(attention_mask_BS == 0)
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        routings = []
        for layer in self.layers:
            x_BSD, routing, layer_aux = run_block(
                layer, x_BSD, cos, sin, masks, token_R, checkpointed=self.config.activation_checkpointing
            )
            if routing is not None:
                routings.append(routing)
                aux_loss = aux_loss + layer_aux
        logits_BSV = self.lm_head(self.norm(x_BSD))
        lm_loss = loss = None
        if labels_BS is not None:
            lm_loss = F.cross_entropy(
                logits_BSV[:, :-1].float().reshape(-1, logits_BSV.shape[-1]), labels_BS[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
            loss = lm_loss + aux_loss
        return CausalLMOutput(logits_BSV, aux_loss, lm_loss, loss, tuple(routings))

    def num_parameters(self) -> int:
        """Distinct parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
