"""Router micro-benchmark: our TopKRouter and top-k gating op against torch softmax + topk.

Two ops per case, both on the same tokens and router weight as the layer benchmark:
- `router`: x_TD -> (weights_TK, experts_TK): the fp32 gate GEMM plus gating. Ours is
  moe_engine.routing.TopKRouter (no aux loss), which uses moe_engine.kernels' top-k gating where
  MOE_ENGINE_KERNELS picks it. Bytes: x and W read, weights (fp32) and experts (int64) written.
- `topk_gating`: fp32 logits_TE -> (weights_TK, experts_TK): moe_engine.kernels.router.topk_gating
  if this checkout has it. Bytes: logits read, weights and experts written (the scores and loss
  statistics the op also writes are not counted).
Choices are compared as sets per token (sorted by expert id); near-tie tokens are left out.

    python benchmarks/router.py --quick
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from moe_engine.bench.common import BenchOptions
from moe_engine.bench.micro import MicroPath, run_cases, run_op
from moe_engine.bench.peers import PeerSkipped
from moe_engine.bench.problem import Problem, Shape, make_problem, near_tie_keep_mask, softmax_topk


def _by_expert(weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> dict[str, torch.Tensor]:
    """Order each token's choices by expert id, so paths that order ties differently compare equal."""
    experts_sorted, order = experts_TK.sort(dim=-1)
    return {"experts_TK": experts_sorted, "weights_TK": weights_TK.gather(-1, order)}


def _canonical(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`_by_expert` of a path's outputs: for the comparison only (a sort in the timed runs would be
    timed on both sides and pull the ratio towards 1)."""
    return _by_expert(outputs["weights_TK"], outputs["experts_TK"])


def _path(run: Callable[[], tuple[torch.Tensor, torch.Tensor]], inputs: tuple[torch.Tensor, ...]) -> MicroPath:
    """A gating path: run() -> (weights_TK, experts_TK), compared by expert, fwd+bwd through the weights."""
    return MicroPath(lambda: dict(zip(("weights_TK", "experts_TK"), run())), "weights_TK", inputs, _canonical)


def _topk_from_logits(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top_TK, experts_TK = torch.topk(logits_TE.softmax(dim=-1), top_k, dim=-1)
    return top_TK / top_TK.sum(dim=-1, keepdim=True), experts_TK


def _kernel_topk_gating() -> Callable[..., Any]:
    try:
        module = importlib.import_module("moe_engine.kernels.router")
    except ModuleNotFoundError as err:
        raise PeerSkipped(f"no moe_engine.kernels.router in this checkout ({err})") from None
    fn = getattr(module, "topk_gating", None)
    if fn is None:
        raise PeerSkipped("moe_engine.kernels.router has no topk_gating")
    return fn


def router_paths(problem: Problem) -> dict[str, Callable[[], MicroPath]]:
    s, x, w = problem.shape, problem.x_TD, problem.router_weight_ED

    def ours() -> MicroPath:
        from moe_engine.routing import TopKRouter

        router = TopKRouter(s.D, s.E, s.K, aux_loss_type="none", aux_loss_coef=0.0, z_loss_coef=0.0)
        router = router.to(device=x.device, dtype=w.dtype).train()
        with torch.no_grad():
            router.weight.copy_(w)

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            routing = router(x)
            return routing.weights_TK, routing.experts_TK

        return _path(run, (x, router.weight))

    def torch_softmax_topk() -> MicroPath:
        return _path(lambda: softmax_topk(x, w, s.K), (x, w))

    return {"ours": ours, "torch": torch_softmax_topk}


def gating_paths(logits_TE: torch.Tensor, top_k: int) -> dict[str, Callable[[], MicroPath]]:
    def ours() -> MicroPath:
        topk_gating = _kernel_topk_gating()

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            gating = topk_gating(logits_TE, top_k)
            return gating.weights_TK, gating.experts_TK

        return _path(run, (logits_TE,))

    def torch_softmax_topk() -> MicroPath:
        return _path(lambda: _topk_from_logits(logits_TE, top_k), (logits_TE,))

    return {"ours": ours, "torch": torch_softmax_topk}


def bench_case(shape: Shape, routing: str, opts: BenchOptions, copy_gbps: float) -> dict[str, Any]:
    problem = make_problem(shape, routing, opts.device, opts.seed, with_experts=False)
    T, D, E, K, elt = shape.T, shape.D, shape.E, shape.K, problem.x_TD.element_size()
    x32, w32 = problem.x_TD.detach().float(), problem.router_weight_ED.detach().float()
    keep_T = near_tie_keep_mask(x32, w32, K)
    with torch.no_grad():
        reference = _by_expert(*softmax_topk(x32, w32, K))
    logits_TE = (x32 @ w32.t()).requires_grad_(True)
    outputs_bytes = T * K * (4 + 8)
    record: dict[str, Any] = {
        "shape": shape.name, "T": T, "D": D, "E": E, "K": K, "dtype": shape.dtype, "routing": routing,
        "near_tie_tokens": int((~keep_T).sum()), "ops": {},
    }
    record["ops"]["router"] = run_op(
        router_paths(problem), reference, keep_T, (T * D + E * D) * elt + outputs_bytes, copy_gbps, opts,
        "x_TD and W_ED read, weights_TK (fp32) and experts_TK (int64) written",
    )
    record["ops"]["topk_gating"] = run_op(
        gating_paths(logits_TE, K), reference, keep_T, T * E * 4 + outputs_bytes, copy_gbps, opts,
        "fp32 logits_TE read, weights_TK (fp32) and experts_TK (int64) written",
    )
    return record


def run(opts: BenchOptions, copy_gbps: float, records: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """Every (shape, routing) case in order: append its record, print its table, save the report."""
    run_cases("router", bench_case, opts, copy_gbps, records, save)


def main(argv: list[str] | None = None) -> int:
    from moe_engine.bench.suite import main as suite_main

    return suite_main(argv, benchmarks=("router",), prog="benchmarks/router.py")
