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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.kernels.grouped_gemm import grouped_gemm
from moe_engine.kernels.permute import expert_order, unpermute
from moe_engine.routing.types import Routing, RoutingContext


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
        self, x_BSD: torch.Tensor, ctx: RoutingContext | None = None, routing: Routing | None = None
    ) -> tuple[torch.Tensor, Routing]:
        """x_BSD: (B, S, D) any float dtype -> (y_BSD (B, S, D) in x's dtype, the Routing used).

        ctx: per token of the flattened (B*S) input, handed to the router. routing: a decision made
        elsewhere for these B*S tokens, used as is (the router is then skipped); its aux_loss
        stays where it was made. Dropped choices (expert -1, weight 0) contribute nothing.
        """
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.d_model:
            raise ValueError(f"x_BSD has shape {tuple(x_BSD.shape)}: expected (B, S, {self.d_model})")
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        if routing is None:
            routing = self.router(x_TD, ctx)
        elif routing.experts_TK.shape[0] != B * S or routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing for {routing.experts_TK.shape[0]} tokens over {routing.num_experts} experts given to "
                f"an MoEAttention of {self.num_experts} experts with {B * S} tokens"
            )
        top_k = routing.top_k
        # Dropless routing has exactly T*K rows, so sizing them needs no device-to-host sync.
        num_rows = routing.experts_TK.numel() if routing.capacity is None else None
        choice_N, tokens_per_expert_E = expert_order(routing.experts_TK, self.num_experts, num_rows)

        dtype = _compute_dtype(x_BSD)
        x_TD = x_TD.to(dtype)
        # Queries in expert order, each row read from its token through the index (no permuted copy).
        q_NQ = grouped_gemm(x_TD, self.w_q.to(dtype), tokens_per_expert_E, choice_N // top_k)
        o_CQ = self._attend(q_NQ, choice_N, x_TD, B, S, top_k)
        y_ND = grouped_gemm(o_CQ, self.w_o.to(dtype), tokens_per_expert_E, choice_N)
        y_TD = unpermute(y_ND, choice_N, routing.weights_TK, B * S)
        return y_TD.view(B, S, D).to(x_BSD.dtype), routing

    def _attend(
        self, q_NQ: torch.Tensor, choice_N: torch.Tensor, x_TD: torch.Tensor, B: int, S: int, top_k: int
    ) -> torch.Tensor:
        """Attention of every choice's query over its sequence: (C, Q) rows in choice order t*K + k.

        Choices without a row (dropped) get a zero query; their outputs are never read.
        """
        H, A = self.num_heads, self.head_dim
        q_CQ = q_NQ.new_zeros(B * S * top_k, H * A).index_copy(0, choice_N, q_NQ)
        # Query heads ordered (h, k): head h*K + k reads key/value head h, which is the grouping
        # `enable_gqa` uses, so the keys and values are shared across choices without K copies.
        q_BGSA = q_CQ.view(B, S, top_k, H, A).permute(0, 3, 2, 1, 4).reshape(B, H * top_k, S, A)
        kv_BS2HA = F.linear(x_TD, self.kv_proj.weight.to(x_TD.dtype)).view(B, S, 2, H, A)
        k_BHSA, v_BHSA = kv_BS2HA.permute(2, 0, 3, 1, 4).unbind(0)
        o_BGSA = F.scaled_dot_product_attention(
            q_BGSA, k_BHSA, v_BHSA, dropout_p=self.dropout if self.training else 0.0, enable_gqa=top_k > 1
        )
        return o_BGSA.view(B, H, top_k, S, A).permute(0, 3, 2, 1, 4).reshape(B * S * top_k, H * A)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_experts={self.num_experts}, dropout={self.dropout}"
        )
