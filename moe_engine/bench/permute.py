"""Permute/unpermute micro-benchmark: moe_engine.kernels.permute against torch argsort/index_select/bmm.

Three ops per case, on the routing of the layer benchmark's tokens (the same Problem):
- `expert_order`: experts_TK -> choice_N (choices sorted by expert, stable) and tokens_per_expert_E.
  Bytes: T*K int64 read, N + E int64 written.
- `permute`: x_TD -> x_ND = x_TD[choice_N // K]. Bytes: N rows of D read and written, N indices read.
- `unpermute`: y_ND -> y_TD[t] = sum_k w[t,k] y_ND[row of (t,k)] (fp32 sum; torch: the rows back to token
  order, then one batched matmul, `weighted_combine`). Bytes: N rows read,
  N indices and weights read, T rows written.
GB/s = bytes / forward median; `copy_bw_fraction` compares it with this device's measured copy.
fwd+bwd differentiates permute by x and unpermute by y_ND and the weights.

    python benchmarks/permute.py --quick
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from moe_engine.bench.common import BenchOptions
from moe_engine.bench.micro import MicroPath, run_cases, run_op
from moe_engine.bench.problem import Shape, make_problem, softmax_topk, weighted_combine


def torch_expert_order(experts_TK: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    flat_C = experts_TK.reshape(-1)
    return {
        "choice_N": torch.argsort(flat_C, stable=True),
        "tokens_per_expert_E": torch.bincount(flat_C, minlength=num_experts),
    }


def torch_unpermute(y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """The lean torch combine (rows back to token order, one batched matmul), in y_ND's dtype."""
    return weighted_combine(y_ND, choice_N, weights_TK)


def reference_unpermute(y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """The unpermute in fp32, rounded to y_ND's dtype once: what every path is compared with."""
    return weighted_combine(y_ND.float(), choice_N, weights_TK.float()).to(y_ND.dtype)


def bench_case(shape: Shape, routing: str, opts: BenchOptions, copy_gbps: float) -> dict[str, Any]:
    from moe_engine.kernels import expert_order, permute, unpermute

    problem = make_problem(shape, routing, opts.device, opts.seed, with_experts=False)
    T, D, E, K, elt = shape.T, shape.D, shape.E, shape.K, problem.x_TD.element_size()
    N = T * K
    with torch.no_grad():
        weights_TK, experts_TK = softmax_topk(problem.x_TD, problem.router_weight_ED, K)
    weights_TK.requires_grad_(True)
    x_TD = problem.x_TD
    order = torch_expert_order(experts_TK, E)
    choice_N = order["choice_N"]
    gen = torch.Generator(device=opts.device).manual_seed(opts.seed + 1)
    y_ND = torch.randn(N, D, generator=gen, device=opts.device).to(problem.dtype).requires_grad_(True)

    def ours_order() -> MicroPath:
        return MicroPath(lambda: dict(zip(("choice_N", "tokens_per_expert_E"), expert_order(experts_TK, E, N))))

    def ours_permute() -> MicroPath:
        return MicroPath(lambda: {"x_ND": permute(x_TD, choice_N, K)}, "x_ND", (x_TD,))

    def torch_permute() -> MicroPath:
        return MicroPath(lambda: {"x_ND": x_TD.index_select(0, choice_N // K)}, "x_ND", (x_TD,))

    def ours_unpermute() -> MicroPath:
        return MicroPath(lambda: {"y_TD": unpermute(y_ND, choice_N, weights_TK, T)}, "y_TD", (y_ND, weights_TK))

    def torch_unpermute_path() -> MicroPath:
        return MicroPath(lambda: {"y_TD": torch_unpermute(y_ND, choice_N, weights_TK)}, "y_TD", (y_ND, weights_TK))

    # op: (paths, reference outputs, useful bytes, what the bytes count)
    ops: dict[str, tuple[dict[str, Callable[[], MicroPath]], dict[str, torch.Tensor], int, str]] = {
        "expert_order": (
            {"ours": ours_order, "torch": lambda: MicroPath(lambda: torch_expert_order(experts_TK, E))},
            order, (N + N + E) * 8, "experts_TK read, choice_N and tokens_per_expert_E written (int64)",
        ),
        "permute": (
            {"ours": ours_permute, "torch": torch_permute},
            {"x_ND": x_TD.detach().index_select(0, choice_N // K)}, 2 * N * D * elt + N * 8,
            "N rows of x read and written, choice_N read",
        ),
        "unpermute": (
            {"ours": ours_unpermute, "torch": torch_unpermute_path},
            {"y_TD": reference_unpermute(y_ND.detach(), choice_N, weights_TK.detach())}, (N * D + T * D) * elt + N * 12,
            "N rows read, T rows written, choice_N and weights read",
        ),
    }
    record: dict[str, Any] = {
        "shape": shape.name, "T": T, "D": D, "E": E, "K": K, "dtype": shape.dtype, "routing": routing, "ops": {},
    }
    for name, (paths, reference, nbytes, counted) in ops.items():
        record["ops"][name] = run_op(paths, reference, None, nbytes, copy_gbps, opts, counted)
    return record


def run(opts: BenchOptions, copy_gbps: float, records: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """Every (shape, routing) case in order: append its record, print its table, save the report."""
    run_cases("permute", bench_case, opts, copy_gbps, records, save)


def main(argv: list[str] | None = None) -> int:
    from moe_engine.bench.suite import main as suite_main

    return suite_main(argv, benchmarks=("permute",), prog="benchmarks/permute.py")
