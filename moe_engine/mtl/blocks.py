"""`TaskMoEBlock`: a pre-norm transformer block whose attention and FFN may each be a mixture of experts.

    x   <- x + task_embed[task of each token]                   (Mod-Squad: before every block)
    x   <- x + dropout(attn(LayerNorm(x)))                      MoEAttention or dense attention
    x   <- x + dropout(ffn(LayerNorm(x)))                       MoELayer or dense MLP

share_routing=True is Conditional MoE / Uni-Perceiver-MoE's coupling (Zhu et al. 2022): the FFN
reuses the attention's routing decision for the same tokens, so a token meets the same experts
in both halves of the block and one router (and one aux loss) serves both.

With a key padding mask, padding keys are masked in attention and only the non-padding tokens
are routed, in both halves (see moe_engine.mtl.moe_attention); padding positions skip the MoE FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_engine.layer import MoELayer, MoEOutput
from moe_engine.mtl.moe_attention import MoEAttention, check_key_padding_mask, select_context, unpadded_tokens
from moe_engine.mtl.statistics import check_task_ids
from moe_engine.routing.types import Routing, RoutingContext


@dataclass(frozen=True)
class TaskBlockOutput:
    """x: (B, S, D), the block's output. aux_loss: () float32, the weighted aux losses of the
    routers that ran in this block, each counted once. routings: the routing decisions made in
    this block, attention's first, tokens in (B*S) order; a shared decision appears once."""

    x: torch.Tensor
    aux_loss: torch.Tensor
    routings: tuple[Routing, ...]


def block_routers(blocks) -> list[nn.Module]:
    """The router of each routing decision of a stack of TaskMoEBlocks, in the order their forward
    returns the routings: per MoE block the attention's (MoE attention), then the FFN's unless it shares."""
    routers = []
    for block in blocks:
        if block.moe_attention:
            routers.append(block.attn.router)
        if block.moe_ffn and not block.share_routing:
            routers.append(block.ffn.router)
    return routers


class TaskMoEBlock(nn.Module):
    """Pre-norm block over (B, S, D) with MoE or dense attention and MoE or dense FFN.

    Args:
        d_model: D.
        num_heads: H; must match `attn.num_heads` where the attention module has that attribute.
        attn: an MoEAttention (forward(x_BSD, ctx, routing) -> (y, Routing)) or a dense attention
            module (forward(x_BSD) -> y_BSD).
        ffn: a moe_engine.layer.MoELayer (forward(x, ctx, routing) -> MoEOutput) or a dense MLP
            (forward(x) -> y).
        dropout: on both residual branches, in training only.
        share_routing: the FFN MoELayer reuses the attention's routing (needs an MoEAttention and
            an MoELayer over the same number of experts). The FFN's own router then never runs:
            its parameters get no gradient (build the MoELayer with any small router, and tell
            DDP to expect unused parameters if it holds one).
        task_embed: nn.Embedding(num_tasks, D) whose row for each token's task
            (ctx.task_ids_T) is added to x before the block (Mod-Squad).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        attn: nn.Module,
        ffn: nn.Module,
        dropout: float = 0.0,
        share_routing: bool = False,
        task_embed: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout = {dropout}: must be in [0, 1)")
        attn_heads = getattr(attn, "num_heads", num_heads)
        if attn_heads != num_heads:
            raise ValueError(f"num_heads = {num_heads}: attn has num_heads = {attn_heads}; they must match")
        if task_embed is not None and task_embed.embedding_dim != d_model:
            raise ValueError(
                f"task_embed.embedding_dim = {task_embed.embedding_dim}: must equal d_model = {d_model}"
            )
        if share_routing:
            if not isinstance(attn, MoEAttention):
                raise ValueError(f"share_routing = True: attn must be an MoEAttention, got {type(attn).__name__}")
            if not isinstance(ffn, MoELayer):
                raise ValueError(f"share_routing = True: ffn must be an MoELayer, got {type(ffn).__name__}")
            if attn.num_experts != ffn.dispatcher.num_experts:
                raise ValueError(
                    f"share_routing = True: attn has num_experts = {attn.num_experts} but ffn has "
                    f"{ffn.dispatcher.num_experts}; a shared routing needs the same number of experts"
                )
        self.d_model, self.num_heads = d_model, num_heads
        self.share_routing = share_routing
        self.task_embed = task_embed
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = attn
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout)

    @property
    def moe_attention(self) -> bool:
        return isinstance(self.attn, MoEAttention)

    @property
    def moe_ffn(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(
        self, x_BSD: torch.Tensor, ctx: RoutingContext | None = None, key_padding_mask_BS: torch.Tensor | None = None
    ) -> TaskBlockOutput:
        """x_BSD: (B, S, D); ctx: per token of the flattened (B*S) input (task ids for task_embed
        and for task-conditional routers).

        key_padding_mask_BS: (B, S) bool, True where a token is padding: no query attends to it,
        and the routers see only the R other tokens, so this block's routings cover those R tokens
        in (B*S) order; a padding position gets no MoE FFN output (its residual passes through).
        Every sequence needs at least one non-padding token. None: every token is real (the
        behaviour without the argument, unchanged).
        """
        B, S, D = x_BSD.shape
        if key_padding_mask_BS is not None:
            check_key_padding_mask(key_padding_mask_BS, B, S)
        if self.task_embed is not None:
            task_ids_T = ctx.task_ids_T if ctx is not None else None
            task_ids_T = check_task_ids(task_ids_T, B * S, self.task_embed.num_embeddings, "TaskMoEBlock.task_embed")
            x_BSD = x_BSD + self.task_embed(task_ids_T).view(B, S, D).to(x_BSD.dtype)
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        routings: list[Routing] = []

        h_BSD = self.norm_attn(x_BSD)
        attn_routing = None
        if self.moe_attention:
            a_BSD, attn_routing = self.attn(h_BSD, ctx, key_padding_mask_BS=key_padding_mask_BS)
            aux_loss = aux_loss + attn_routing.aux_loss
            routings.append(attn_routing)
        elif key_padding_mask_BS is not None:
            a_BSD = self.attn(h_BSD, key_padding_mask_BS=key_padding_mask_BS)
        else:
            a_BSD = self.attn(h_BSD)
        x_BSD = x_BSD + self.dropout(a_BSD)

        h_BSD = self.norm_ffn(x_BSD)
        if self.moe_ffn:
            f_BSD, out = self._moe_ffn(h_BSD, ctx, attn_routing if self.share_routing else None, key_padding_mask_BS)
            # With a shared routing the layer skips its router and returns 0 aux: counted above.
            aux_loss = aux_loss + out.aux_loss
            if not self.share_routing:
                routings.append(out.routing)
        else:
            f_BSD = self.ffn(h_BSD)
        return TaskBlockOutput(x_BSD + self.dropout(f_BSD), aux_loss, tuple(routings))

    def _moe_ffn(
        self, h_BSD: torch.Tensor, ctx: RoutingContext | None, routing: Routing | None,
        key_padding_mask_BS: torch.Tensor | None,
    ) -> tuple[torch.Tensor, MoEOutput]:
        """(the MoE FFN's output (B, S, D), the layer's MoEOutput), the FFN run on non-padding tokens only."""
        if key_padding_mask_BS is None:
            out = self.ffn(h_BSD, ctx, routing=routing)
            return out.y, out
        B, S, D = h_BSD.shape
        token_R = unpadded_tokens(key_padding_mask_BS)
        h_TD = h_BSD.reshape(B * S, D)
        out = self.ffn(h_TD.index_select(0, token_R), select_context(ctx, token_R), routing=routing)
        return h_TD.new_zeros(B * S, D).index_copy(0, token_R, out.y).view(B, S, D), out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, share_routing={self.share_routing}"
