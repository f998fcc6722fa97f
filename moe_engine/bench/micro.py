"""The runner the data-movement micro-benchmarks share (router, permute/unpermute).

An op has a byte count (useful bytes read + written) and several paths; each path is a builder
returning a `MicroPath`: run() -> named outputs, and which output fwd+bwd differentiates with
respect to which inputs. Every path's outputs are compared with the reference outputs (integer
outputs exactly, on the kept rows; float outputs within the dtype's tolerance) before it is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from moe_engine.bench.common import (
    TOLERANCES,
    BenchOptions,
    compare,
    describe_error,
    format_table,
    free_memory,
    gbps,
    measure,
    say,
)
from moe_engine.bench.peers import PeerSkipped


@dataclass(frozen=True)
class MicroPath:
    """run() -> {name: tensor}. grad_output: the output fwd+bwd backpropagates (None: forward only).
    canonical: maps run()'s outputs to the form they are compared in (e.g. each token's choices
    sorted by expert), applied to the checked outputs only, never inside the timed runs."""

    run: Callable[[], dict[str, torch.Tensor]]
    grad_output: str | None = None
    grad_inputs: tuple[torch.Tensor, ...] = ()
    canonical: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


def check_outputs(
    outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], keep_rows: torch.Tensor | None
) -> dict[str, Any]:
    """Per output: integer tensors must be equal on the kept rows; floats within TOLERANCES[dtype]."""
    result: dict[str, Any] = {}
    ok = True
    for name, ref in reference.items():
        out = outputs.get(name)
        if out is None or out.shape != ref.shape:
            result[name] = {"ok": False, "error": f"missing or shape {None if out is None else tuple(out.shape)}"}
            ok = False
            continue
        keep = keep_rows if keep_rows is not None and keep_rows.shape[0] == ref.shape[0] else None
        if ref.dtype.is_floating_point:
            agreement = compare(out.float(), ref.float(), TOLERANCES.get(ref.dtype, 1e-4), keep).to_json()
        else:
            differs = (out.to(ref.device) != ref).reshape(ref.shape[0], -1).any(dim=1)
            if keep is not None:
                differs = differs & keep
            agreement = {"mismatched_rows": int(differs.sum()), "ok": not bool(differs.any())}
        result[name] = agreement
        ok = ok and agreement["ok"]
    result["ok"] = ok
    return result


def run_micro_path(
    build: Callable[[], MicroPath], reference: dict[str, torch.Tensor], keep_rows: torch.Tensor | None,
    nbytes: int, copy_gbps: float, opts: BenchOptions,
) -> dict[str, Any]:
    """Build, check, time one path; GB/s counts the op's useful bytes over the forward median."""
    entry: dict[str, Any] = {"status": None, "fwd_ms": None, "fwd_bwd_ms": None, "timed_runs": None, "gbps": None,
                             "copy_bw_fraction": None, "agreement": None, "skip_reason": None, "error": None}
    path = None
    try:
        path = build()
        outputs = path.run()
        entry["agreement"] = check_outputs(path.canonical(outputs) if path.canonical else outputs, reference, keep_rows)
        del outputs
        if not entry["agreement"]["ok"]:
            entry["status"] = "disagrees"
            return entry
        fwd = measure(path.run, opts.device, opts.timing)
        entry.update(fwd_ms=fwd.median_ms, gbps=gbps(nbytes, fwd.median_ms), timed_runs={"fwd": fwd.reps})
        entry["copy_bw_fraction"] = entry["gbps"] / copy_gbps if copy_gbps else None
        if path.grad_output is not None:
            out = path.run()[path.grad_output]
            grad = torch.randn_like(out)
            del out

            def fwd_bwd() -> None:
                torch.autograd.grad(path.run()[path.grad_output], path.grad_inputs, grad, allow_unused=True)

            both = measure(fwd_bwd, opts.device, opts.timing)
            entry["fwd_bwd_ms"], entry["timed_runs"]["fwd_bwd"] = both.median_ms, both.reps
        entry["status"] = "ok"
    except PeerSkipped as reason:
        entry.update(status="skipped", skip_reason=str(reason))
    except Exception as err:  # noqa: BLE001 - one failing path must not stop the others
        entry.update(status="error", error=describe_error(err))
    finally:
        del path
        free_memory(opts.device, collect=False)  # plain tensors and our ops: no cycles to collect
    return entry


def run_op(
    paths: dict[str, Callable[[], MicroPath]], reference: dict[str, torch.Tensor], keep_rows: torch.Tensor | None,
    nbytes: int, copy_gbps: float, opts: BenchOptions, bytes_counted: str,
) -> dict[str, Any]:
    record = {"bytes": nbytes, "bytes_counted": bytes_counted, "paths": {}}
    for name, build in paths.items():
        record["paths"][name] = run_micro_path(build, reference, keep_rows, nbytes, copy_gbps, opts)
    ours = next((e for n, e in record["paths"].items() if n.startswith("ours") and e["fwd_ms"]), None)
    record["ours_speedup"] = {
        name: (e["fwd_ms"] / ours["fwd_ms"]) if ours and e["fwd_ms"] else None
        for name, e in record["paths"].items() if not name.startswith("ours")
    }
    return record


def format_micro_case(kind: str, record: dict[str, Any]) -> str:
    title = (f"\n{kind} {record['shape']} (T={record['T']} D={record['D']} E={record['E']} K={record['K']}) "
             f"{record['dtype']} {record['routing']}")
    rows = []
    for op, op_record in record["ops"].items():
        for name, e in op_record["paths"].items():
            note = e["skip_reason"] or e["error"] or ""
            rows.append([op, name, e["status"], e["fwd_ms"], e["fwd_bwd_ms"], e["gbps"], e["copy_bw_fraction"],
                         op_record["ours_speedup"].get(name), note[:100]])
    headers = ["op", "path", "status", "fwd ms", "f+b ms", "GB/s", "of copy bw", "ours x", "note"]
    legend = "GB/s: useful bytes read + written / fwd median; ours x: the peer's fwd time / ours"
    return title + "\n" + format_table(headers, rows) + "\n" + legend


def run_cases(
    kind: str,
    bench_case: Callable[..., dict[str, Any]],
    opts: BenchOptions,
    copy_gbps: float,
    records: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """Every (shape, routing) case of one micro-benchmark in order: append its record, print it, save the report."""
    for shape in opts.shapes:
        for routing in opts.routings:
            record = bench_case(shape, routing, opts, copy_gbps)
            records.append(record)
            say(format_micro_case(kind, record))
            save()
