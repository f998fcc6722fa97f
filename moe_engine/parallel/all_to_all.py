"""`AllToAllDispatcher`: expert parallelism. Each rank of an expert-parallel group holds E/P experts;
tokens travel to the rank of their expert and back by all-to-all.

dispatch, for the T tokens of this rank:
  1. local permute: sort the T*K choices by global expert (experts are laid out rank-major, so this
     also groups rows by destination rank)                                   -> x_ND
  2. exchange per-expert counts (P x L blocks), all-to-all the rows with uneven splits
                                                                             -> x_RD, by (source, local expert)
  3. regroup received rows by local expert (stable over sources)             -> x_MD, tokens_per_local_expert_L
combine runs the same steps backwards, then the weighted sum over each token's K choices.

Routing weights to the experts (`weights_to_experts=True`, the default): each row's routing weight
(fp32) travels with it, and experts that offer `forward_scored` (GroupedExperts) scale their own
outputs, so the combine on return is an unweighted sum. The weight gradient <dY_t, y_n> is then
taken on the expert rank, inside the experts' backward (the Triton grouped MLP takes it from its
backward GEMM's epilogue), and no rank keeps the returned expert rows (N, D) for it. The weights
cost one exchange of N floats per direction, issued with the rows by one autograd node (in the
chunked overlap below, with each chunk's rows).

Capacity mode (`fixed_splits=True` with a capacity router): every rank sends exactly C rows per
expert, zero rows padding the empty slots. Splits are then static: no count exchange, no
device-to-host sync, and static shapes, at the price of computing the padding rows. C is each
rank's own (from its token count), so in training every rank of the group must route the same
number of tokens, as in Megatron-Core's and DeepSpeed's capacity padding (the trainer refuses
batches that do not split evenly). Without grad (evaluation, whose last batch is ragged) the
dispatcher exchanges counts instead: the same result, with no assumption on shapes.

Overlap (`num_chunks > 1`, through `dispatch_compute_combine`): the T tokens are cut into
contiguous chunks (capacity slots in fixed-split mode) and each chunk's exchanges are issued
asynchronously, so chunk c+1 travels while the experts compute chunk c, and the combine of
chunk c while the experts compute chunk c+1. Backward overlaps the same way: each exchange's
reverse is issued by one autograd node and waited for by another. Every rank must issue the
same collectives in the same order, so the nodes that issue backward exchanges are chained by a
scalar "order" tensor: autograd then runs them in the reverse of the forward order on every
rank, whatever else each rank's graph holds. Results equal num_chunks = 1 up to float summation
order (expert weight gradients sum chunk by chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from moe_engine.kernels.expert_order import expert_order
from moe_engine.kernels.permute import permute, unpermute
from moe_engine.parallel.collectives import all_to_all, all_to_all_counts, all_to_all_with_weights, offrank_bytes
from moe_engine.parallel.dispatcher import experts_then_combine
from moe_engine.parallel.telemetry import TrafficMeter
from moe_engine.routing.types import Routing


@dataclass(frozen=True)
class AllToAllDispatchMeta:
    """What combine needs from dispatch.

    choice_N: (N,) flat choice indices in global-expert order (this rank's kept choices).
    weights_TK: (T, K) routing weights. send_splits/recv_splits: rows sent to / received from each
    rank. regroup_M: (M,) received-row index of each expert-grouped row (None in fixed-split mode).
    slot_N: (N,) padded-buffer row of each choice (fixed-split mode only).
    score_M: (M,) float32 routing weight of each expert-grouped row (0 for padding rows), with
    autograd graph back to weights_TK; None unless the dispatcher sends weights to the experts.
    """

    choice_N: torch.Tensor
    weights_TK: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    regroup_M: torch.Tensor | None
    slot_N: torch.Tensor | None
    score_M: torch.Tensor | None = None


class AllToAllDispatcher:
    """Moves rows to the ranks of `ep_group` that hold their experts, and back.

    num_experts: E in the whole model; the group's size P must divide it. fixed_splits: in
    capacity mode, pad each expert's rows to the capacity so splits are static. num_chunks: how
    many pieces `dispatch_compute_combine` cuts the exchanges into to overlap them with the experts.
    weights_to_experts: send each row's routing weight with it, for experts that apply it themselves
    (`forward_scored`, see the module docstring); other experts' rows are weighted on return.
    """

    def __init__(
        self, num_experts: int, ep_group: dist.ProcessGroup, *, fixed_splits: bool = False, num_chunks: int = 1,
        weights_to_experts: bool = True,
    ) -> None:
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"num_chunks = {num_chunks!r}: must be an int >= 1 (1: no overlap)")
        if not isinstance(weights_to_experts, bool):
            raise ValueError(f"weights_to_experts = {weights_to_experts!r}: must be True or False")
        self.weights_to_experts = weights_to_experts
        self.ep_size = dist.get_world_size(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"expert-parallel size {self.ep_size} does not divide num_experts {num_experts}")
        self.num_chunks = num_chunks
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.ep_rank = dist.get_rank(ep_group)
        self.group = ep_group
        self.fixed_splits = fixed_splits
        # Bytes and time of this dispatcher's exchanges (token rows only), read once a step by the trainer.
        self.traffic = TrafficMeter()

    def _static_splits(self, routing: Routing) -> bool:
        """Fixed splits: asked for, capacity routing, and grad enabled (see the module docstring)."""
        return self.fixed_splits and routing.capacity is not None and torch.is_grad_enabled()

    @property
    def local_expert_ids(self) -> range:
        """The global ids of the experts this rank holds."""
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllDispatchMeta]:
        """x_TD: (T, D) this rank's tokens. Returns x_MD (M, D) rows for the local experts grouped by
        expert, tokens_per_local_expert_L (L,) int64, and the meta that combine needs."""
        P, L = self.ep_size, self.num_local_experts
        dropless = routing.capacity is None
        num_rows = routing.experts_TK.numel() if dropless else None
        choice_N, tokens_per_expert_E = expert_order(routing.experts_TK, self.num_experts, num_rows)
        x_ND = permute(x_TD, choice_N, routing.top_k)
        if self._static_splits(routing):
            return self._dispatch_fixed(x_ND, choice_N, tokens_per_expert_E, routing)
        counts_PL = tokens_per_expert_E.view(P, L)
        # record_function ranges: the exchanges for `moe-engine profile` (inert without a profiler).
        with record_function("moe::all_to_all"):
            received_PL = all_to_all_counts(counts_PL, self.group)  # received_PL[r, l]: rows from rank r for expert l
            both = torch.stack([counts_PL.sum(1), received_PL.sum(1)]).tolist()  # NOTE: device-to-host sync (split sizes)
            send_splits, recv_splits = both
            score_R = None
            if self.weights_to_experts:
                x_RD, score_R = all_to_all_with_weights(
                    x_ND, _row_weights(routing.weights_TK, choice_N), recv_splits, send_splits, self.group, self.traffic
                )
            else:
                x_RD = all_to_all(x_ND, recv_splits, send_splits, self.group, self.traffic)
        regroup_M = _regroup_index(received_PL, x_RD.shape[0])
        x_MD = permute(x_RD, regroup_M, 1)
        score_M = score_R.index_select(0, regroup_M) if score_R is not None else None
        meta = AllToAllDispatchMeta(choice_N, routing.weights_TK, send_splits, recv_splits, regroup_M, None, score_M)
        return x_MD, received_PL.sum(0), meta

    def _dispatch_fixed(self, x_ND, choice_N, tokens_per_expert_E, routing):
        P, L, C = self.ep_size, self.num_local_experts, routing.capacity
        x_padded, slot_N = _pad_to_capacity(x_ND, choice_N, tokens_per_expert_E, routing)
        splits = [L * C] * P
        score_M = None
        with record_function("moe::all_to_all"):
            if self.weights_to_experts:
                score_padded = _padded_scores(routing.weights_TK, choice_N, slot_N, x_padded.shape[0])
                x_RD, score_R = all_to_all_with_weights(x_padded, score_padded, splits, splits, self.group, self.traffic)
                score_M = _by_local_expert(score_R, P, L)
            else:
                x_RD = all_to_all(x_padded, splits, splits, self.group, self.traffic)
        x_MD = _by_local_expert(x_RD, P, L)
        tokens_per_local_expert_L = torch.full((L,), P * C, dtype=torch.int64, device=x_ND.device)
        meta = AllToAllDispatchMeta(choice_N, routing.weights_TK, splits, splits, None, slot_N, score_M)
        return x_MD, tokens_per_local_expert_L, meta

    def experts_and_combine(
        self, experts: nn.Module, x_MD: torch.Tensor, tokens_per_local_expert_L: torch.Tensor,
        meta: AllToAllDispatchMeta,
    ) -> torch.Tensor:
        """y_TD (T, D): the local experts on the received rows, then `combine`. Where the routing weights
        came with the rows and the experts offer `forward_scored`, the experts apply them and the
        combine sums unweighted."""
        scored = getattr(experts, "forward_scored", None)
        if meta.score_M is not None and scored is not None:
            with record_function("moe::experts"):
                y_MD = scored(x_MD, tokens_per_local_expert_L, meta.score_M)
            with record_function("moe::combine"):
                return self.combine(y_MD, meta, weighted=False)
        return experts_then_combine(self, experts, x_MD, tokens_per_local_expert_L, meta)

    def combine(self, y_MD: torch.Tensor, meta: AllToAllDispatchMeta, weighted: bool = True) -> torch.Tensor:
        """y_MD: (M, D) local expert outputs in dispatch order -> y_TD: (T, D) for this rank's tokens.

        weighted=False: the rows already carry their routing weights (`experts_and_combine`); each
        token's rows are summed as they are.
        """
        num_tokens = meta.weights_TK.shape[0]
        if meta.slot_N is not None:
            P, L = self.ep_size, self.num_local_experts
            y_RD = _by_source_rank(y_MD, P, L)
            with record_function("moe::all_to_all"):
                y_padded = all_to_all(y_RD, meta.send_splits, meta.recv_splits, self.group, self.traffic)
            y_ND = y_padded.index_select(0, meta.slot_N)
        else:
            y_RD = permute(y_MD, _inverse(meta.regroup_M), 1)
            with record_function("moe::all_to_all"):
                y_ND = all_to_all(y_RD, meta.send_splits, meta.recv_splits, self.group, self.traffic)
        weights_TK = _combine_weights(meta.weights_TK, weighted)
        return unpermute(y_ND, meta.choice_N, weights_TK, num_tokens)

    def dispatch_compute_combine(
        self, x_TD: torch.Tensor, routing: Routing, experts: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """dispatch -> experts -> combine, with the exchanges cut into `num_chunks` pieces that
        overlap with the experts' compute (forward and backward). Collective over the EP group.

        x_TD: (T, D) this rank's tokens (T may be 0, or smaller than num_chunks); experts:
        (x_MD, tokens_per_local_expert_L) -> y_MD, as MoELayer calls them. Returns y_TD (T, D),
        exactly what combine(experts(*dispatch(x_TD, routing)[:2]), meta) returns, and
        tokens_per_local_expert_L (L,) int64, the rows the local experts computed (all chunks).
        """
        if self.num_chunks == 1:
            x_MD, tokens_per_local_expert_L, meta = self.dispatch(x_TD, routing)
            return self.experts_and_combine(experts, x_MD, tokens_per_local_expert_L, meta), tokens_per_local_expert_L
        params = experts.parameters() if isinstance(experts, nn.Module) else ()
        needs_grad = torch.is_grad_enabled() and (
            x_TD.requires_grad or routing.weights_TK.requires_grad or any(p.requires_grad for p in params)
        )
        # The head of the chain that orders the backward exchanges (see the module docstring).
        order = torch.zeros((), device=x_TD.device, requires_grad=needs_grad)
        # The experts apply the routing weights they receive with the rows, or the combine does.
        scored = getattr(experts, "forward_scored", None) if self.weights_to_experts else None
        if self._static_splits(routing):
            return self._overlap_fixed(x_TD, routing, experts, scored, order)
        return self._overlap(x_TD, routing, experts, scored, order)

    def _overlap(self, x_TD, routing, experts, scored, order):
        """Chunks of contiguous tokens, each dispatched and combined on its own uneven splits."""
        P, L, K, n = self.ep_size, self.num_local_experts, routing.top_k, self.num_chunks
        bounds = _chunk_bounds(x_TD.shape[0], n)
        if routing.capacity is None:
            rows_C = [(stop - start) * K for start, stop in bounds]
        else:  # capacity dropped some choices: count the kept ones of every chunk at once
            kept_T = (routing.experts_TK >= 0).sum(1)
            rows_C = torch.stack([kept_T[start:stop].sum() for start, stop in bounds]).tolist()  # NOTE: device-to-host sync
        choices, counts = [], []
        with record_function("moe::permute"):
            for (start, stop), num_rows in zip(bounds, rows_C):
                choice_N, tokens_per_expert_E = expert_order(routing.experts_TK[start:stop], self.num_experts, num_rows)
                choices.append(choice_N)
                counts.append(tokens_per_expert_E.view(P, L))
        # One count exchange for all chunks: counts_PCL[r, c, l] rows of chunk c for expert l of rank r.
        counts_PCL = torch.stack(counts, 1)
        with record_function("moe::all_to_all"):
            received_PCL = all_to_all_counts(counts_PCL, self.group)
            splits = torch.stack([counts_PCL.sum(2).T, received_PCL.sum(2).T])
            send_CP, recv_CP = splits.tolist()  # NOTE: device-to-host sync (split sizes of every chunk)

        def issue_dispatch(c):
            start, stop = bounds[c]
            with record_function("moe::permute"):
                x_ND = permute(x_TD[start:stop], choices[c], K)
            w_N = _row_weights(routing.weights_TK[start:stop], choices[c]) if scored is not None else None
            return _issue(x_ND, recv_CP[c], send_CP[c], self.group, self.traffic, w_N)

        in_flight = [issue_dispatch(0)]
        returning = []
        for c in range(n):
            if c + 1 < n:
                in_flight.append(issue_dispatch(c + 1))
            (x_RD, score_R), order = _await(in_flight[c], order, last=False)
            with record_function("moe::permute"):
                regroup_M = _regroup_index(received_PCL[:, c], x_RD.shape[0])
                x_MD = permute(x_RD, regroup_M, 1)
            with record_function("moe::experts"):
                if scored is not None:
                    y_MD = scored(x_MD, received_PCL[:, c].sum(0), score_R.index_select(0, regroup_M))
                else:
                    y_MD = experts(x_MD, received_PCL[:, c].sum(0))
            with record_function("moe::combine"):
                y_RD = permute(y_MD, _inverse(regroup_M), 1)
            returning.append(_issue(y_RD, send_CP[c], recv_CP[c], self.group, self.traffic))
        weights_TK = _combine_weights(routing.weights_TK, weighted=scored is None)
        y_chunks = []
        for c, (start, stop) in enumerate(bounds):
            (y_ND, _), order = _await(returning[c], order, last=c == n - 1)
            with record_function("moe::combine"):
                y_chunks.append(unpermute(y_ND, choices[c], weights_TK[start:stop], stop - start))
        return torch.cat(y_chunks), received_PCL.sum((0, 1))

    def _overlap_fixed(self, x_TD, routing, experts, scored, order):
        """Fixed splits: chunks of capacity slots (every expert's slots [s0, s1) at once), static splits."""
        P, L, C, D = self.ep_size, self.num_local_experts, routing.capacity, x_TD.shape[1]
        with record_function("moe::permute"):
            choice_N, tokens_per_expert_E = expert_order(routing.experts_TK, self.num_experts, None)
            x_ND = permute(x_TD, choice_N, routing.top_k)
            x_padded, slot_N = _pad_to_capacity(x_ND, choice_N, tokens_per_expert_E, routing)
        x_ECD = x_padded.view(self.num_experts, C, D)
        score_EC = None
        if scored is not None:
            score_EC = _padded_scores(routing.weights_TK, choice_N, slot_N, x_padded.shape[0]).view(self.num_experts, C)
        bounds = _chunk_bounds(C, self.num_chunks)

        def issue_dispatch(c):
            s0, s1 = bounds[c]
            splits = [L * (s1 - s0)] * P
            w_N = score_EC[:, s0:s1].reshape(-1) if score_EC is not None else None
            return _issue(x_ECD[:, s0:s1].reshape(-1, D), splits, splits, self.group, self.traffic, w_N)

        in_flight = [issue_dispatch(0)]
        returning = []
        for c, (s0, s1) in enumerate(bounds):
            if c + 1 < len(bounds):
                in_flight.append(issue_dispatch(c + 1))
            (x_RD, score_R), order = _await(in_flight[c], order, last=False)
            width = s1 - s0
            x_MD = _by_local_expert(x_RD, P, L)
            tokens_L = torch.full((L,), P * width, dtype=torch.int64, device=x_TD.device)
            with record_function("moe::experts"):
                if scored is not None:
                    y_MD = scored(x_MD, tokens_L, _by_local_expert(score_R, P, L))
                else:
                    y_MD = experts(x_MD, tokens_L)
            y_RD = _by_source_rank(y_MD, P, L)
            splits = [L * width] * P
            returning.append(_issue(y_RD, splits, splits, self.group, self.traffic))
        y_chunks = []
        for c, (s0, s1) in enumerate(bounds):
            (y_chunk, _), order = _await(returning[c], order, last=c == len(bounds) - 1)
            y_chunks.append(y_chunk.view(self.num_experts, s1 - s0, D))
        with record_function("moe::combine"):
            y_ND = torch.cat(y_chunks, 1).view(self.num_experts * C, D).index_select(0, slot_N)
            y_TD = unpermute(y_ND, choice_N, _combine_weights(routing.weights_TK, weighted=scored is None), x_TD.shape[0])
        tokens_per_local_expert_L = torch.full((L,), P * C, dtype=torch.int64, device=x_TD.device)
        return y_TD, tokens_per_local_expert_L


def _combine_weights(weights_TK: torch.Tensor, weighted: bool) -> torch.Tensor:
    """The combine's weights: the routing weights, or (not weighted: the experts applied them) ones
    without a gradient, so the combine keeps no returned rows for the backward."""
    return weights_TK if weighted else torch.ones_like(weights_TK.detach())


def _row_weights(weights_TK: torch.Tensor, choice_N: torch.Tensor) -> torch.Tensor:
    """(N,) float32: the routing weight of each dispatched row, differentiable in weights_TK."""
    return weights_TK.reshape(-1).index_select(0, choice_N).float()


def _padded_scores(weights_TK: torch.Tensor, choice_N: torch.Tensor, slot_N: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(E*C,) float32: each row's routing weight in its capacity slot, 0 in the padding slots (their rows
    are zeros and never come back anyway); differentiable in weights_TK."""
    zeros = torch.zeros(num_slots, dtype=torch.float32, device=weights_TK.device)
    return zeros.index_copy(0, slot_N, _row_weights(weights_TK, choice_N))


def _by_local_expert(rows_R: torch.Tensor, P: int, L: int) -> torch.Tensor:
    """Fixed-split rows received as (source rank, local expert, slot) -> (local expert, source rank, slot):
    a fixed transpose, no index. rows_R: (P*L*W, ...)."""
    return rows_R.view(P, L, rows_R.shape[0] // (P * L), *rows_R.shape[1:]).transpose(0, 1).reshape(rows_R.shape)


def _by_source_rank(rows_M: torch.Tensor, P: int, L: int) -> torch.Tensor:
    """The inverse of `_by_local_expert`: (local expert, source rank, slot) -> (source rank, local expert, slot)."""
    return rows_M.view(L, P, rows_M.shape[0] // (P * L), *rows_M.shape[1:]).transpose(0, 1).reshape(rows_M.shape)


def _pad_to_capacity(x_ND, choice_N, tokens_per_expert_E, routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_padded (E*C, D): each expert's rows in its C slots, zeros in the empty ones; slot_N (N,) the slot of each row)."""
    C = routing.capacity
    expert_N = routing.experts_TK.reshape(-1).index_select(0, choice_N)
    starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    slot_N = expert_N * C + (torch.arange(choice_N.numel(), device=x_ND.device) - starts_E[expert_N])
    x_padded = x_ND.new_zeros(tokens_per_expert_E.numel() * C, x_ND.shape[1]).index_copy(0, slot_N, x_ND)
    return x_padded, slot_N


def _chunk_bounds(size: int, num_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of num_chunks contiguous pieces of range(size), sizes differing by at most 1 (some may be empty)."""
    stops = [size * (c + 1) // num_chunks for c in range(num_chunks)]
    return list(zip([0, *stops[:-1]], stops))


def _regroup_index(received_PL: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(M,) received-row index of each row regrouped by local expert.

    Received rows come by (source rank, local expert); a stable sort by local expert regroups them.
    """
    P, L = received_PL.shape
    local_expert_R = torch.repeat_interleave(
        torch.arange(L, device=received_PL.device).repeat(P), received_PL.reshape(-1), output_size=num_rows
    )
    return torch.argsort(local_expert_R, stable=True)


def _inverse(index_M: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(index_M)
    inverse[index_M] = torch.arange(index_M.numel(), device=index_M.device)
    return inverse


class _Pending:
    """One all-to-all in flight: issued now, waited for later. Exchanges the rows and, where given,
    one weight per row (two collectives, rows first, in both directions). Keeps the tensors it reads
    and writes alive until it has finished, and counts the rows' off-rank bytes in `meter` (the time
    is the wait: what the exchange cost the compute that could not overlap it)."""

    def __init__(self, group, meter: TrafficMeter | None) -> None:
        self.group, self.meter = group, meter
        self.works: list = []
        self.tensors: tuple[torch.Tensor, ...] = ()
        self.bytes = (0, 0)
        self.splits: tuple[list[int], list[int]] = ([], [])
        self.grad_input: tuple[torch.Tensor, ...] | None = None

    def issue(self, xs: tuple[torch.Tensor, ...], output_splits: list[int], input_splits: list[int]) -> tuple[torch.Tensor, ...]:
        """Start the exchange of every tensor of xs (rows, then weights) with the same splits; their outputs."""
        xs = tuple(x.contiguous() for x in xs)
        outs = tuple(x.new_empty(sum(output_splits), *x.shape[1:]) for x in xs)
        self.works = [dist.all_to_all_single(out, x, output_splits, input_splits, group=self.group, async_op=True)
                      for out, x in zip(outs, xs)]
        self.tensors = (*xs, *outs)
        self.bytes = offrank_bytes(xs[0], output_splits, input_splits, self.group)  # the rows; weights not counted
        return outs

    def wait(self) -> None:
        if self.meter is None:
            for work in self.works:
                work.wait()
        else:
            with self.meter.measure(*self.bytes, self.tensors[-1].is_cuda):
                for work in self.works:
                    work.wait()
        self.works, self.tensors = [], ()


class _IssueAllToAll(torch.autograd.Function):
    """Forward: start the exchange of x_ND (and w_N, when given), return the (not yet filled) output
    buffers: (x_RD,) or (x_RD, w_R). Backward: wait for the reverse exchange that
    `_AwaitAllToAll.backward` started; its outputs are the inputs' gradients (the gradients autograd
    hands in are only the dependency edges)."""

    @staticmethod
    def forward(ctx, x_ND, w_N, output_splits: list[int], input_splits: list[int], pending: _Pending):
        ctx.pending = pending
        pending.splits = (output_splits, input_splits)
        return pending.issue((x_ND,) if w_N is None else (x_ND, w_N), output_splits, input_splits)

    @staticmethod
    def backward(ctx, *_):
        ctx.pending.wait()
        grads, ctx.pending.grad_input = ctx.pending.grad_input, None
        return grads[0], grads[1] if len(grads) > 1 else None, None, None, None


class _AwaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange, return its outputs; pass the order chain on unless `last`.
    Backward: start the reverse exchange of the gradients (the all-to-all with the splits swapped)."""

    @staticmethod
    def forward(ctx, order, pending: _Pending, last: bool, *outs):
        pending.wait()
        ctx.pending, ctx.last = pending, last
        ctx.set_materialize_grads(True)  # an unused output's gradient is exchanged as zeros
        return outs if last else (*outs, torch.zeros_like(order))

    @staticmethod
    def backward(ctx, *grads):
        grad_outs, grad_order = (grads, None) if ctx.last else (grads[:-1], grads[-1])
        output_splits, input_splits = ctx.pending.splits
        needed = any(ctx.needs_input_grad[3:])
        ctx.pending.grad_input = ctx.pending.issue(grad_outs, input_splits, output_splits)
        if not needed:
            ctx.pending.wait()  # nobody upstream waits for it: the inputs needed no gradient
            ctx.pending.grad_input = None
        if grad_order is None:
            grad_order = torch.zeros((), device=grad_outs[0].device)
        # grad_outs only carry the edges to `_IssueAllToAll.backward`, which returns the exchanged gradients.
        return (grad_order, None, None, *(g if need else None for g, need in zip(grad_outs, ctx.needs_input_grad[3:])))


def _issue(x_ND: torch.Tensor, output_splits: list[int], input_splits: list[int], group, meter,
           w_N: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, ...], _Pending]:
    """Start an exchange of the rows x_ND and optionally one weight per row w_N (N,) float32:
    (its output buffers, filled once `_await` returns them; the exchange in flight)."""
    pending = _Pending(group, meter)
    with record_function("moe::all_to_all"):
        return _IssueAllToAll.apply(x_ND, w_N, list(output_splits), list(input_splits), pending), pending


def _await(
    in_flight: tuple[tuple[torch.Tensor, ...], _Pending], order: torch.Tensor, last: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """((the exchanged rows, the exchanged weights or None), the next link of the order chain); the
    last link closes the chain."""
    outs, pending = in_flight
    with record_function("moe::all_to_all"):
        if last:
            got = _AwaitAllToAll.apply(order, pending, True, *outs)
        else:
            *got, order = _AwaitAllToAll.apply(order, pending, False, *outs)
    got = tuple(got)
    return (got[0], got[1] if len(got) > 1 else None), order
