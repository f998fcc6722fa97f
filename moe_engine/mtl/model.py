"""A small multi-task transformer with MoE feed-forward blocks: the default job's model.

Images become patch tokens; a learned task token is prepended, so every layer (and every
router, through `RoutingContext.task_ids_T` and the token attributes) knows which task a
sequence serves; the task token's final state feeds that task's head. Blocks are pre-norm
(moe_engine.mtl.blocks.TaskMoEBlock); block i uses an MoE FFN when (i + 1) % moe_every == 0, a
dense MLP otherwise, and with model.moe_attention its attention is a mixture of experts too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.config import ModelConfig, MoEConfig
from moe_engine.experts import MLP
from moe_engine.layer import MoELayer
from moe_engine.mtl.attribute_router import AttributeRouter
from moe_engine.mtl.blocks import TaskMoEBlock, block_routers
from moe_engine.mtl.moe_attention import MoEAttention, attention_mask
from moe_engine.mtl.tasks import TaskSpec
from moe_engine.parallel import TokenDispatcher
from moe_engine.recompute import run_block
from moe_engine.routers import build_any_router
from moe_engine.routing import Routing, RoutingContext


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, S, D) with torch's fused scaled_dot_product_attention."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, key_padding_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """x_BSD: (B, S, D) -> (B, S, D). key_padding_mask_BS: (B, S) bool, True where a token is
        padding, which no query attends to (each row needs one False: see moe_attention.attention_mask)."""
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask(key_padding_mask_BS, B, S),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(B, S, D))


@dataclass(frozen=True)
class MultiTaskOutput:
    """features_BD: the task token's final state per example. aux_loss: () float32, summed over
    the routers. routings: one Routing per routing decision (`MultiTaskTransformer.routers`, in
    that order), tokens in (B*S) order."""

    features_BD: torch.Tensor
    aux_loss: torch.Tensor
    routings: tuple[Routing, ...]


class MultiTaskTransformer(nn.Module):
    """Images (B, H, W) and task ids (B,) -> task-token features; `logits` applies a task's head.

    make_dispatcher: builds each MoE block's token dispatcher (default: LocalDispatcher), the seam
    through which expert parallelism attaches without the model calling a collective.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig,
        tasks: Sequence[TaskSpec],
        image_shape: tuple[int, int],
        make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None = None,
    ) -> None:
        super().__init__()
        height, width = image_shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"model.patch_size = {p}: must divide the image shape {image_shape}")
        self.patch_size = p
        self.activation_checkpointing = cfg.activation_checkpointing
        self.tasks = tuple(tasks)
        num_patches = (height // p) * (width // p)
        self.patch_embed = nn.Linear(p * p, cfg.d_model)
        self.task_embed = nn.Embedding(len(tasks), cfg.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1 + num_patches, cfg.d_model))
        nn.init.normal_(self.pos_embed, std=0.02)
        blocks = []
        for i in range(cfg.num_layers):
            attn: nn.Module = SelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
            if (i + 1) % cfg.moe_every == 0:
                dispatcher = make_dispatcher(moe_cfg) if make_dispatcher else None
                ffn: nn.Module = MoELayer.from_config(
                    cfg.d_model, moe_cfg, dispatcher, num_tasks=len(self.tasks), num_attributes=self.num_attributes
                )
                if cfg.moe_attention:
                    router = build_any_router(
                        cfg.d_model, moe_cfg.num_experts, moe_cfg.router, num_tasks=len(self.tasks),
                        num_attributes=self.num_attributes,
                    )
                    attn = MoEAttention(cfg.d_model, cfg.num_heads, moe_cfg.num_experts, router, dropout=cfg.dropout)
                    if cfg.share_routing:
                        ffn.router = router  # one router decides for both halves of the block
            else:
                ffn = MLP(cfg.d_model, cfg.ffn_hidden, moe_cfg.activation)
            blocks.append(TaskMoEBlock(
                cfg.d_model, cfg.num_heads, attn=attn, ffn=ffn, dropout=cfg.dropout,
                share_routing=cfg.moe_attention and cfg.share_routing and (i + 1) % cfg.moe_every == 0,
                task_embed=self._block_task_embed(cfg.d_model) if cfg.block_task_embed else None,
            ))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, t.num_classes) for t in tasks)

    def _block_task_embed(self, d_model: int) -> nn.Embedding:
        """Mod-Squad's task embedding of one block, initialised like the position embedding."""
        embed = nn.Embedding(len(self.tasks), d_model)
        nn.init.normal_(embed.weight, std=0.02)
        return embed

    @property
    def num_attributes(self) -> int:
        """Attributes per token (see `token_attributes`)."""
        return 2 + len(self.tasks)

    def token_attributes(self, task_ids_B: torch.Tensor, seq_len: int) -> torch.Tensor:
        """attributes_TA (B*S, 2 + num_tasks) float32, Uni-Perceiver-style bits per token:
        [is the task token, is an image patch, one-hot of the task]."""
        B = task_ids_B.shape[0]
        role_SA = torch.zeros(seq_len, 2, device=task_ids_B.device)
        role_SA[0, 0] = 1.0
        role_SA[1:, 1] = 1.0
        task_BA = F.one_hot(task_ids_B, len(self.tasks)).float()
        return torch.cat([role_SA.expand(B, -1, -1), task_BA[:, None].expand(-1, seq_len, -1)], dim=-1).reshape(B * seq_len, -1)

    def _reads_attributes(self) -> bool:
        return any(isinstance(router, AttributeRouter) for router in self.routers)

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFN layers (whose experts a dispatcher places), in order."""
        return [b.ffn for b in self.blocks if b.moe_ffn]

    @property
    def routers(self) -> list[nn.Module]:
        """The router of each routing decision of a forward, in the order of `MultiTaskOutput.routings`:
        per MoE block the attention's (with model.moe_attention), then the FFN's unless it shares."""
        return block_routers(self.blocks)

    def patchify(self, images_BHW: torch.Tensor) -> torch.Tensor:
        """(B, H, W) -> (B, P, p*p), patches in row-major order."""
        B, H, W = images_BHW.shape
        p = self.patch_size
        patches = images_BHW.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
        return patches.reshape(B, (H // p) * (W // p), p * p)

    def forward(self, images_BHW: torch.Tensor, task_ids_B: torch.Tensor) -> MultiTaskOutput:
        tokens_BPD = self.patch_embed(self.patchify(images_BHW))
        x_BSD = torch.cat([self.task_embed(task_ids_B)[:, None], tokens_BPD], dim=1) + self.pos_embed
        B, S, _ = x_BSD.shape
        ctx = RoutingContext(
            task_ids_T=task_ids_B.repeat_interleave(S),
            # Built only for routers that read them: the other routers would never look.
            attributes_TA=self.token_attributes(task_ids_B, S) if self._reads_attributes() else None,
            sequence_ids_T=torch.arange(B, device=x_BSD.device).repeat_interleave(S),
        )
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        routings = []
        for block in self.blocks:
            out = run_block(block, x_BSD, ctx, checkpointed=self.activation_checkpointing)
            x_BSD = out.x
            aux_loss = aux_loss + out.aux_loss
            routings.extend(out.routings)
        return MultiTaskOutput(self.norm(x_BSD[:, 0]), aux_loss, tuple(routings))

    def logits(self, features_BD: torch.Tensor, task: int) -> torch.Tensor:
        """(B, D) -> (B, num_classes of `task`)."""
        return self.heads[task](features_BD)
