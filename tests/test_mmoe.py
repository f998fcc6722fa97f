"""Tests of moe_engine.mtl.mmoe: MultiGateMoE (MMoE, OMoE, sparse top-k gates), SharedBottom, the towers.

Every model is compared with a transcription of the MMoE paper's equations written here, a loop
over tasks and examples in float64 on the same parameters:
    g_t(x) = softmax(V_t x + c_t),  f_i(x) = relu(W_i x + b_i),  bottom_t = sum_i g_t(x)_i f_i(x),
with the sparse variant keeping each gate's K largest probabilities (ties to the lower expert),
renormalised. The library runs in fp32, so the only error left is its fp32 rounding: forward
and the gradients of every parameter and of the input are compared.
"""

from __future__ import annotations

import math

import pytest
import torch

import moe_engine.mtl.mmoe as mmoe
from moe_engine.mtl.mmoe import (
    MultiGateMoE,
    MultiTaskRegressor,
    SharedBottom,
    build_model,
    count_parameters,
    multigate_parameter_count,
    shared_bottom_parameter_count,
    shared_bottom_width,
)

FP32_ATOL, FP32_RTOL = 1e-5, 1e-5


# ---------------------------------------------------------------------------------------------
# The float64 transcription
# ---------------------------------------------------------------------------------------------


def reference_gate(logits_E: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """The paper's softmax gate; with top_k, zero all but the K largest and renormalise."""
    exp_E = torch.exp(logits_E - logits_E.max())
    probs_E = exp_E / exp_E.sum()
    if top_k is None:
        return probs_E
    order = sorted(range(len(probs_E)), key=lambda e: -probs_E[e].item())  # stable: ties to the lower e
    keep_E = torch.zeros_like(probs_E)
    keep_E[order[:top_k]] = 1.0
    kept_E = probs_E * keep_E
    return kept_E / kept_E.sum()


def reference_bottom(layer: MultiGateMoE, params: dict[str, torch.Tensor], x_BD: torch.Tensor) -> list[torch.Tensor]:
    """bottom_t(x_b) = sum_i g_t(x_b)_i relu(W_i x_b + b_i), one example and task at a time."""
    W, b, V, c = params["expert_w_EHD"], params["expert_b_EH"], params["gate_w_GED"], params["gate_b_GE"]
    outputs = []
    for t in range(layer.num_tasks):
        g = t if layer.num_gates > 1 else 0
        rows = []
        for n in range(x_BD.shape[0]):
            gate_E = reference_gate(V[g] @ x_BD[n] + c[g], layer.top_k)
            rows.append(sum(gate_E[i] * torch.relu(W[i] @ x_BD[n] + b[i]) for i in range(layer.num_experts)))
        outputs.append(torch.stack(rows))
    return outputs


def float64_leaves(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}


def make_layer(d_in, num_experts, expert_hidden, num_tasks, **kwargs) -> MultiGateMoE:
    layer = MultiGateMoE(d_in, num_experts, expert_hidden, num_tasks, **kwargs)
    with torch.no_grad():
        layer.gate_w_GED.normal_()  # larger logits than the default init: clear top-k gaps
    return layer


def assert_grads_match(loss, leaves, loss_ref, ref_leaves, names):
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, ref_leaves)
    for name, got, want in zip(names, grads, grads_ref):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"grad {name}: {m}")


# (B, D, E, H, X, num_gates, top_k)
LAYER_CASES = [
    (8, 6, 4, 5, 2, None, None),  # MMoE, typical
    (1, 6, 4, 5, 2, None, None),  # B = 1
    (9, 7, 7, 3, 3, None, None),  # prime E, three tasks, odd widths
    (5, 4, 1, 3, 2, None, None),  # E = 1: every gate weight is 1
    (7, 5, 6, 4, 3, 1, None),  # OMoE: one gate for three tasks
    (8, 6, 5, 4, 2, None, 2),  # sparse MMoE, K < E
    (9, 7, 7, 3, 3, None, 1),  # sparse, K = 1, prime E
    (6, 5, 6, 4, 2, None, 6),  # sparse, K = E
    (7, 5, 6, 4, 3, 1, 3),  # sparse OMoE
    (1, 4, 3, 2, 1, None, 2),  # B = 1, one task
]


@pytest.mark.parametrize("batch, d_in, num_experts, hidden, num_tasks, num_gates, top_k", LAYER_CASES)
def test_multigate_moe_matches_reference(batch, d_in, num_experts, hidden, num_tasks, num_gates, top_k):
    torch.manual_seed(0)
    layer = make_layer(d_in, num_experts, hidden, num_tasks, num_gates=num_gates, top_k=top_k)
    x = torch.randn(batch, d_in, requires_grad=True)
    outputs = layer(x)
    params = float64_leaves(layer)
    x_ref = x.detach().double().requires_grad_()
    expected = reference_bottom(layer, params, x_ref)

    assert len(outputs) == num_tasks
    for t, (got, want) in enumerate(zip(outputs, expected)):
        assert got.shape == (batch, hidden) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"task {t}: {m}")

    grad_outs = [torch.randn(batch, hidden, dtype=torch.float64) for _ in range(num_tasks)]
    loss = sum((o * g.float()).sum() for o, g in zip(outputs, grad_outs))
    loss_ref = sum((o * g).sum() for o, g in zip(expected, grad_outs))
    names = [n for n, _ in layer.named_parameters()] + ["x"]
    assert_grads_match(loss, [*layer.parameters(), x], loss_ref, [*params.values(), x_ref], names)


@pytest.mark.parametrize("kind", ["mmoe", "omoe", "shared_bottom"])
def test_regressor_matches_reference(kind):
    torch.manual_seed(1)
    model = build_model(kind, 7, 2, num_experts=5, expert_hidden=4, tower_hidden=3)
    x = torch.randn(6, 7, requires_grad=True)
    y = model(x)
    params = float64_leaves(model)
    x_ref = x.detach().double().requires_grad_()
    if kind == "shared_bottom":
        h = torch.relu(x_ref @ params["bottom.layer.weight"].t() + params["bottom.layer.bias"])
        features = [h, h]
    else:
        prefix = {k.removeprefix("bottom."): v for k, v in params.items() if k.startswith("bottom.")}
        features = reference_bottom(model.bottom, prefix, x_ref)
    columns = []
    for t, h in enumerate(features):
        w1, b1 = params[f"towers.{t}.0.weight"], params[f"towers.{t}.0.bias"]
        w2, b2 = params[f"towers.{t}.2.weight"], params[f"towers.{t}.2.bias"]
        columns.append(torch.relu(h @ w1.t() + b1) @ w2.t() + b2)
    y_ref = torch.cat(columns, dim=1)
    assert y.shape == (6, 2)
    torch.testing.assert_close(y.double(), y_ref, atol=FP32_ATOL, rtol=FP32_RTOL)

    target = torch.randn(6, 2, dtype=torch.float64)
    loss = ((y - target.float()) ** 2).mean(0).sum()
    loss_ref = ((y_ref - target) ** 2).mean(0).sum()
    names = [n for n, _ in model.named_parameters()] + ["x"]
    assert_grads_match(loss, [*model.parameters(), x], loss_ref, [*params.values(), x_ref], names)


# ---------------------------------------------------------------------------------------------
# OMoE, dense vs sparse, which pairs run
# ---------------------------------------------------------------------------------------------


def test_omoe_equals_mmoe_with_tied_gates():
    torch.manual_seed(2)
    omoe = make_layer(6, 5, 4, 3, num_gates=1)
    mmoe_layer = MultiGateMoE(6, 5, 4, 3)
    with torch.no_grad():
        mmoe_layer.expert_w_EHD.copy_(omoe.expert_w_EHD)
        mmoe_layer.expert_b_EH.copy_(omoe.expert_b_EH)
        mmoe_layer.gate_w_GED.copy_(omoe.gate_w_GED.expand(3, -1, -1))
        mmoe_layer.gate_b_GE.copy_(omoe.gate_b_GE.expand(3, -1))
    x = torch.randn(7, 6)
    for got, want in zip(mmoe_layer(x), omoe(x)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert count_parameters(omoe) == count_parameters(mmoe_layer) - 2 * (5 * 6 + 5)


@pytest.mark.parametrize("num_gates", [None, 1])
@pytest.mark.parametrize("num_experts", [4, 7])
def test_sparse_top_k_equal_to_experts_matches_dense(num_experts, num_gates):
    torch.manual_seed(3)
    dense = make_layer(5, num_experts, 3, 2, num_gates=num_gates)
    sparse = MultiGateMoE(5, num_experts, 3, 2, num_gates=num_gates, top_k=num_experts)
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(9, 5)
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_dense, out_sparse = dense(x_dense), sparse(x_sparse)
    for got, want in zip(out_sparse, out_dense):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    grad_outs = [torch.randn(9, 3) for _ in range(2)]
    grads_dense = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out_dense, grad_outs)), [*dense.parameters(), x_dense])
    grads_sparse = torch.autograd.grad(sum((o * g).sum() for o, g in zip(out_sparse, grad_outs)), [*sparse.parameters(), x_sparse])
    for got, want in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


class GemmRecorder:
    """Wraps the grouped GEMM the layer calls and records the rows it was given."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = mmoe.grouped_gemm

        def record(x, w, tokens_per_expert_E, gather_index_N=None):
            self.calls.append((tokens_per_expert_E.clone(), gather_index_N.clone()))
            return real(x, w, tokens_per_expert_E, gather_index_N)

        monkeypatch.setattr(mmoe, "grouped_gemm", record)


def test_sparse_computes_only_chosen_pairs(monkeypatch):
    torch.manual_seed(4)
    batch, num_experts, top_k = 6, 6, 2
    layer = make_layer(5, num_experts, 3, 2, top_k=top_k)
    with torch.no_grad():
        # Gate 0 can only choose experts 1 and 4, gate 1 only 2 and 4: experts 0, 3 and 5 never run.
        layer.gate_b_GE.fill_(-1e4)
        layer.gate_b_GE[0, [1, 4]] = 0.0
        layer.gate_b_GE[1, [2, 4]] = 0.0
    recorder = GemmRecorder(monkeypatch)
    x = torch.randn(batch, 5)
    outputs = layer(x)

    (tokens_E, gather_N), = recorder.calls
    assert tokens_E.tolist() == [0, batch, batch, 0, 2 * batch, 0]  # one row per (gate, example, chosen expert)
    assert gather_N.shape == (2 * batch * top_k,)
    # Each chosen expert's rows read every example once per gate that chose it.
    assert sorted(gather_N[tokens_E[:4].sum():].tolist()) == sorted(list(range(batch)) * 2)
    params = float64_leaves(layer)
    for got, want in zip(outputs, reference_bottom(layer, params, x.double())):
        torch.testing.assert_close(got.double(), want, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_dense_runs_every_expert_on_every_example(monkeypatch):
    recorder = GemmRecorder(monkeypatch)
    layer = MultiGateMoE(4, 3, 2, 2)
    layer(torch.randn(5, 4))
    (tokens_E, gather_N), = recorder.calls
    assert tokens_E.tolist() == [5, 5, 5]
    assert gather_N.tolist() == list(range(5)) * 3


# ---------------------------------------------------------------------------------------------
# Kernels, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 2])
def test_triton_kernels_match_reference(monkeypatch, top_k):
    # Under Triton's CPU interpreter (tests/conftest.py): the grouped GEMM, top-k gating,
    # expert_order and unpermute kernels in place of their torch references.
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    torch.manual_seed(5)
    layer = make_layer(6, 5, 4, 2, top_k=top_k)
    x = torch.randn(7, 6, requires_grad=True)
    outputs = layer(x)
    params = float64_leaves(layer)
    x_ref = x.detach().double().requires_grad_()
    expected = reference_bottom(layer, params, x_ref)
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got.double(), want, atol=FP32_ATOL, rtol=FP32_RTOL)
    grad_outs = [torch.randn(7, 4, dtype=torch.float64) for _ in range(2)]
    loss = sum((o * g.float()).sum() for o, g in zip(outputs, grad_outs))
    loss_ref = sum((o * g).sum() for o, g in zip(expected, grad_outs))
    names = [n for n, _ in layer.named_parameters()] + ["x"]
    assert_grads_match(loss, [*layer.parameters(), x], loss_ref, [*params.values(), x_ref], names)


@pytest.mark.parametrize("top_k", [None, 3])
def test_bf16_input_runs_experts_in_bf16_and_gates_in_fp32(top_k):
    torch.manual_seed(6)
    layer = make_layer(8, 5, 4, 2, top_k=top_k)
    x = torch.randn(6, 8)
    x_bf16 = x.bfloat16()
    assert layer.gate_logits(x_bf16).dtype == torch.float32
    outputs = layer(x_bf16)
    # The reference on the bf16-rounded input: what is left is the experts' bf16 arithmetic.
    expected = reference_bottom(layer, float64_leaves(layer), x_bf16.double())
    for got, want in zip(outputs, expected):
        assert got.dtype == torch.bfloat16
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, atol=2e-2 * scale, rtol=2e-2)
    outputs[0].float().sum().backward()
    assert layer.expert_w_EHD.grad.dtype == torch.float32 and layer.gate_w_GED.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Comparable sizes
# ---------------------------------------------------------------------------------------------


def test_paper_sizes_and_parameter_counts():
    models = {kind: build_model(kind, 100, 2) for kind in ("mmoe", "omoe", "shared_bottom")}
    assert count_parameters(models["mmoe"]) == multigate_parameter_count(100, 2, 2, 8, 16, 8) == 14_834
    assert count_parameters(models["omoe"]) == multigate_parameter_count(100, 2, 1, 8, 16, 8) == 14_834 - 808
    assert models["shared_bottom"].bottom.out_features == 126
    assert count_parameters(models["shared_bottom"]) == shared_bottom_parameter_count(100, 2, 126, 8) == 14_776


@pytest.mark.parametrize("d_in, num_tasks, num_experts, expert_hidden, tower_hidden",
                         [(100, 2, 8, 16, 8), (7, 3, 5, 4, 3), (1, 1, 1, 1, 1), (33, 2, 64, 8, 16)])
def test_shared_bottom_width_is_the_closest_in_parameters(d_in, num_tasks, num_experts, expert_hidden, tower_hidden):
    model = build_model("shared_bottom", d_in, num_tasks, num_experts=num_experts, expert_hidden=expert_hidden,
                        tower_hidden=tower_hidden)
    target = count_parameters(build_model("mmoe", d_in, num_tasks, num_experts=num_experts,
                                          expert_hidden=expert_hidden, tower_hidden=tower_hidden))
    width = model.bottom.out_features
    gap = abs(count_parameters(model) - target)
    assert all(abs(shared_bottom_parameter_count(d_in, num_tasks, w, tower_hidden) - target) >= gap
               for w in range(1, 4 * width + 10))
    assert width == shared_bottom_width(d_in, num_tasks, tower_hidden, target)


@pytest.mark.parametrize("d_in, num_tasks, tower_hidden", [(2, 1, 1), (5, 2, 3), (1, 3, 2)])
def test_shared_bottom_width_against_every_width_ties_to_the_smaller(d_in, num_tasks, tower_hidden):
    """shared_bottom_width = argmin over w >= 1 of (|count(w) - target|, w) for every target up to 300:
    targets halfway between two widths' counts (d_in=2: counts 4w + 3, target 45 between 43 and 47)
    go to the smaller width, and targets below count(1) give width 1."""
    counts = {w: shared_bottom_parameter_count(d_in, num_tasks, w, tower_hidden) for w in range(1, 120)}
    for target in range(1, 300):
        expected = min(counts, key=lambda w: (abs(counts[w] - target), w))
        assert shared_bottom_width(d_in, num_tasks, tower_hidden, target) == expected, target
    assert shared_bottom_width(2, 1, 1, 45) == 10


def test_shared_bottom_feeds_every_tower_the_same_features():
    bottom = SharedBottom(5, 7, 3)
    features = bottom(torch.randn(4, 5))
    assert len(features) == 3 and all(f is features[0] for f in features) and features[0].shape == (4, 7)
    assert (features[0] >= 0).all()


def test_sparse_build_and_training_step():
    torch.manual_seed(7)
    model = build_model("mmoe", 10, 2, num_experts=6, expert_hidden=4, tower_hidden=3, top_k=2)
    assert model.bottom.top_k == 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 10), torch.randn(32, 2)
    losses = []
    for _ in range(10):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and math.isfinite(losses[-1])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_in=0), r"d_in = 0: expected an integer >= 1"),
    (dict(num_experts=0), r"num_experts = 0: expected an integer >= 1"),
    (dict(expert_hidden=-1), r"expert_hidden = -1: expected an integer >= 1"),
    (dict(num_tasks=2.0), r"num_tasks = 2.0: expected an integer >= 1"),
    (dict(num_gates=3), r"num_gates = 3: allowed: 1 \(OMoE\) or num_tasks = 2 \(MMoE\)"),
    (dict(top_k=0), r"top_k = 0: allowed: None \(dense gates\) or an integer in \[1, num_experts = 4\]"),
    (dict(top_k=5), r"top_k = 5: allowed: None"),
    (dict(top_k=True), r"top_k = True: allowed: None"),
    (dict(activation="tanh"), r"activation = 'tanh': allowed: relu, gelu"),
])
def test_multigate_moe_bad_arguments(kwargs, match):
    args = dict(d_in=3, num_experts=4, expert_hidden=2, num_tasks=2) | kwargs
    d_in, num_experts, hidden, num_tasks = (args.pop(k) for k in ("d_in", "num_experts", "expert_hidden", "num_tasks"))
    with pytest.raises(ValueError, match=match):
        MultiGateMoE(d_in, num_experts, hidden, num_tasks, **args)


@pytest.mark.parametrize("module", [MultiGateMoE(3, 2, 2, 2), MultiGateMoE(3, 2, 2, 2, top_k=1), SharedBottom(3, 2, 2)])
@pytest.mark.parametrize("x", [torch.randn(4, 5), torch.randn(2, 4, 3), torch.ones(4, 3, dtype=torch.int64)])
def test_bad_input_names_the_expected_shape(module, x):
    with pytest.raises(ValueError, match=rf"{type(module).__name__}: x has shape .*: expected a floating \(B, 3\) tensor"):
        module(x)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"hidden = 0: expected an integer >= 1"):
        SharedBottom(3, 0, 2)
    with pytest.raises(ValueError, match=r"activation = 'tanh': allowed: relu, gelu"):
        SharedBottom(3, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match=r"tower_hidden = 0: expected an integer >= 1"):
        MultiTaskRegressor(SharedBottom(3, 4, 2), 0, 2)
    with pytest.raises(ValueError, match=r"num_tasks = 3: the bottom serves 2 tasks"):
        MultiTaskRegressor(SharedBottom(3, 4, 2), 4, 3)
    with pytest.raises(ValueError, match=r"kind = 'mlp': allowed: mmoe, omoe, shared_bottom"):
        build_model("mlp", 3, 2)
    with pytest.raises(ValueError, match=r"num_experts = 0: expected an integer >= 1"):
        build_model("shared_bottom", 3, 2, num_experts=0)
