"""`MoEAttention`: self-attention whose query and output projections are experts (Mod-Squad's MoA).

Notation: B sequences of S tokens of width D, T = B*S tokens, H heads of width A, Q = H*A,
E experts, K choices per token, C = T*K choices, N rows after routing (C when dropless).

Each expert e owns a query projection Wq_e (Q, D) and an output projection Wo_e (D, Q); the key
and value projections are shared by all experts (Mod-Squad, Chen et al. 2023; Zhang et al.
2022's mixture of attention heads). For token t of sequence b with routing choices (e_tk, w_tk):

    q_tk = Wq_{e_tk} x_t                                     (Q,) = H heads of width A
    o_tk = MHA(q_tk, K_b, V_b),  K_b = x_b Wk^T, V_b = x_b Wv^T  (softmax(q K^T / sqrt(A)) V per head)
    y_t  = sum_k w_tk Wo_{e_tk} o_tk

The expert projections run as grouped GEMMs over rows grouped by expert (the same kernels as
the FFN experts), and the attention runs once for all choices: a token's K queries are K extra
query heads that share the sequence's keys and values.

Padding (key_padding_mask_BS, True = padding): padding keys are masked out of every attention,
and only the R non-padding tokens are routed. A padding position's output is read by nothing but
its own (masked) position in later layers, so routing it would only cost expert rows, take
capacity from real tokens and skew the balance statistics; skipping it keeps a sequence's
result independent of how much padding its batch carries, under capacity limits too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.kernels.expert_order import expert_order
from moe_engine.kernels.grouped_gemm import grouped_gemm
from moe_engine.kernels.permute import unpermute
from moe_engine.routing.types import Routing, RoutingContext


def check_key_padding_mask(key_padding_mask_BS: torch.Tensor, batch: int, seq_len: int) -> None:
    """Raises ValueError unless key_padding_mask_BS is a (batch, seq_len) bool tensor."""
    if key_padding_mask_BS.dtype != torch.bool or tuple(key_padding_mask_BS.shape) != (batch, seq_len):
        raise ValueError(
            f"key_padding_mask_BS has shape {tuple(key_padding_mask_BS.shape)} and dtype {key_padding_mask_BS.dtype}: "
            f"expected ({batch}, {seq_len}) bool, True where a token is padding"
        )


def attention_mask(key_padding_mask_BS: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """scaled_dot_product_attention's attn_mask for a key padding mask: (B, 1, 1, S) bool, True
    where a key takes part; None stays None (no mask, torch's unmasked kernels).

    Every row needs at least one non-padding key: a query with no key to attend to gets NaN.
    """
    if key_padding_mask_BS is None:
        return None
    check_key_padding_mask(key_padding_mask_BS, batch, seq_len)
    return ~key_padding_mask_BS[:, None, None, :]


def unpadded_tokens(key_padding_mask_BS: torch.Tensor) -> torch.Tensor:
    """(R,) int64: the flat (B*S) index of each non-padding token, in order."""
    # NOTE: device-to-host sync: R, the number of real tokens, sizes everything routed after.
    return torch.nonzero(~key_padding_mask_BS.reshape(-1)).squeeze(1)


def select_context(ctx: RoutingContext | None, token_R: torch.Tensor) -> RoutingContext | None:
    """The rows token_R of every per-token field of ctx (fields that are None stay None)."""
    if ctx is None:
        return None

    def rows(field: torch.Tensor | None) -> torch.Tensor | None:
        return None if field is None else field.index_select(0, token_R.to(field.device))

    return RoutingContext(rows(ctx.task_ids_T), rows(ctx.attributes_TA), rows(ctx.sequence_ids_T))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # The grouped GEMM is not on autocast's op lists: cast by hand to what autocast would pick.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoEAttention(nn.Module):
    """Multi-head self-attention over (B, S, D) with E query/output projection experts.

    Args:
        d_model: D.
        num_heads: H.
        num_experts: E; must equal `router.num_experts`.
        router: any router of the moe_engine interface: forward(x_TD, ctx) -> Routing over E experts
            (TopKRouter, the task-conditional routers of moe_engine.mtl, ...).
        head_dim: A; default D // H (then H must divide D).
        dropout: attention-probability dropout, applied in training only.

    Parameters: w_q (E, Q, D) and w_o (E, D, Q) in nn.Linear's (out, in) layout per expert;
    kv_proj: nn.Linear(D, 2Q), rows [keys | values], each H heads of A.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_experts: int,
        router: nn.Module,
        *,
        head_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: must be >= 1")
        if num_heads < 1:
            raise ValueError(f"num_heads = {num_heads}: must be >= 1")
        if num_experts < 1:
            raise ValueError(f"num_experts = {num_experts}: must be >= 1")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"num_heads = {num_heads}: must divide d_model = {d_model} when head_dim is not given"
                )
            head_dim = d_model // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim = {head_dim}: must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout}: must be in [0, 1)")
        router_experts = getattr(router, "num_experts", None)
        if router_experts != num_experts:
            raise ValueError(
                f"router.num_experts = {router_experts}: must equal num_experts = {num_experts}"
            )
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.num_experts = num_experts
        self.dropout = dropout
        self.router = router
        inner = num_heads * head_dim
        self.w_q = nn.Parameter(torch.empty(num_experts, inner, d_model))
        self.w_o = nn.Parameter(torch.empty(num_experts, d_model, inner))
        self.kv_proj = nn.Linear(d_model, 2 * inner, bias=False)
        # nn.Linear's default init per expert, so every expert starts like a dense projection.
        nn.init.uniform_(self.w_q, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w_o, -1 / math.sqrt(inner), 1 / math.sqrt(inner))

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(
        self,
        x_BSD: torch.Tensor,
        ctx: RoutingContext | None = None,
        routing: Routing | None = None,
        key_padding_mask_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Routing]:
        """x_BSD: (B, S, D) any float dtype -> (y_BSD (B, S, D) in x's dtype, the Routing used).

        ctx: per token of the flattened (B*S) input, handed to the router. routing: a decision made
        elsewhere for the routed tokens, used as is (the router is then skipped); its aux_loss
        stays where it was made. Dropped choices (expert -1, weight 0) contribute nothing.
        key_padding_mask_BS: (B, S) bool, True where a token is padding (see the module docstring):
        padding keys are masked, only the R other tokens are routed (ctx stays per B*S token; the
        rows are selected here), the Routing covers those R tokens in (B*S) order, and padding
        positions output 0. Every sequence needs at least one non-padding token. None: all B*S
        tokens are routed and attention is unmasked.
        """
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.d_model:
            raise ValueError(f"x_BSD has shape {tuple(x_BSD.shape)}: expected (B, S, {self.d_model})")
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        token_R = None
        if key_padding_mask_BS is not None:
            check_key_padding_mask(key_padding_mask_BS, B, S)
            token_R = unpadded_tokens(key_padding_mask_BS)
        num_routed = B * S if token_R is None else token_R.shape[0]
        if routing is None:
            if token_R is None:
                routing = self.router(x_TD, ctx)
            else:
                routing = self.router(x_TD.index_select(0, token_R), select_context(ctx, token_R))
        elif routing.experts_TK.shape[0] != num_routed or routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing for {routing.experts_TK.shape[0]} tokens over {routing.num_experts} experts given to "
                f"an MoEAttention of {self.num_experts} experts with {num_routed} tokens"
            )
        top_k = routing.top_k
        # Dropless routing has exactly R*K rows, so sizing them needs no device-to-host sync.
        num_rows = routing.experts_TK.numel() if routing.capacity is None else None
        choice_N, tokens_per_expert_E = expert_order(routing.experts_TK, self.num_experts, num_rows)
        # Each row's token and its slot among the B*S*K query heads (t*K + k), in the B*S layout.
        token_N, slot_N = choice_N // top_k, choice_N
        if token_R is not None:
            token_N = token_R.index_select(0, token_N)
            slot_N = token_N * top_k + choice_N % top_k

        dtype = _compute_dtype(x_BSD)
        x_TD = x_TD.to(dtype)
        # Queries in expert order, each row read from its token through the index (no permuted copy).
        q_NQ = grouped_gemm(x_TD, self.w_q.to(dtype), tokens_per_expert_E, token_N)
        o_CQ = self._attend(q_NQ, slot_N, x_TD, B, S, top_k, key_padding_mask_BS)
        y_ND = grouped_gemm(o_CQ, self.w_o.to(dtype), tokens_per_expert_E, slot_N)
        y_TD = unpermute(y_ND, choice_N, routing.weights_TK, num_routed)
        if token_R is not None:
            y_TD = y_TD.new_zeros(B * S, D).index_copy(0, token_R, y_TD)
        return y_TD.view(B, S, D).to(x_BSD.dtype), routing

    def _attend(
        self, q_NQ: torch.Tensor, slot_N: torch.Tensor, x_TD: torch.Tensor, B: int, S: int, top_k: int,
        key_padding_mask_BS: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of every choice's query over its sequence: (B*S*K, Q) rows in slot order t*K + k.

        Slots without a row (dropped choices, padding tokens) get a zero query; their outputs are never read.
        """
        H, A = self.num_heads, self.head_dim
        q_CQ = q_NQ.new_zeros(B * S * top_k, H * A).index_copy(0, slot_N, q_NQ)
        # Query heads ordered (h, k): head h*K + k reads key/value head h, which is the grouping
        # `enable_gqa` uses, so the keys and values are shared across choices without K copies.
        q_BGSA = q_CQ.view(B, S, top_k, H, A).permute(0, 3, 2, 1, 4).reshape(B, H * top_k, S, A)
        kv_BS2HA = F.linear(x_TD, self.kv_proj.weight.to(x_TD.dtype)).view(B, S, 2, H, A)
        k_BHSA, v_BHSA = kv_BS2HA.permute(2, 0, 3, 1, 4).unbind(0)
        o_BGSA = F.scaled_dot_product_attention(
            q_BGSA, k_BHSA, v_BHSA, attn_mask=attention_mask(key_padding_mask_BS, B, S),
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=top_k > 1,
        )
        return o_BGSA.view(B, H, top_k, S, A).permute(0, 3, 2, 1, 4).reshape(B * S * top_k, H * A)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_experts={self.num_experts}, dropout={self.dropout}"
        )
