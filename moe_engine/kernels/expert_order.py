"""Routing metadata: the choices sorted by expert (stable), `tokens_per_expert_E`, and the inverse map.

Notation as in permute.py: T tokens, K choices per token, E experts, C = T*K choices (flat index
t*K + k into `experts_TK`), N rows after dispatch (C when dropless, fewer when capacity dropped
choices, id -1).

- `expert_order_reference`: a stable argsort of the expert ids (dropped choices sort last and are cut).
- `expert_order_triton`: a histogram + scan in two launches around one device-side cumsum, with no
  host sync when the caller knows N (dropless: T*K): pass 1 counts each expert's choices per block
  of BLOCK_C choices (column sums of a one-hot tile, no atomics, any E); pass 2 places each choice at
  its bucket's offset plus its rank inside the block, which keeps the order stable. It also returns
  row_of_choice_C (the inverse of choice_N) that the combine kernels read.
- `expert_order`: the custom op `moe_engine::expert_order` (Triton) or the reference, per `select_backend`.

Tiles can be pinned with MOE_ENGINE_EXPERT_ORDER_CONFIG; the launcher takes `config=` to force one (tests).
"""

from __future__ import annotations

import torch

from moe_engine.kernels._triton import TRITON_AVAILABLE, check_index, kernel_configs, triton
from moe_engine.kernels._triton import jit as _jit
from moe_engine.kernels.backend import select_backend

if TRITON_AVAILABLE:
    import triton.language as tl


def expert_order_reference(
    experts_TK: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the choices by expert.

    experts_TK: (T, K) int64, -1 for dropped choices. num_rows: N if the caller knows it
    (T*K when no choice is dropped); None counts the kept choices, a device-to-host sync.
    Returns choice_N: (N,) int64 flat choice indices grouped by expert, and
    tokens_per_expert_E: (E,) int64.
    """
    flat_C = experts_TK.reshape(-1)
    kept = flat_C >= 0
    tokens_per_expert_E = torch.bincount(flat_C[kept], minlength=num_experts)
    if num_rows is None:
        num_rows = int(kept.sum())  # NOTE: device-to-host sync
    # Dropped choices sort after every expert (key E) and fall off the end.
    keys_C = torch.where(kept, flat_C, num_experts)
    choice_N = torch.argsort(keys_C, stable=True)[:num_rows]
    return choice_N, tokens_per_expert_E


# Kernels

def _expert_order_configs() -> list[dict[str, int]]:
    # Not autotuned: both passes must share BLOCK_C (the offsets are per block of choices), so the
    # first candidate runs unless MOE_ENGINE_EXPERT_ORDER_CONFIG pins another. BLOCK_C^2 booleans
    # (pass 2) and BLOCK_C x BLOCK_G counters (pass 1) live in registers.
    return [{"BLOCK_C": 128, "BLOCK_G": 64, "num_warps": 4}, {"BLOCK_C": 256, "BLOCK_G": 32, "num_warps": 8}]


# Shapes: experts_C (C,) int (the flat experts_TK); counts_GB (G, B) int32 with G = E + 1 buckets
# (bucket E collects dropped choices and ids outside [0, E)), B = cdiv(C, BLOCK_C) blocks.
# Grid: (B, cdiv(G, BLOCK_G)).
@_jit
def _expert_count_kernel(experts_C_ptr, counts_GB_ptr, C, E, num_blocks, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr):
    # counts[g, b] = #{c in block b : bucket(c) = g}, as column sums of a one-hot tile (no atomics,
    # and any E: the buckets are tiled over the second grid axis).
    pid_b = tl.program_id(0)
    offs_c = pid_b.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    e_c = tl.load(experts_C_ptr + offs_c, mask=mask_c, other=-1)
    bucket_c = tl.where((e_c >= 0) & (e_c < E), e_c, E).to(tl.int32)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    onehot_CG = (bucket_c[:, None] == offs_g[None, :]) & mask_c[:, None]
    counts_g = tl.sum(onehot_CG.to(tl.int32), axis=0)
    tl.store(counts_GB_ptr + offs_g.to(tl.int64) * num_blocks + pid_b, counts_g, mask=offs_g <= E)


# Shapes: experts_C (C,) int; offsets_GB (G, B) int32, the exclusive prefix sum of counts_GB in
# bucket-major order, i.e. offsets[g, b] = sum_{g' < g} count(g') + sum_{b' < b} counts[g, b'];
# choice_N (N,) int64; row_of_choice_C (C,) int32. Grid: (B,).
@_jit
def _expert_scatter_kernel(
    experts_C_ptr, offsets_GB_ptr, choice_N_ptr, row_of_choice_C_ptr, C, E, num_blocks, num_rows, BLOCK_C: tl.constexpr
):
    # The stable sort of the buckets: row(c) = offsets[bucket(c), block(c)] + rank(c), with
    # rank(c) = #{c' < c in the same block with bucket(c') = bucket(c)}; rows >= num_rows are cut
    # off (dropped choices sit in the last bucket, so they go first). Each choice is written once.
    pid_b = tl.program_id(0)
    offs_i = tl.arange(0, BLOCK_C)
    offs_c = pid_b.to(tl.int64) * BLOCK_C + offs_i
    mask_c = offs_c < C
    e_c = tl.load(experts_C_ptr + offs_c, mask=mask_c, other=-1)
    bucket_c = tl.where((e_c >= 0) & (e_c < E), e_c, E).to(tl.int32)
    earlier_CC = (bucket_c[:, None] == bucket_c[None, :]) & (offs_i[None, :] < offs_i[:, None]) & mask_c[None, :]
    rank_c = tl.sum(earlier_CC.to(tl.int32), axis=1)
    base_c = tl.load(offsets_GB_ptr + bucket_c.to(tl.int64) * num_blocks + pid_b, mask=mask_c, other=0)
    row_c = base_c + rank_c
    has_row = mask_c & (row_c < num_rows)
    tl.store(choice_N_ptr + row_c, offs_c, mask=has_row)
    tl.store(row_of_choice_C_ptr + offs_c, tl.where(has_row, row_c, -1), mask=mask_c)


# Launcher, custom op and public op

def _launch_config(op: str, candidates: list[dict[str, int]], config: dict[str, int] | None) -> dict[str, int]:
    if config is not None:
        return config
    chosen = kernel_configs(op, candidates)[0]
    return {**chosen.kwargs, "num_warps": chosen.num_warps}


def expert_order_triton(
    experts_TK: torch.Tensor, num_experts: int, num_rows: int | None = None, config: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `expert_order`: (choice_N (N,) int64, tokens_per_expert_E (E,) int64, row_of_choice_C (C,) int32).

    Two launches around one device-side cumsum; a device-to-host sync only when num_rows is None.
    """
    check_index("experts_TK", experts_TK, 2, experts_TK.device)
    if num_experts < 1:
        raise ValueError(f"num_experts = {num_experts}: expected >= 1")
    if num_rows is not None and num_rows < 0:
        raise ValueError(f"num_rows = {num_rows}: expected >= 0 or None")
    experts_C = experts_TK.reshape(-1).contiguous()
    num_choices = experts_C.numel()
    if num_choices >= 2**31:
        raise ValueError(f"{num_choices} choices: the row indices are int32, expected fewer than 2**31")
    device = experts_C.device
    if num_choices == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, torch.zeros(num_experts, dtype=torch.int64, device=device), empty.to(torch.int32)
    cfg = _launch_config("expert_order", _expert_order_configs(), config)
    block_c, block_g, num_warps = cfg["BLOCK_C"], cfg["BLOCK_G"], cfg.get("num_warps", 4)
    num_blocks, num_buckets = triton.cdiv(num_choices, block_c), num_experts + 1
    counts_GB = torch.empty(num_buckets, num_blocks, dtype=torch.int32, device=device)
    _expert_count_kernel[(num_blocks, triton.cdiv(num_buckets, block_g))](
        experts_C, counts_GB, num_choices, num_experts, num_blocks, BLOCK_C=block_c, BLOCK_G=block_g,
        num_warps=num_warps,
    )
    counts_G = counts_GB.sum(dim=1)  # int64
    tokens_per_expert_E = counts_G[:num_experts]
    if num_rows is None:
        num_rows = num_choices - int(counts_G[num_experts])  # NOTE: device-to-host sync (sizes choice_N)
    num_rows = min(num_rows, num_choices)
    offsets_GB = (torch.cumsum(counts_GB.view(-1), dim=0, dtype=torch.int32) - counts_GB.view(-1)).view_as(counts_GB)
    choice_N = torch.empty(num_rows, dtype=torch.int64, device=device)
    row_of_choice_C = torch.empty(num_choices, dtype=torch.int32, device=device)
    _expert_scatter_kernel[(num_blocks,)](
        experts_C, offsets_GB, choice_N, row_of_choice_C, num_choices, num_experts, num_blocks, num_rows,
        BLOCK_C=block_c, num_warps=num_warps,
    )
    return choice_N, tokens_per_expert_E, row_of_choice_C


@torch.library.custom_op("moe_engine::expert_order", mutates_args=())
def _expert_order_op(
    experts_TK: torch.Tensor, num_experts: int, num_rows: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return expert_order_triton(experts_TK, num_experts, num_rows)


@_expert_order_op.register_fake
def _(experts_TK, num_experts, num_rows):
    num_choices = experts_TK.numel()
    rows = torch.library.get_ctx().new_dynamic_size() if num_rows is None else torch.sym_min(num_rows, num_choices)
    return (experts_TK.new_empty(rows, dtype=torch.int64), experts_TK.new_empty(num_experts, dtype=torch.int64),
            experts_TK.new_empty(num_choices, dtype=torch.int32))


def expert_order(
    experts_TK: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(choice_N (N,) int64, tokens_per_expert_E (E,) int64); see `expert_order_reference`."""
    if select_backend("expert_order", experts_TK.device, has_triton=TRITON_AVAILABLE) == "triton":
        choice_N, tokens_per_expert_E, _ = torch.ops.moe_engine.expert_order(experts_TK, num_experts, num_rows)
        return choice_N, tokens_per_expert_E
    return expert_order_reference(experts_TK, num_experts, num_rows)
