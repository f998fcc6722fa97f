"""Tests of moe_engine.mtl.task_level: task-level routing and the extraction of a task's sub-network.

The router (fp32) is compared with a float64 transcription of its gate (a logit table, or a task
embedding through Linear -> ReLU -> Linear) followed by the naive top-k loop of
tests/reference_moe.py: routing a one-hot task vector through the weight matrix (logits / T)^T
gives each token its task's logits. Extraction is checked by equality with the full layer and
the full MultiTaskTransformer on a task's inputs (eval, fp32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference_moe as ref
from moe_engine.config import ModelConfig, MoEConfig, RouterConfig
from moe_engine.experts import MLP, GroupedExperts
from moe_engine.layer import MoELayer
from moe_engine.mtl.model import MultiTaskTransformer
from moe_engine.mtl.task_level import (
    TaskFFN,
    TaskLevelRouter,
    extract_task_ffn,
    extract_task_model,
    task_experts,
)
from moe_engine.mtl.tasks import TaskSpec
from moe_engine.parallel import LocalDispatcher
from moe_engine.routing import RoutingContext, TopKRouter

FP32_ATOL, FP32_RTOL = 1e-6, 1e-5


@pytest.fixture(autouse=True)
def _torch_reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path of topk_gating on CPU; the Triton kernel has its own tests."""
    monkeypatch.delenv("MOE_ENGINE_KERNELS", raising=False)


def make_router(num_experts: int, top_k: int, num_tasks: int, gate: str = "table", **kwargs) -> TaskLevelRouter:
    """A router with unit-scale logits (clear top-k gaps, unlike the small default init)."""
    router = TaskLevelRouter(8, num_experts, top_k, num_tasks, gate=gate, **kwargs)
    with torch.no_grad():
        for param in router.parameters():
            param.normal_()
    return router


def gate_params(router: TaskLevelRouter) -> dict[str, torch.Tensor]:
    if router.gate == "table":
        return {"table": router.task_logits_XE}
    return {
        "embed": router.task_embed.weight,
        "w1": router.mlp_in.weight,
        "b1": router.mlp_in.bias,
        "w2": router.mlp_out.weight,
        "b2": router.mlp_out.bias,
    }


def reference_task_logits(gate: str, params64: dict[str, torch.Tensor]) -> torch.Tensor:
    """(num_tasks, E) float64: the table, or W2 relu(W1 e + b1) + b2 per task."""
    if gate == "table":
        return params64["table"]
    hidden = torch.clamp(params64["embed"] @ params64["w1"].t() + params64["b1"], min=0.0)
    return hidden @ params64["w2"].t() + params64["b2"]


def reference_routing(logits_XE: torch.Tensor, task_ids_T: torch.Tensor, top_k: int, temperature: float,
                      renormalize: bool = True):
    one_hot_TX = torch.nn.functional.one_hot(task_ids_T, logits_XE.shape[0]).double()
    return ref.route(one_hot_TX, (logits_XE / temperature).t(), top_k, renormalize=renormalize)


def float64_leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().requires_grad_() for name, p in params.items()}


# ---------------------------------------------------------------------------------------------
# The router against the transcription
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["table", "embedding_mlp"])
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, num_tasks, temperature, renormalize",
    [
        (12, 8, 2, 3, 1.0, True),  # typical
        (12, 8, 2, 3, 1.0, False),  # the K probabilities as they are
        (1, 4, 2, 2, 0.5, True),  # T = 1, sharper softmax
        (9, 7, 3, 5, 2.0, True),  # prime E, flatter softmax
        (6, 3, 3, 2, 1.0, True),  # K = E
        (5, 6, 1, 4, 1.0, False),  # K = 1 (weight p), E not a power of two
    ],
)
def test_router_matches_reference(gate, num_tokens, num_experts, top_k, num_tasks, temperature, renormalize):
    torch.manual_seed(0)
    router = make_router(num_experts, top_k, num_tasks, gate, task_embed_dim=5, temperature=temperature,
                         renormalize=renormalize)
    task_ids_T = torch.randint(0, num_tasks, (num_tokens,))
    routing = router(torch.randn(num_tokens, 8), RoutingContext(task_ids_T=task_ids_T))

    params64 = float64_leaves(gate_params(router))
    expected = reference_routing(reference_task_logits(gate, params64), task_ids_T, top_k, temperature, renormalize)
    assert routing.capacity is None and routing.aux_loss.item() == 0.0 and dict(routing.aux_terms) == {}
    assert routing.weights_TK.dtype == routing.scores_TE.dtype == torch.float32
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.weights_TK.double(), expected.weights_TK.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.scores_TE.double(), expected.scores_TE.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)

    grad_w = torch.randn(num_tokens, top_k, dtype=torch.float64)
    grad_s = torch.randn(num_tokens, num_experts, dtype=torch.float64)
    ((routing.weights_TK.double() * grad_w).sum() + (routing.scores_TE.double() * grad_s).sum()).backward()
    ((expected.weights_TK * grad_w).sum() + (expected.scores_TE * grad_s).sum()).backward()
    for name, param in gate_params(router).items():
        torch.testing.assert_close(param.grad.double(), params64[name].grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("gate", ["table", "embedding_mlp"])
def test_every_token_of_a_task_routes_alike_whatever_its_features(gate):
    torch.manual_seed(1)
    router = make_router(8, 2, 4, gate)
    task_ids_T = torch.arange(40) % 4
    x = torch.randn(40, 8) * 10
    routing = router(x, RoutingContext(task_ids_T=task_ids_T))
    per_task = []
    for task in range(4):
        rows = task_ids_T == task
        experts_K, weights_K = router.task_experts(task)
        assert (routing.experts_TK[rows] == torch.tensor(experts_K)).all()
        torch.testing.assert_close(routing.weights_TK[rows], weights_K.expand(int(rows.sum()), 2), atol=0, rtol=0)
        per_task.append(tuple(experts_K))
    assert len(set(per_task)) > 1  # the tasks do not all share one routing
    # bf16 tokens and autocast change nothing: the routing reads the task only.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        other = router(x.bfloat16(), RoutingContext(task_ids_T=task_ids_T))
    assert torch.equal(other.experts_TK, routing.experts_TK)
    torch.testing.assert_close(other.weights_TK, routing.weights_TK, atol=0, rtol=0)


def test_gumbel_noise_in_training_only_one_draw_per_task():
    torch.manual_seed(2)
    num_tasks, num_experts = 3, 6
    router = make_router(num_experts, 2, num_tasks, "embedding_mlp", gumbel=True, temperature=0.7)
    task_ids_T = torch.arange(12) % num_tasks
    ctx = RoutingContext(task_ids_T=task_ids_T)
    x = torch.randn(12, 8)
    clean = router.eval()(x, ctx)
    router.train()
    torch.manual_seed(7)
    noisy = router(x, ctx)
    torch.manual_seed(7)
    gumbel_XE = -torch.empty(num_tasks, num_experts).exponential_().log()
    logits_XE = reference_task_logits("embedding_mlp", float64_leaves(gate_params(router))).detach()
    expected = reference_routing(logits_XE + gumbel_XE.double(), task_ids_T, 2, 0.7)
    assert torch.equal(noisy.experts_TK, expected.experts_TK)
    torch.testing.assert_close(noisy.weights_TK.double(), expected.weights_TK, atol=FP32_ATOL, rtol=FP32_RTOL)
    for task in range(num_tasks):  # still one routing per task
        rows = noisy.weights_TK[task_ids_T == task]
        torch.testing.assert_close(rows, rows[:1].expand_as(rows), atol=0, rtol=0)
    assert not torch.equal(noisy.scores_TE, clean.scores_TE)
    # task_experts is the noiseless routing in any mode.
    experts_K, weights_K = router.task_experts(1)
    assert experts_K == clean.experts_TK[1].tolist()
    torch.testing.assert_close(weights_K, clean.weights_TK[1], atol=0, rtol=0)
    # Without gumbel, training adds nothing.
    plain = make_router(num_experts, 2, num_tasks, "embedding_mlp", temperature=0.7)
    plain.load_state_dict(router.state_dict())
    torch.testing.assert_close(plain.train()(x, ctx).scores_TE, clean.scores_TE, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Inside an MoELayer, and extraction
# ---------------------------------------------------------------------------------------------


def make_layer(activation: str, shared: bool, gated: bool, gate: str = "table", num_experts: int = 7,
               top_k: int = 2, num_tasks: int = 3) -> MoELayer:
    d_model, hidden = 6, 5
    router = make_router(num_experts, top_k, num_tasks, gate)
    experts = GroupedExperts(num_experts, d_model, hidden, activation)
    shared_experts = MLP(d_model, 4, activation) if shared else None
    shared_gate = nn.Linear(d_model, 1, bias=False) if gated else None
    return MoELayer(router, experts, shared_experts=shared_experts, shared_expert_gate=shared_gate)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_layer_matches_per_token_loop(activation):
    torch.manual_seed(3)
    layer = make_layer(activation, shared=False, gated=False)
    task_ids_T = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0])
    x = torch.randn(9, 6, requires_grad=True)
    out = layer(x, RoutingContext(task_ids_T=task_ids_T))

    params = {"table": layer.router.task_logits_XE, "w_in": layer.experts.w_in, "w_out": layer.experts.w_out}
    params64 = float64_leaves(params)
    x64 = x.detach().double().requires_grad_()
    routing = reference_routing(params64["table"], task_ids_T, 2, 1.0)
    rows = []
    for t in range(9):
        y_D = torch.zeros(6, dtype=torch.float64)
        for k in range(2):
            e = int(routing.experts_TK[t, k])
            y_D = y_D + routing.weights_TK[t, k] * ref.mlp(x64[t], params64["w_in"][e], params64["w_out"][e], activation)
        rows.append(y_D)
    y64 = torch.stack(rows)
    torch.testing.assert_close(out.y.double(), y64.detach(), atol=1e-5, rtol=1e-5)
    grad_y = torch.randn(9, 6, dtype=torch.float64)
    (out.y.double() * grad_y).sum().backward()
    (y64 * grad_y).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    for name, param in params.items():
        torch.testing.assert_close(param.grad.double(), params64[name].grad, atol=1e-5, rtol=1e-5, msg=name)


def expert_parameter_count(num_experts: int, activation: str, d_model: int = 6, hidden: int = 5) -> int:
    width_in = 2 * hidden if activation == "swiglu" else hidden
    return num_experts * (width_in * d_model + d_model * hidden)


@pytest.mark.parametrize(
    "activation, shared, gated, gate",
    [
        ("swiglu", False, False, "table"),
        ("gelu", False, False, "embedding_mlp"),
        ("swiglu", True, True, "embedding_mlp"),  # Qwen2-MoE style gated shared expert
        ("gelu", True, False, "table"),
    ],
)
def test_extract_task_ffn_equals_the_layer(activation, shared, gated, gate):
    torch.manual_seed(4)
    layer = make_layer(activation, shared, gated, gate).eval()
    x = torch.randn(3, 5, 6)
    chosen = []
    for task in range(3):
        ffn = extract_task_ffn(layer, task)
        assert isinstance(ffn, TaskFFN) and not isinstance(ffn, MoELayer) and not ffn.training
        experts_K, weights_K = task_experts(layer, task)
        assert list(ffn.experts_K) == experts_K
        chosen.append(tuple(experts_K))
        expected = layer(x, RoutingContext(task_ids_T=torch.full((15,), task))).y
        torch.testing.assert_close(ffn(x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ffn(x, RoutingContext()), expected, atol=1e-6, rtol=1e-5)
        shared_count = sum(p.numel() for p in ffn.shared_experts.parameters()) if shared else 0
        shared_count += 6 if gated else 0
        assert sum(p.numel() for p in ffn.parameters()) == expert_parameter_count(2, activation) + shared_count
        assert sum(p.numel() for p in ffn.parameters()) < sum(p.numel() for p in layer.parameters())
    assert len(set(chosen)) > 1
    # The extracted module owns copies: training the layer further leaves it as it was.
    before = ffn(x)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(1.0)
    torch.testing.assert_close(ffn(x), before, atol=0, rtol=0)


def test_extract_task_ffn_k_equals_e():
    torch.manual_seed(5)
    layer = make_layer("swiglu", shared=False, gated=False, num_experts=3, top_k=3, num_tasks=2).eval()
    x = torch.randn(4, 6)
    ffn = extract_task_ffn(layer, 1)
    torch.testing.assert_close(ffn(x), layer(x, RoutingContext(task_ids_T=torch.ones(4, dtype=torch.long))).y,
                               atol=1e-6, rtol=1e-5)
    assert sorted(ffn.experts_K) == [0, 1, 2]


def build_model(activation: str, num_shared: int, gated: bool, gate: str, swap_all: bool) -> MultiTaskTransformer:
    torch.manual_seed(6)
    tasks = [TaskSpec(f"task{i}", 3 + i, 0.5, "a test task") for i in range(3)]
    model_cfg = ModelConfig(d_model=16, num_layers=2, num_heads=2, ffn_hidden=24, moe_every=1, patch_size=4)
    moe_cfg = MoEConfig(
        num_experts=5, ffn_hidden=12, activation=activation, num_shared_experts=num_shared,
        shared_expert_gate=gated, router=RouterConfig(top_k=2),
    )
    model = MultiTaskTransformer(model_cfg, moe_cfg, tasks, (8, 12))
    layers = model.moe_layers if swap_all else model.moe_layers[:1]
    for layer in layers:
        layer.router = TaskLevelRouter(16, 5, 2, len(tasks), gate=gate)
        with torch.no_grad():
            for param in layer.router.parameters():
                param.normal_()
    return model.eval()


@pytest.mark.parametrize(
    "activation, num_shared, gated, gate, swap_all",
    [
        ("gelu", 0, False, "table", True),
        ("swiglu", 1, True, "embedding_mlp", True),
        ("swiglu", 0, False, "table", False),  # one block keeps its token-level TopKRouter
    ],
)
def test_extract_task_model_equals_the_model(activation, num_shared, gated, gate, swap_all):
    model = build_model(activation, num_shared, gated, gate, swap_all)
    images = torch.rand(3, 8, 12)
    count = sum(p.numel() for p in model.parameters())
    for task in range(3):
        task_ids_B = torch.full((3,), task)
        full = model(images, task_ids_B)
        extracted = extract_task_model(model, task)
        assert len(extracted.moe_layers) == (0 if swap_all else 1)
        assert isinstance(extracted.blocks[0].ffn, TaskFFN)
        out = extracted(images, task_ids_B)
        torch.testing.assert_close(out.features_BD, full.features_BD, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(extracted.logits(out.features_BD, task), model.logits(full.features_BD, task),
                                   atol=1e-5, rtol=1e-5)
        assert len(out.routings) == len(extracted.moe_layers)
        assert sum(p.numel() for p in extracted.parameters()) < count
    # The model itself is untouched.
    assert len(model.moe_layers) == 2 and isinstance(model.moe_layers[0].router, TaskLevelRouter)


@pytest.mark.parametrize("top_k, renormalize", [(2, True), (1, False)])
def test_extract_task_model_of_a_config_built_model(top_k, renormalize):
    torch.manual_seed(9)
    tasks = [TaskSpec(f"task{i}", 4, 0.25, "a test task") for i in range(2)]
    router_cfg = RouterConfig(type="task_level", top_k=top_k, renormalize=renormalize)
    moe_cfg = MoEConfig(num_experts=4, ffn_hidden=8, router=router_cfg)
    model_cfg = ModelConfig(d_model=8, num_layers=2, num_heads=2, ffn_hidden=16, moe_every=1, patch_size=4)
    model = MultiTaskTransformer(model_cfg, moe_cfg, tasks, (8, 12)).eval()
    assert all(isinstance(layer.router, TaskLevelRouter) for layer in model.moe_layers)
    assert all(layer.router.renormalize == renormalize for layer in model.moe_layers)
    images, task_ids_B = torch.rand(2, 8, 12), torch.ones(2, dtype=torch.long)
    extracted = extract_task_model(model, 1)
    assert extracted.moe_layers == []
    torch.testing.assert_close(extracted(images, task_ids_B).features_BD, model(images, task_ids_B).features_BD,
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, r"d_model = 0: must be >= 1"),
        ({"num_experts": 0}, r"num_experts = 0: must be >= 1"),
        ({"top_k": 0}, r"top_k = 0: must be in \[1, num_experts = 4\]"),
        ({"top_k": 5}, r"top_k = 5: must be in \[1, num_experts = 4\]"),
        ({"num_tasks": 0}, r"num_tasks = 0: must be >= 1"),
        ({"gate": "mlp"}, r"gate = 'mlp': allowed: table, embedding_mlp"),
        ({"task_embed_dim": 0}, r"task_embed_dim = 0: must be >= 1"),
        ({"temperature": 0.0}, r"temperature = 0.0: must be a finite number > 0"),
        ({"temperature": float("nan")}, r"temperature = nan: must be a finite number > 0"),
        ({"top_k": 1}, r"top_k = 1 with renormalize=True: .* no gradient to the task gate"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"d_model": 8, "num_experts": 4, "top_k": 2, "num_tasks": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        TaskLevelRouter(args.pop("d_model"), args.pop("num_experts"), args.pop("top_k"), args.pop("num_tasks"), **args)


@pytest.mark.parametrize(
    "ctx, match",
    [
        (None, r"TaskLevelRouter needs RoutingContext.task_ids_T"),
        (RoutingContext(), r"TaskLevelRouter needs RoutingContext.task_ids_T"),
        (RoutingContext(task_ids_T=torch.tensor([0, 1, 3])), r"TaskLevelRouter: task_ids_T has values in \[0, 3\]: allowed \[0, 2\]"),
        (RoutingContext(task_ids_T=torch.tensor([0, 1])), r"task_ids_T has shape \(2,\): expected \(3,\)"),
        (RoutingContext(task_ids_T=torch.tensor([0.0, 1.0, 2.0])), r"task_ids_T has dtype torch.float32"),
    ],
)
def test_forward_errors(ctx, match):
    with pytest.raises(ValueError, match=match):
        TaskLevelRouter(8, 4, 2, 3)(torch.randn(3, 8), ctx)


@pytest.mark.parametrize(
    "task, match",
    [
        (-1, r"task = -1: allowed \[0, 2\] \(3 tasks\)"),
        (3, r"task = 3: allowed \[0, 2\] \(3 tasks\)"),
        (1.0, r"task = 1.0: expected an int task id in \[0, 2\]"),
        (True, r"task = True: expected an int task id"),
    ],
)
def test_bad_task_ids(task, match):
    layer = make_layer("gelu", shared=False, gated=False)
    with pytest.raises(ValueError, match=match):
        layer.router.task_experts(task)
    with pytest.raises(ValueError, match=match):
        extract_task_ffn(layer, task)
    with pytest.raises(ValueError, match=match):
        extract_task_model(nn.Sequential(nn.Linear(6, 6), layer), task)


def test_task_experts_accepts_a_tensor_index():
    router = make_router(5, 2, 3)
    assert router.task_experts(torch.tensor(2))[0] == router.task_experts(2)[0]


def test_errors_for_other_routers_and_layouts():
    top_k_layer = MoELayer(TopKRouter(6, 4, 2), GroupedExperts(4, 6, 5))
    with pytest.raises(TypeError, match=r"task_experts: needs a TaskLevelRouter .*got an MoELayer routed by TopKRouter"):
        task_experts(top_k_layer, 0)
    with pytest.raises(TypeError, match=r"task_experts: needs a TaskLevelRouter .*got TopKRouter"):
        task_experts(TopKRouter(6, 4, 2), 0)
    with pytest.raises(TypeError, match=r"extract_task_ffn: needs a TaskLevelRouter .*routed by TopKRouter"):
        extract_task_ffn(top_k_layer, 0)
    with pytest.raises(TypeError, match=r"extract_task_ffn: needs an MoELayer; got Linear"):
        extract_task_ffn(nn.Linear(6, 6), 0)
    with pytest.raises(ValueError, match=r"extract_task_model: Sequential has no MoELayer routed by a TaskLevelRouter"):
        extract_task_model(nn.Sequential(top_k_layer), 0)

    class RemoteDispatcher:
        num_experts = num_local_experts = 4

    router = TaskLevelRouter(6, 4, 2, 3)
    with pytest.raises(TypeError, match=r"dispatcher is RemoteDispatcher: needs a LocalDispatcher"):
        extract_task_ffn(MoELayer(router, GroupedExperts(4, 6, 5), dispatcher=RemoteDispatcher()), 0)
    with pytest.raises(TypeError, match=r"the layer's experts are Identity: needs GroupedExperts"):
        extract_task_ffn(MoELayer(router, nn.Identity(), dispatcher=LocalDispatcher(4)), 0)
    with pytest.raises(ValueError, match=r"the layer has 5 experts but its router routes over 4"):
        extract_task_ffn(MoELayer(router, GroupedExperts(5, 6, 5), dispatcher=LocalDispatcher(4)), 0)


def test_extract_task_model_of_a_bare_layer():
    torch.manual_seed(8)
    layer = make_layer("swiglu", shared=True, gated=False).eval()
    ffn = extract_task_model(layer, 0)
    assert isinstance(ffn, TaskFFN)
    x = torch.randn(5, 6)
    torch.testing.assert_close(ffn(x), layer(x, RoutingContext(task_ids_T=torch.zeros(5, dtype=torch.long))).y,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("gate", ["table", "embedding_mlp"])
def test_top1_gate_learns_from_the_task_loss(gate):
    # With K = 1 and no renormalisation the weight is p, so the task loss reaches the gate (a
    # renormalised p / p = 1 would leave it at its initial choice forever, hence refused).
    torch.manual_seed(3)
    layer = MoELayer(make_router(4, 1, 2, gate, renormalize=False), GroupedExperts(4, 8, 6))
    x_TD = torch.randn(5, 8)
    ctx = RoutingContext(task_ids_T=torch.tensor([0, 1, 1, 0, 1]))
    layer(x_TD, ctx).y.square().sum().backward()
    for name, param in gate_params(layer.router).items():
        if name != "b1":  # relu may close every hidden unit's bias path of one task; the rest must move
            assert param.grad is not None and param.grad.abs().max() > 0, name
