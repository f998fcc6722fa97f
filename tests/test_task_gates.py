"""Tests of moe_engine.mtl.gates.TaskGateRouter (M3ViT, Mod-Squad, AdaMV-MoE, sparse MMoE gates).

The router runs in fp32; it is compared with a float64 transcription of the papers' equations written
below one token at a time: each token's logits through its own task's gate (or through the gate over
[x ; onehot(task)]), the noise, softmax (+ Mod-Squad's epsilon), top-k over the task's own k, the
weights, and the auxiliary losses (Switch, Shazeer's importance and load, Mod-Squad's mutual
information). Gradients are compared with the transcription's autograd gradients.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_moe as ref
from moe_engine.experts import GroupedExperts
from moe_engine.layer import MoELayer
from moe_engine.mtl.gates import TaskGateRouter
from moe_engine.routing import RoutingContext

FP32_ATOL, FP32_RTOL = 1e-6, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


# ---------------------------------------------------------------------------------------------
# The equations, transcribed
# ---------------------------------------------------------------------------------------------


def phi(z):
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def cv_squared(v_E):
    mean = v_E.mean()
    return ((v_E - mean) ** 2).mean() / (mean**2 + 1e-10)


def gate_logits(x_D, task, gate, mode, num_tasks):
    """One token's logits: x W_task^T (per_task), or [x ; onehot(task)] W^T (concat)."""
    if mode == "per_task":
        return torch.stack([torch.dot(x_D, gate[task, e]) for e in range(gate.shape[1])])
    onehot = torch.zeros(num_tasks, dtype=x_D.dtype)
    onehot[task] = 1.0
    z = torch.cat([x_D, onehot])
    return torch.stack([torch.dot(z, gate[e]) for e in range(gate.shape[0])])


def transcription(router, x_TD, task_ids, gate, noise_gate=None, noise_TE=None):
    """Everything the router computes, in float64, for `router`'s settings and these parameters.

    Returns dict: weights (T, K) with 0 at masked choices, experts (list of K-lists, -1 masked),
    scores (T, E), and the unweighted loss terms.
    """
    num_tokens, num_experts, top_k = x_TD.shape[0], router.num_experts, router.top_k
    task_k = router.task_top_k_X.tolist()
    training = router.training
    weight_rows, expert_rows, score_rows, load_rows = [], [], [], []
    for t in range(num_tokens):
        task = int(task_ids[t])
        k = task_k[task]
        clean_E = gate_logits(x_TD[t], task, gate, router.mode, router.num_tasks)
        h_E, std_E = clean_E, None
        if training and router.noise == "learned":
            std_E = torch.log1p(torch.exp(gate_logits(x_TD[t], task, noise_gate, router.mode, router.num_tasks)))
            std_E = std_E + router.noise_epsilon
            h_E = clean_E + noise_TE[t] * std_E
        elif training and router.noise == "fixed":
            h_E = clean_E + noise_TE[t] / num_experts
        exp_E = torch.exp(h_E - h_E.max())
        p_E = exp_E / exp_E.sum()
        order = sorted(range(num_experts), key=lambda e: (-float(p_E[e].detach()), e))
        chosen = order[:k]
        w = [p_E[e] + router.score_epsilon for e in chosen]  # Mod-Squad: softmax + eps
        if router.renormalize:
            total = sum(w[1:], w[0])
            w = [v / total for v in w]
        zero = torch.zeros((), dtype=x_TD.dtype)
        weight_rows.append(torch.stack(w + [zero] * (top_k - k)))
        expert_rows.append(chosen + [-1] * (top_k - k))
        score_rows.append(p_E)
        if std_E is not None and k < num_experts:
            desc = sorted((h_E[e] for e in range(num_experts)), key=lambda v: -float(v.detach()))
            load_rows.append(torch.stack([
                phi((clean_E[i] - (desc[k] if i in chosen else desc[k - 1])) / std_E[i]) for i in range(num_experts)
            ]))
        else:
            load_rows.append(torch.tensor([float(i in chosen) for i in range(num_experts)], dtype=x_TD.dtype))
    weights = torch.stack(weight_rows)
    scores = torch.stack(score_rows)
    out = {"weights": weights, "experts": expert_rows, "scores": scores}
    counts = [sum(row.count(i) for row in expert_rows) for i in range(num_experts)]
    out["balance_loss"] = num_experts * sum(
        counts[i] / (num_tokens * top_k) * scores[:, i].mean() for i in range(num_experts)
    )
    zero = torch.zeros((), dtype=x_TD.dtype)
    gates = torch.stack([
        torch.stack([sum((weights[t, j] for j in range(top_k) if expert_rows[t][j] == i), zero)
                     for i in range(num_experts)])
        for t in range(num_tokens)
    ])
    out["importance_loss"] = cv_squared(gates.sum(0))
    out["load_loss"] = cv_squared(torch.stack(load_rows).sum(0))
    mass = [[sum((scores[t, e] for t in range(num_tokens) if int(task_ids[t]) == x), torch.zeros((), dtype=x_TD.dtype))
             for e in range(num_experts)] for x in range(router.num_tasks)]
    total = sum(sum(row) for row in mass)
    p_xe = [[m / total for m in row] for row in mass]
    p_x = [sum(row) for row in p_xe]
    p_e = [sum(p_xe[x][e] for x in range(router.num_tasks)) for e in range(num_experts)]
    out["mi_loss"] = -sum(
        p_xe[x][e] * (torch.log(p_xe[x][e] + 1e-9) - torch.log(p_x[x] * p_e[e] + 1e-9))
        for x in range(router.num_tasks) for e in range(num_experts)
    )
    return out


def make_router(d_model, num_experts, top_k, num_tasks, **kwargs) -> TaskGateRouter:
    router = TaskGateRouter(d_model, num_experts, top_k, num_tasks, **kwargs)
    with torch.no_grad():  # larger logits than the default init: clear top-k gaps
        router.gate_weight.normal_()
        if router.noise_gate_weight is not None:
            router.noise_gate_weight.normal_(std=0.5)
    return router


def run(router, x_TD, task_ids_T, seed=0):
    """The router's Routing and the transcription, with the same noise draw."""
    noise_TE = torch.randn(x_TD.shape[0], router.num_experts, generator=torch.Generator().manual_seed(seed))
    use_noise = router.training and router.noise != "none"
    routing = router(x_TD, RoutingContext(task_ids_T=task_ids_T), noise_TE=noise_TE if use_noise else None)
    noise_gate = router.noise_gate_weight
    expected = transcription(
        router, x_TD.detach().double(), task_ids_T, router.gate_weight.detach().double(),
        noise_gate.detach().double() if noise_gate is not None else None, noise_TE.double(),
    )
    return routing, expected


def check_routing(routing, expected, aux_loss=None):
    assert routing.experts_TK.tolist() == expected["experts"]
    assert routing.weights_TK.dtype == torch.float32 and routing.scores_TE.dtype == torch.float32
    torch.testing.assert_close(routing.weights_TK, expected["weights"].float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.scores_TE, expected["scores"].float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    for name, value in routing.aux_terms.items():
        torch.testing.assert_close(
            value, expected[name].float(), atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"{name}: {m}"
        )
    if aux_loss is not None:
        torch.testing.assert_close(routing.aux_loss, aux_loss.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


# ---------------------------------------------------------------------------------------------
# Forward against the transcription
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_task", "concat"])
@pytest.mark.parametrize("noise, training", [("none", True), ("learned", True), ("learned", False), ("fixed", True)])
@pytest.mark.parametrize(
    "num_tokens, d_model, num_experts, top_k, num_tasks",
    [
        (16, 8, 4, 2, 3),  # typical
        (1, 8, 4, 2, 2),  # T = 1
        (13, 5, 7, 3, 4),  # prime E, odd D
        (6, 4, 3, 3, 2),  # K = E
        (9, 6, 5, 2, 1),  # one task
    ],
)
def test_router_matches_transcription(num_tokens, d_model, num_experts, top_k, num_tasks, mode, noise, training):
    torch.manual_seed(0)
    aux_loss = "importance_load" if noise == "learned" else "switch"
    router = make_router(d_model, num_experts, top_k, num_tasks, mode=mode, noise=noise, aux_loss=aux_loss,
                         aux_loss_coef=0.1, mi_loss_coef=0.05).train(training)
    x_TD = torch.randn(num_tokens, d_model)
    task_ids_T = torch.randint(0, num_tasks, (num_tokens,))
    routing, expected = run(router, x_TD, task_ids_T)
    if aux_loss == "switch":
        weighted = 0.1 * expected["balance_loss"]
        assert set(routing.aux_terms) == {"balance_loss", "mi_loss"}
    else:
        weighted = 0.1 * (expected["importance_loss"] + expected["load_loss"])
        assert set(routing.aux_terms) == {"importance_loss", "load_loss", "mi_loss"}
    check_routing(routing, expected, weighted + 0.05 * expected["mi_loss"])
    assert routing.capacity is None and (routing.experts_TK >= 0).all()


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("score_epsilon", [1e-2, 0.3])
def test_mod_squad_epsilon(score_epsilon, renormalize):
    """Mod-Squad: per-task zero-init gates, softmax + eps, top-k; weights from the shifted scores."""
    torch.manual_seed(1)
    router = make_router(6, 7, 3, 3, score_epsilon=score_epsilon, renormalize=renormalize, aux_loss="importance_load")
    x_TD = torch.randn(11, 6)
    routing, expected = run(router, x_TD, torch.randint(0, 3, (11,)))
    check_routing(routing, expected)
    if renormalize:
        torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(11))
    else:
        assert (routing.weights_TK > score_epsilon).all()


def test_per_task_k_masks_choices():
    torch.manual_seed(2)
    router = make_router(6, 5, 3, 3, aux_loss="switch", mi_loss_coef=0.1)
    router.set_task_top_k(0, 1)
    router.set_task_top_k(2, 2)
    task_ids_T = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 1])
    routing, expected = run(router, torch.randn(10, 6), task_ids_T)
    check_routing(routing, expected, 0.01 * expected["balance_loss"] + 0.1 * expected["mi_loss"])
    kept_T = (routing.experts_TK >= 0).sum(-1)
    assert kept_T.tolist() == [[1, 3, 2][int(t)] for t in task_ids_T]
    assert (routing.weights_TK[routing.experts_TK < 0] == 0).all()
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(10))
    assert routing.capacity == 10  # -1 choices need an int capacity; T keeps every real choice


@pytest.mark.parametrize("mode", ["per_task", "concat"])
def test_per_task_k_with_learned_noise_load(mode):
    """The load estimator uses each token's own k: thresholds at its k-th and (k+1)-th values."""
    torch.manual_seed(3)
    router = make_router(5, 6, 3, 2, mode=mode, noise="learned", aux_loss="importance_load", score_epsilon=0.05)
    router.set_task_top_k(1, 1)
    routing, expected = run(router, torch.randn(14, 5), torch.randint(0, 2, (14,)))
    check_routing(routing, expected, 0.01 * (expected["importance_loss"] + expected["load_loss"]))


@pytest.mark.parametrize("policy", ["position", "score"])
def test_capacity_with_per_task_k(policy):
    """Masked choices take no expert's slots; the real ones are dropped in the policy's order."""
    torch.manual_seed(4)
    router = make_router(6, 4, 2, 2, capacity_factor=0.5, drop_policy=policy)
    router.set_task_top_k(1, 1)
    routing, expected = run(router, torch.randn(16, 6), torch.randint(0, 2, (16,)))
    capacity = ref.capacity_of(16, 2, 4, 0.5)
    experts = [list(row) for row in expected["experts"]]
    weights = expected["weights"].clone()
    choices = [(t, j) for t in range(16) for j in range(2) if experts[t][j] >= 0]
    if policy == "position":
        choices.sort(key=lambda tj: (tj[1], tj[0]))
    else:
        choices.sort(key=lambda tj: (-float(weights[tj]), tj[0] * 2 + tj[1]))
    taken = [0] * 4
    for t, j in choices:
        taken[experts[t][j]] += 1
        if taken[experts[t][j]] > capacity:
            experts[t][j], weights[t, j] = -1, 0.0
    assert routing.capacity == capacity
    assert routing.experts_TK.tolist() == experts and experts != expected["experts"]
    torch.testing.assert_close(routing.weights_TK, weights.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_same_features_route_by_task():
    torch.manual_seed(5)
    router = make_router(8, 6, 2, 3)
    with torch.no_grad():  # three different gates; task 2's favours experts 4 and 5 outright
        router.w_XED[2].zero_()
        router.w_XED[2, 4:] = 1.0
    x_TD = torch.randn(1, 8).abs().expand(3, 8)
    routing, expected = run(router, x_TD, torch.tensor([0, 1, 2]))
    check_routing(routing, expected)
    assert routing.experts_TK[2].tolist() == [4, 5]
    assert len({tuple(row) for row in routing.experts_TK.tolist()}) > 1


def test_concat_gate_is_one_hot_concatenation():
    """The concat gate equals nn.functional.linear on the materialised [x ; onehot(task)]."""
    torch.manual_seed(6)
    router = make_router(5, 4, 2, 3, mode="concat")
    x_TD, task_ids_T = torch.randn(9, 5), torch.randint(0, 3, (9,))
    z_TC = torch.cat([x_TD, torch.nn.functional.one_hot(task_ids_T, 3).float()], dim=1)
    torch.testing.assert_close(router.task_logits(x_TD, task_ids_T, router.weight), z_TC @ router.weight.t())


def test_fixed_noise_from_global_rng_in_training_only():
    torch.manual_seed(7)
    router = make_router(6, 5, 2, 2, noise="fixed")
    x_TD, ctx = torch.randn(8, 6), RoutingContext(task_ids_T=torch.randint(0, 2, (8,)))
    torch.manual_seed(9)
    drawn = router(x_TD, ctx)
    torch.manual_seed(9)
    injected = router(x_TD, ctx, noise_TE=torch.randn(8, 5))
    assert torch.equal(drawn.scores_TE, injected.scores_TE)
    router.eval()
    assert torch.equal(router(x_TD, ctx).scores_TE, router(x_TD, ctx).scores_TE)
    torch.testing.assert_close(
        router(x_TD, ctx).scores_TE, router.task_logits(x_TD, ctx.task_ids_T, router.w_XED).softmax(-1)
    )


def test_bf16_input_routes_like_its_fp32_values():
    torch.manual_seed(8)
    router = make_router(8, 5, 2, 2, noise="learned", aux_loss="importance_load")
    routing, expected = run(router, torch.randn(10, 8).bfloat16(), torch.randint(0, 2, (10,)))
    check_routing(routing, expected)


def test_init_and_state_dict():
    zero = TaskGateRouter(8, 4, 2, 3, zero_init=True, noise="learned")
    assert (zero.w_XED == 0).all() and (zero.noise_w_XED == 0).all() and zero.w_XED.shape == (3, 4, 8)
    torch.manual_seed(0)
    normal = TaskGateRouter(64, 8, 2, 5, mode="concat")
    assert normal.weight.shape == (8, 64 + 5) and normal.noise_weight is None
    assert abs(normal.weight.std().item() - 64**-0.5) < 0.2 * 64**-0.5
    normal.set_task_top_k(3, 1)
    state = normal.state_dict()
    assert state["task_top_k_X"].tolist() == [2, 2, 2, 1, 2]
    restored = TaskGateRouter(64, 8, 2, 5, mode="concat")
    restored.load_state_dict(state)
    assert restored.task_top_k_X.tolist() == [2, 2, 2, 1, 2] and torch.equal(restored.weight, normal.weight)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, noise, aux_loss, score_epsilon, task_k",
    [
        ("per_task", "none", "switch", 0.0, None),
        ("per_task", "learned", "importance_load", 0.0, None),
        ("per_task", "learned", "importance_load", 0.02, (1, 2, 3)),  # AdaMV-MoE + Mod-Squad eps
        ("concat", "learned", "importance_load", 0.0, None),  # M3ViT
        ("concat", "fixed", "switch", 0.05, (2, 1, 3)),
    ],
)
def test_gradients_match_transcription(mode, noise, aux_loss, score_epsilon, task_k):
    torch.manual_seed(9)
    num_tokens, d_model, num_experts, top_k, num_tasks = 12, 6, 5, 3, 3
    router = make_router(d_model, num_experts, top_k, num_tasks, mode=mode, noise=noise, aux_loss=aux_loss,
                         aux_loss_coef=0.3, mi_loss_coef=0.2, score_epsilon=score_epsilon)
    for task, k in enumerate(task_k or ()):
        router.set_task_top_k(task, k)
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    task_ids_T = torch.arange(num_tokens) % num_tasks
    routing, _ = run(router, x_TD, task_ids_T, seed=2)
    coef_TK = torch.randn(num_tokens, top_k, dtype=torch.float64)
    params = {"x": x_TD, "gate": router.gate_weight}
    if router.noise_gate_weight is not None:
        params["noise_gate"] = router.noise_gate_weight
    loss = (routing.weights_TK * coef_TK.float()).sum() + routing.aux_loss
    grads = torch.autograd.grad(loss, list(params.values()))

    p = {name: t.detach().double().requires_grad_() for name, t in params.items()}
    noise_TE = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(2)).double()
    expected = transcription(router, p["x"], task_ids_T, p["gate"], p.get("noise_gate"), noise_TE)
    terms = expected["balance_loss"] if aux_loss == "switch" else expected["importance_loss"] + expected["load_loss"]
    ref_loss = (expected["weights"] * coef_TK).sum() + 0.3 * terms + 0.2 * expected["mi_loss"]
    ref_grads = torch.autograd.grad(ref_loss, list(p.values()))
    for name, grad, want in zip(params, grads, ref_grads):
        assert (want != 0).any(), name
        torch.testing.assert_close(grad, want.float(), atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# In the layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_in_moe_layer_with_per_task_k(capacity_factor):
    """Choices of -1 from a task's smaller k pass through the dispatcher; y matches a token loop."""
    torch.manual_seed(10)
    num_tokens, d_model, num_experts, top_k, num_tasks, ffn_hidden = 12, 8, 5, 3, 3, 6
    router = make_router(d_model, num_experts, top_k, num_tasks, aux_loss="switch", mi_loss_coef=0.1,
                         capacity_factor=capacity_factor)
    router.set_task_top_k(0, 1)
    router.set_task_top_k(2, 2)
    layer = MoELayer(router, GroupedExperts(num_experts, d_model, ffn_hidden))
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    task_ids_T = torch.randint(0, num_tasks, (num_tokens,))
    out = layer(x_TD, RoutingContext(task_ids_T=task_ids_T))
    assert (out.routing.experts_TK == -1).any()
    grad_y = torch.randn(num_tokens, d_model, dtype=torch.float64)
    params = {"x": x_TD, "gate": router.w_XED, "w_in": layer.experts.w_in, "w_out": layer.experts.w_out}
    grads = torch.autograd.grad((out.y * grad_y.float()).sum() + out.aux_loss, list(params.values()))

    p = {name: t.detach().double().requires_grad_() for name, t in params.items()}
    expected = transcription(router, p["x"], task_ids_T, p["gate"])
    experts = out.routing.experts_TK.tolist()  # after capacity drops, checked against the transcription
    if capacity_factor is None:
        assert experts == expected["experts"]
    rows = []
    for t in range(num_tokens):
        y_D = torch.zeros(d_model, dtype=torch.float64)
        for j, e in enumerate(experts[t]):
            if e >= 0:
                assert e == expected["experts"][t][j]
                y_D = y_D + expected["weights"][t, j] * ref.mlp(p["x"][t], p["w_in"][e], p["w_out"][e], "swiglu")
        rows.append(y_D)
    y_ref = torch.stack(rows)
    ref_loss = (y_ref * grad_y).sum() + 0.01 * expected["balance_loss"] + 0.1 * expected["mi_loss"]
    ref_grads = torch.autograd.grad(ref_loss, list(p.values()))
    torch.testing.assert_close(out.y, y_ref.float(), atol=1e-5, rtol=1e-4)
    assert out.tokens_per_expert_E.sum() == sum(e >= 0 for row in experts for e in row)
    for name, grad, want in zip(params, grads, ref_grads):
        torch.testing.assert_close(grad, want.float(), atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 5}, r"top_k = 5: must be in \[1, num_experts = 4\]"),
        ({"num_tasks": 0}, r"num_tasks = 0: must be >= 1"),
        ({"mode": "shared"}, r"mode = 'shared': allowed: per_task, concat"),
        ({"noise": "gumbel"}, r"noise = 'gumbel': allowed: none, learned, fixed"),
        ({"aux_loss": "z"}, r"aux_loss = 'z': allowed: none, switch, importance_load"),
        ({"drop_policy": "random"}, r"drop_policy = 'random': allowed: position, score"),
        ({"score_epsilon": -0.1}, r"score_epsilon = -0.1: must be >= 0"),
        ({"aux_loss_coef": -1.0}, r"aux_loss_coef = -1.0: must be >= 0"),
        ({"mi_loss_coef": -1.0}, r"mi_loss_coef = -1.0: must be >= 0"),
        ({"capacity_factor": 0.0}, r"capacity_factor = 0.0: must be > 0"),
        ({"noise_epsilon": 0.0}, r"noise_epsilon = 0.0: must be > 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"top_k": 2, "num_tasks": 2, **kwargs}
    top_k, num_tasks = args.pop("top_k"), args.pop("num_tasks")
    with pytest.raises(ValueError, match=match):
        TaskGateRouter(8, 4, top_k, num_tasks, **args)


@pytest.mark.parametrize(
    "ctx, match",
    [
        (None, r"TaskGateRouter needs RoutingContext.task_ids_T"),
        (RoutingContext(), r"TaskGateRouter needs RoutingContext.task_ids_T"),
        (RoutingContext(task_ids_T=torch.tensor([0, 1, 3])), r"values in \[0, 3\]: allowed \[0, 2\] \(3 tasks\)"),
        (RoutingContext(task_ids_T=torch.tensor([0, -1, 2])), r"values in \[-1, 2\]"),
        (RoutingContext(task_ids_T=torch.tensor([0, 1])), r"task_ids_T has shape \(2,\): expected \(3,\)"),
        (RoutingContext(task_ids_T=torch.tensor([0.0, 1.0, 2.0])), r"dtype torch.float32: expected an integer"),
    ],
)
def test_task_id_errors(ctx, match):
    with pytest.raises(ValueError, match=match):
        TaskGateRouter(8, 4, 2, 3)(torch.randn(3, 8), ctx)


def test_set_task_top_k_errors():
    router = TaskGateRouter(8, 4, 2, 3)
    with pytest.raises(ValueError, match=r"k = 3 for task 1: must be in \[1, top_k = 2\]"):
        router.set_task_top_k(1, 3)
    with pytest.raises(ValueError, match=r"k = 0 for task 1"):
        router.set_task_top_k(1, 0)
    with pytest.raises(ValueError, match=r"task = 3: must be in \[0, 2\] \(3 tasks\)"):
        router.set_task_top_k(3, 1)
    assert router.task_top_k_X.tolist() == [2, 2, 2]


def test_noise_argument_errors():
    ctx = RoutingContext(task_ids_T=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="noise_TE was given but noise = 'none' adds no noise"):
        TaskGateRouter(8, 4, 2, 2)(torch.randn(3, 8), ctx, noise_TE=torch.randn(3, 4))
    router = TaskGateRouter(8, 4, 2, 2, noise="fixed")
    with pytest.raises(ValueError, match=r"noise_TE has shape \(3, 2\)"):
        router(torch.randn(3, 8), ctx, noise_TE=torch.randn(3, 2))
    router.eval()
    with pytest.raises(ValueError, match="noise_TE was given in eval mode"):
        router(torch.randn(3, 8), ctx, noise_TE=torch.randn(3, 4))


def _holds_fp32_tokens(t: torch.Tensor, x_TD: torch.Tensor) -> bool:
    """Whether t is an fp32 copy of x_TD's values, possibly reshaped, transposed or as columns of a wider tensor."""
    if t.dtype != torch.float32 or t.dim() < 2:
        return False
    want_TD = x_TD.detach().float()
    for cand in (t, t.transpose(-2, -1)):
        rows = cand.reshape(-1, cand.shape[-1])
        if rows.shape[0] == want_TD.shape[0] and any(
            torch.equal(rows[:, i : i + want_TD.shape[1]], want_TD) for i in range(rows.shape[1] - want_TD.shape[1] + 1)
        ):
            return True
    return False


def _fp32_token_copies(module, x_TD: torch.Tensor, *args) -> list[torch.Size]:
    """The shapes of the fp32 copies of x_TD that autograd saves when module(x_TD, *args) runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x_TD, *args)
    return [t.shape for t in saved if _holds_fp32_tokens(t, x_TD)]


@pytest.mark.parametrize("kind", ["task_per_task_learned_noise", "task_concat", "attribute", "dselect_k", "mmoe"])
def test_task_conditional_gates_keep_no_fp32_copy_of_bf16_tokens(kind: str) -> None:
    # Gates compute their logits in fp32; written as x.float() @ w.float().t(), autograd would keep an
    # fp32 copy of the tokens (T*D*4 bytes per layer). Like the routers they use routing.gate.gate_logits.
    from moe_engine.mtl.attribute_router import AttributeRouter
    from moe_engine.mtl.dselect_k import DSelectKGate
    from moe_engine.mtl.mmoe import MultiGateMoE

    torch.manual_seed(0)
    T, D, E, X = 10, 12, 4, 3
    x_TD = torch.randn(T, D, dtype=torch.bfloat16, requires_grad=True)
    task_ids_T = torch.randint(0, X, (T,))
    if kind.startswith("task"):
        mode, noise = ("per_task", "learned") if kind == "task_per_task_learned_noise" else ("concat", "none")
        module = TaskGateRouter(D, E, 2, X, mode=mode, noise=noise).to(torch.bfloat16).train()
        args = (RoutingContext(task_ids_T=task_ids_T),)
    elif kind == "attribute":
        module = AttributeRouter(D, E, 3, 2, attribute_dim=5, use_tokens=True).to(torch.bfloat16)
        args = (RoutingContext(attributes_TA=torch.randint(0, 2, (T, 3))),)
    elif kind == "dselect_k":
        module = DSelectKGate(E, 2, gate="per_example", num_tasks=X, d_model=D).to(torch.bfloat16)
        args = (task_ids_T,)
    else:
        module = MultiGateMoE(D, E, 8, X).to(torch.bfloat16)
        args = ()
    assert _fp32_token_copies(module, x_TD, *args) == []
