"""The MoE layer benchmark: ours and its peers on the same inputs and weights, forward and forward+backward.

For each (shape, routing) case: draw one `Problem`, compute the fp32 reference once, then for each
path build it, check its output y and input gradient dx against the reference (a path that does
not agree is not timed), time forward and forward+backward, and record peak memory on CUDA. A path
that cannot run records why; one that fails records its error; the benchmark goes on.

    python benchmarks/moe_layer.py --quick
    moe-engine bench --only layer --shapes mixtral,olmoe --routing balanced,skewed
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import torch

from moe_engine.bench.common import (
    TOLERANCES,
    BenchOptions,
    compare,
    describe_error,
    format_table,
    free_memory,
    measure,
    peak_memory_bytes,
    say,
    tflops,
)
from moe_engine.bench.peers import BUILDERS, DISTRIBUTED_PEERS, PeerEnv, PeerRun, PeerSkipped, distributed_session
from moe_engine.bench.problem import Problem, Reference, Shape, compute_reference, make_problem

REFERENCE = "fp32 per-expert loop on the same dtype-rounded inputs and weights"
# The loop-like peers (a Python loop over experts: seconds a call at the big shapes) take at most
# LOOP_MIN_REPS timed runs; every other path the full --min-reps.
LOOP_PATHS = ("torch_loop", "deepspeed", "deepspeed_dropless", "megatron", "hf_eager")
LOOP_MIN_REPS = 3


def empty_entry() -> dict[str, Any]:
    """One path's record; status: ok | skipped | error | disagrees (checked, not timed)."""
    return {
        "status": None, "fwd_ms": None, "fwd_bwd_ms": None, "fwd_ms_p20_p80": None, "fwd_bwd_ms_p20_p80": None,
        "fwd_tflops": None, "fwd_bwd_tflops": None, "timed_runs": None, "peak_mem_bytes": None, "agreement": None,
        "skip_reason": None, "error": None, "notes": {},
    }


WEIGHT_NAMES = ("router_weight_ED", "w_in_EHD", "w_out_EDF")


def weight_grad_agreement(grads: tuple[torch.Tensor | None, ...], reference: Reference, tol: float) -> dict[str, Any]:
    """Each of a path's (router, w_in, w_out) gradients against the reference's: the router's whole,
    the experts' on each of the reference's checked experts. Relative to the largest reference
    magnitude, as for y, but per expert: the least busy expert's gradient can be orders of magnitude
    smaller than the busiest's, and an error in it would hide under the busiest's scale. An expert
    weight's entry is its worst expert's agreement (`worst_expert` names it), ok only if every
    checked expert agrees; a missing gradient (the path never used that weight) disagrees."""
    result: dict[str, Any] = {}
    checked = list(reference.checked_experts)
    for name, grad in zip(WEIGHT_NAMES, grads):
        ref = reference.grads[name]
        if grad is None:
            result[name] = {"ok": False, "error": "no gradient"}
        elif name == "router_weight_ED":
            result[name] = compare(grad, ref, tol).to_json()
        elif grad.shape[1:] != ref.shape[1:] or grad.shape[0] <= max(checked):
            result[name] = {"ok": False, "error": f"shape {tuple(grad.shape)}"}
        else:
            per_expert = [compare(grad[e], ref[i], tol) for i, e in enumerate(checked)]
            worst = max(range(len(checked)), key=lambda i: (not per_expert[i].ok, per_expert[i].max_rel or 0.0))
            result[name] = {**per_expert[worst].to_json(), "ok": all(a.ok for a in per_expert),
                            "worst_expert": checked[worst]}
    result["checked_experts"] = checked
    return result


def check_agreement(
    run: PeerRun, problem: Problem, reference: Reference, ours: list[torch.Tensor] | None = None
) -> dict[str, Any]:
    """Compare the path's y and dx with the reference over the non-tie tokens, and the gradients of its
    router and expert weights where it keeps them in the problem's layouts; this decides `ok`.

    ours: our [y, dx] if ours ran first; the path is also compared with it ("vs_ours", for the
    record only). An empty list is filled with this path's [y, dx] instead.
    """
    tol = TOLERANCES[problem.dtype]
    y_TD = (run.check_forward or run.forward)()
    weights = run.problem_weights if reference.grads else None
    dx_TD, *weight_grads = torch.autograd.grad(y_TD, [problem.x_TD, *(weights or ())], problem.grad_y_TD,
                                               allow_unused=True)
    y = compare(y_TD, reference.y_TD, tol, reference.keep_T)
    dx = compare(dx_TD, reference.dx_TD, tol, reference.keep_T)
    result = {"y": y.to_json(), "dx": dx.to_json(), "ok": y.ok and dx.ok, "reference": REFERENCE,
              "weight_grads": None if weights is None else weight_grad_agreement(tuple(weight_grads), reference, tol)}
    if result["weight_grads"] is not None:
        result["ok"] = result["ok"] and all(result["weight_grads"][name]["ok"] for name in WEIGHT_NAMES)
    del weight_grads
    if ours:
        result["vs_ours"] = {name: compare(mine, theirs, tol, reference.keep_T).to_json()
                             for name, mine, theirs in (("y", y_TD, ours[0]), ("dx", dx_TD, ours[1]))}
    elif ours is not None:
        ours += [y_TD.detach(), dx_TD]
    return result


def time_path(run: PeerRun, problem: Problem, opts: BenchOptions, entry: dict[str, Any], name: str = "ours") -> None:
    inputs = [problem.x_TD, *run.params]

    def fwd_bwd() -> None:
        torch.autograd.grad(run.forward(), inputs, problem.grad_y_TD, allow_unused=True)

    timing = opts.timing
    if name in LOOP_PATHS:
        timing = dataclasses.replace(timing, min_reps=min(timing.min_reps, LOOP_MIN_REPS))
    fwd = measure(run.forward, opts.device, timing)
    both = measure(fwd_bwd, opts.device, timing)
    shape: Shape = problem.shape
    entry.update(
        fwd_ms=fwd.median_ms, fwd_bwd_ms=both.median_ms,
        fwd_ms_p20_p80=[fwd.p20_ms, fwd.p80_ms], fwd_bwd_ms_p20_p80=[both.p20_ms, both.p80_ms],
        timed_runs={"fwd": fwd.reps, "fwd_bwd": both.reps},
        fwd_tflops=tflops(shape.flops_fwd, fwd.median_ms), fwd_bwd_tflops=tflops(shape.flops_fwd_bwd, both.median_ms),
        peak_mem_bytes=peak_memory_bytes(fwd_bwd, opts.device),
    )


def run_path(
    build: Callable[[Problem, PeerEnv], PeerRun], problem: Problem, reference: Reference, env: PeerEnv,
    opts: BenchOptions, ours: list[torch.Tensor] | None = None, name: str = "ours",
) -> dict[str, Any]:
    """Build, check and time one path (`name` in the report); whatever goes wrong is recorded in the
    entry, never raised.

    ours: see `check_agreement`.
    """
    entry = empty_entry()
    run = None
    try:
        run = build(problem, env)
        entry["notes"] = run.notes
        entry["agreement"] = check_agreement(run, problem, reference, ours)
        if not entry["agreement"]["ok"]:
            entry["status"] = "disagrees"
            return entry
        time_path(run, problem, opts, entry, name)
        entry["status"] = "ok"
    except PeerSkipped as reason:
        entry.update(status="skipped", skip_reason=str(reason))
    except Exception as err:  # noqa: BLE001 - one failing peer must not stop the others
        entry.update(status="error", error=describe_error(err))
    finally:
        del run
        free_memory(opts.device)
    return entry


def speedups(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Peer time / our time (above 1: ours is faster), for every timed peer."""
    ours = paths.get("ours", {})
    out = {}
    for name, entry in paths.items():
        if name == "ours":
            continue
        out[name] = {
            key: (entry[f"{key}_ms"] / ours[f"{key}_ms"]) if entry.get(f"{key}_ms") and ours.get(f"{key}_ms") else None
            for key in ("fwd", "fwd_bwd")
        }
    return out


def bench_case(shape: Shape, routing: str, opts: BenchOptions, env: PeerEnv) -> dict[str, Any]:
    problem = make_problem(shape, routing, opts.device, opts.seed)
    reference = compute_reference(problem)
    env.tokens_per_expert_E = reference.tokens_per_expert_E
    record: dict[str, Any] = {
        "shape": shape.name, "T": shape.T, "D": shape.D, "F": shape.F, "E": shape.E, "K": shape.K,
        "dtype": shape.dtype, "routing": routing, "activation": "swiglu",
        "flops_fwd": shape.flops_fwd, "flops_fwd_bwd": shape.flops_fwd_bwd,
        "load": reference.load_stats(), "tolerance": TOLERANCES[problem.dtype], "paths": {},
    }
    ours: list[torch.Tensor] = []  # ours fills it with its y and dx; the peers after it are compared with them
    for name in opts.peers:
        share = ours if name == "ours" or ours else None
        record["paths"][name] = run_path(BUILDERS[name], problem, reference, env, opts, share, name)
    record["ours_speedup"] = speedups(record["paths"])
    del problem, reference, ours
    free_memory(opts.device)
    return record


def format_case(record: dict[str, Any]) -> str:
    load = record["load"]
    title = (f"\nlayer {record['shape']} (T={record['T']} D={record['D']} F={record['F']} E={record['E']} "
             f"K={record['K']}) {record['dtype']} {record['routing']}: expert load max/mean "
             f"{load['max_over_mean']:.2f}, near-tie tokens {load['near_tie_tokens']}")
    rows = []
    for name, e in record["paths"].items():
        agreement = e["agreement"] or {}
        note = e["skip_reason"] or e["error"] or ""
        if e["notes"].get("drops_tokens"):
            note = f"drops {e['notes'].get('dropped_fraction', 0):.1%} of choices (cf=1); " + note
        speedup = record["ours_speedup"].get(name, {}).get("fwd_bwd")
        peak = e["peak_mem_bytes"] / 2**20 if e["peak_mem_bytes"] is not None else None
        rows.append([
            name, e["status"], e["fwd_ms"], e["fwd_bwd_ms"], e["fwd_tflops"], e["fwd_bwd_tflops"], peak,
            (agreement.get("y") or {}).get("max_rel"), (agreement.get("dx") or {}).get("max_rel"), speedup, note[:110],
        ])
    headers = ["path", "status", "fwd ms", "f+b ms", "fwd TF/s", "f+b TF/s", "peak MiB", "y rel err", "dx rel err",
               "ours x", "note"]
    legend = "ours x: the peer's fwd+bwd time / ours (above 1: ours is faster); rel err: max |out - ref| / max |ref|"
    return title + "\n" + format_table(headers, rows) + "\n" + legend


def run(opts: BenchOptions, copy_gbps: float, records: list[dict[str, Any]], save: Callable[[], None]) -> None:
    """Every (shape, routing) case in order: append its record, print its table, save the report."""
    needs_group = any(p in DISTRIBUTED_PEERS for p in opts.peers)
    session = distributed_session(opts.device) if needs_group else contextlib.nullcontext(PeerEnv(opts.device))
    with session as env:
        for shape in opts.shapes:
            for routing in opts.routings:
                record = bench_case(shape, routing, opts, env)
                records.append(record)
                say(format_case(record))
                save()


def main(argv: list[str] | None = None) -> int:
    from moe_engine.bench.suite import main as suite_main

    return suite_main(argv, benchmarks=("layer",), prog="benchmarks/moe_layer.py")
