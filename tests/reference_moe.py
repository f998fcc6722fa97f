"""A deliberately naive reference of the whole MoE layer, for the tests to compare against.

Everything here is a Python loop over tokens, choices and experts, with one small tensor op at a
time, so that it shares no code path with moe_engine (no topk, argsort, bincount, index_add,
grouped GEMM or fused softmax). It is slow and only meant for the small shapes of the tests.

The computation runs in the inputs' dtype promoted to at least float32 (the library's routing
contract: logits, scores and weights never below fp32). Tests pass float64 copies of the
library's parameters to get a ground truth well below the library's fp32 rounding error, and
differentiate through this module with autograd to get reference gradients.

Notation: T tokens of width D, E experts, K choices per token, F expert hidden width,
H = 2F (SwiGLU: gate rows first, then up rows) or F (GELU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferenceRouting:
    """The reference router's decision.

    logits_TE, scores_TE: (T, E). weights_TK: (T, K), 0 where dropped. experts_TK: (T, K) int64,
    -1 where dropped. experts_before_drop_TK: the top-k experts before capacity drops.
    capacity: rows per expert, or None when dropless.
    """

    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    experts_before_drop_TK: torch.Tensor
    capacity: int | None


@dataclass(frozen=True)
class ReferenceOutput:
    """y_TD: (T, D) layer output. aux_loss: () weighted sum of the terms. balance_loss, z_loss: ()
    unweighted terms. tokens_per_expert: list of E ints, rows each expert computed."""

    y_TD: torch.Tensor
    aux_loss: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: list[int]
    routing: ReferenceRouting


@dataclass(frozen=True)
class SharedExpertWeights:
    """A dense MLP every token passes through: w_in (H_s, D), w_out (D, F_s), optional gate (1, D)."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    gate: torch.Tensor | None = None


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _softmax(logits_E: torch.Tensor) -> torch.Tensor:
    shifted = logits_E - logits_E.max()
    exp = torch.exp(shifted)
    return exp / exp.sum()


def _sigmoid(v: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def _logsumexp(logits_E: torch.Tensor) -> torch.Tensor:
    top = logits_E.max()
    return top + torch.log(torch.exp(logits_E - top).sum())


def capacity_of(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = max(1, ceil(cf * T * K / E))."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route(
    x_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    top_k: int,
    *,
    score_function: str = "softmax",
    renormalize: bool = True,
    scaling_factor: float = 1.0,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
) -> ReferenceRouting:
    """Token-choice top-k routing, one token and one choice at a time.

    Ties in the top-k break towards the lower expert id (random inputs have none).
    Capacity: within each expert, "position" keeps choices in (k, t) order (every first choice
    before any second choice, earlier tokens first); "score" keeps the highest weights first
    (ties: lower flat index t*K + k first). Dropped choices get expert -1 and weight 0.
    """
    dtype = _compute_dtype(x_TD, router_weight_ED)
    x_TD, w_ED = x_TD.to(dtype), router_weight_ED.to(dtype)
    num_tokens, num_experts = x_TD.shape[0], w_ED.shape[0]

    logits_rows, score_rows, weight_rows, expert_rows = [], [], [], []
    for t in range(num_tokens):
        logits_E = torch.stack([torch.dot(x_TD[t], w_ED[e]) for e in range(num_experts)])
        scores_E = _softmax(logits_E) if score_function == "softmax" else _sigmoid(logits_E)
        ranked = sorted(range(num_experts), key=lambda e: (-float(scores_E[e].detach()), e))[:top_k]
        chosen = [scores_E[e] for e in ranked]
        if renormalize:
            total = sum(chosen[1:], chosen[0])
            chosen = [c / total for c in chosen]
        logits_rows.append(logits_E)
        score_rows.append(scores_E)
        weight_rows.append([c * scaling_factor for c in chosen])
        expert_rows.append(ranked)

    experts_before_drop = [list(row) for row in expert_rows]
    capacity = None
    if capacity_factor is not None:
        capacity = capacity_of(num_tokens, top_k, num_experts, capacity_factor)
        drop_choices(expert_rows, weight_rows, num_experts, capacity, drop_policy)

    def stack_rows(rows: list[list[torch.Tensor]], width: int) -> torch.Tensor:
        if not rows:
            return torch.zeros(0, width, dtype=dtype)
        return torch.stack([torch.stack(r) for r in rows])

    return ReferenceRouting(
        logits_TE=torch.stack(logits_rows) if logits_rows else torch.zeros(0, num_experts, dtype=dtype),
        scores_TE=torch.stack(score_rows) if score_rows else torch.zeros(0, num_experts, dtype=dtype),
        weights_TK=stack_rows(weight_rows, top_k),
        experts_TK=torch.tensor(expert_rows, dtype=torch.int64).view(num_tokens, top_k),
        experts_before_drop_TK=torch.tensor(experts_before_drop, dtype=torch.int64).view(num_tokens, top_k),
        capacity=capacity,
    )


def drop_choices(
    expert_rows: list[list[int]], weight_rows: list[list[torch.Tensor]], num_experts: int, capacity: int, policy: str
) -> None:
    """In place: set every choice beyond its expert's capacity to expert -1 and a weight of 0.
    Choices that are -1 already stay dropped and take no slot.

    expert_rows[t][k], weight_rows[t][k]: the K choices of token t. "position" visits choices in
    (k, t) order; "score" by descending weight, ties by the lower flat index t*K + k.
    """
    choices = [(t, k) for t in range(len(expert_rows)) for k in range(len(expert_rows[t]))]
    if policy == "position":
        visit = sorted(choices, key=lambda tk: (tk[1], tk[0]))
    elif policy == "score":
        top_k = len(expert_rows[0]) if expert_rows else 0
        visit = sorted(choices, key=lambda tk: (-float(weight_rows[tk[0]][tk[1]].detach()), tk[0] * top_k + tk[1]))
    else:
        raise ValueError(f"unknown drop policy {policy!r}")
    taken = [0] * num_experts
    for t, k in visit:
        e = expert_rows[t][k]
        if e < 0:  # dropped before: stays dropped, takes no slot
            weight_rows[t][k] = torch.zeros_like(weight_rows[t][k])
        elif taken[e] < capacity:
            taken[e] += 1
        else:
            expert_rows[t][k] = -1
            weight_rows[t][k] = torch.zeros_like(weight_rows[t][k])


# ---------------------------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------------------------


def balance_probs(scores_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    """P's per-token distribution: softmax scores as they are; sigmoid scores divided by their row sum."""
    if score_function == "softmax":
        return scores_TE
    return torch.stack([row / row.sum() for row in scores_TE])


def switch_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i; f_i = (choices of expert i) / (T*K), P_i = mean_t probs[t, i].

    Choices of -1 are not counted in f (the denominator stays T*K).
    """
    num_tokens, num_experts = probs_TE.shape
    top_k = experts_TK.shape[1]
    total = torch.zeros((), dtype=probs_TE.dtype)
    for i in range(num_experts):
        count = sum(1 for t in range(num_tokens) for k in range(top_k) if int(experts_TK[t, k]) == i)
        f_i = count / (num_tokens * top_k)
        p_i = sum((probs_TE[t, i] for t in range(num_tokens)), torch.zeros((), dtype=probs_TE.dtype)) / num_tokens
        total = total + f_i * p_i
    return num_experts * total


def sequence_switch_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor
) -> torch.Tensor:
    """The mean over the sequences that have tokens of each sequence's own Switch loss."""
    ids = [int(s) for s in sequence_ids_T]
    losses = []
    for seq in sorted(set(ids)):
        rows = [t for t, s in enumerate(ids) if s == seq]
        losses.append(switch_loss(probs_TE[rows], experts_TK[rows]))
    return sum(losses[1:], losses[0]) / len(losses)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2."""
    squares = [_logsumexp(row) ** 2 for row in logits_TE]
    return sum(squares[1:], squares[0]) / len(squares)


# ---------------------------------------------------------------------------------------------
# Experts and the layer
# ---------------------------------------------------------------------------------------------


def mlp(x_D: torch.Tensor, w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert on one token: w_out @ act(w_in @ x). SwiGLU: silu(gate) * up, gate = first F rows."""
    h_H = torch.mv(w_in_HD, x_D)
    if activation == "swiglu":
        width = w_out_DF.shape[1]
        gate, up = h_H[:width], h_H[width:]
        a_F = gate * _sigmoid(gate) * up
    elif activation == "gelu":
        a_F = 0.5 * h_H * (1.0 + torch.erf(h_H / math.sqrt(2.0)))
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return torch.mv(w_out_DF, a_F)


def moe_forward(
    x_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w_in_EHD: torch.Tensor,
    w_out_EDF: torch.Tensor,
    *,
    top_k: int,
    activation: str = "swiglu",
    score_function: str = "softmax",
    renormalize: bool = True,
    scaling_factor: float = 1.0,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
    aux_loss_type: str = "switch",
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    sequence_ids_T: torch.Tensor | None = None,
    shared: SharedExpertWeights | None = None,
) -> ReferenceOutput:
    """y[t] = sum_k w[t,k] * expert_{e[t,k]}(x[t]) (+ shared expert), and the weighted aux loss."""
    dtype = _compute_dtype(x_TD, router_weight_ED, w_in_EHD, w_out_EDF)
    x_TD = x_TD.to(dtype)
    routing = route(
        x_TD,
        router_weight_ED,
        top_k,
        score_function=score_function,
        renormalize=renormalize,
        scaling_factor=scaling_factor,
        capacity_factor=capacity_factor,
        drop_policy=drop_policy,
    )
    num_tokens, num_experts = x_TD.shape[0], w_in_EHD.shape[0]
    w_in_EHD, w_out_EDF = w_in_EHD.to(dtype), w_out_EDF.to(dtype)

    tokens_per_expert = [0] * num_experts
    rows = []
    for t in range(num_tokens):
        y_D = torch.zeros(x_TD.shape[1], dtype=dtype)
        for k in range(top_k):
            e = int(routing.experts_TK[t, k])
            if e < 0:
                continue
            tokens_per_expert[e] += 1
            y_D = y_D + routing.weights_TK[t, k] * mlp(x_TD[t], w_in_EHD[e], w_out_EDF[e], activation)
        if shared is not None:
            shared_D = mlp(x_TD[t], shared.w_in.to(dtype), shared.w_out.to(dtype), activation)
            if shared.gate is not None:
                shared_D = _sigmoid(torch.dot(shared.gate.to(dtype).reshape(-1), x_TD[t])) * shared_D
            y_D = y_D + shared_D
        rows.append(y_D)
    y_TD = torch.stack(rows) if rows else torch.zeros(0, x_TD.shape[1], dtype=dtype)

    probs_TE = balance_probs(routing.scores_TE, score_function)
    if aux_loss_type == "switch":
        balance = switch_loss(probs_TE, routing.experts_before_drop_TK)
    elif aux_loss_type == "seq_switch":
        balance = sequence_switch_loss(probs_TE, routing.experts_before_drop_TK, sequence_ids_T)
    else:
        balance = torch.zeros((), dtype=dtype)
    z = z_loss(routing.logits_TE)
    aux = aux_loss_coef * balance + z_loss_coef * z
    return ReferenceOutput(y_TD, aux, balance, z, tokens_per_expert, routing)
