"""What an MoE layer keeps for its backward, at any shape, on CPU, without computing anything.

Each path's forward runs under `FakeTensorMode` (tensors with shapes and dtypes, no storage; the
Triton ops run their fake kernels; a `ShapeEnv` makes data-dependent sizes, such as a bincount's,
symbolic). A `saved_tensors_hooks` pack hook sees every tensor autograd keeps; the distinct storages
among them, less the storages of the input and the parameters (alive anyway), are the layer's saved
activations: between its forward and its backward they are what each layer of a model adds to
the peak. The paths:

- `ours`: moe_engine's MoELayer on its Triton kernels (router, fused-gather grouped MLP and combine);
- `ours_recompute`: the same with `moe.recompute_experts` (no up-projection output h kept: the
  backward recomputes it with one more GEMM);
- `grouped_mm`: the benchmark's `torch._grouped_mm` peer (`moe_engine.bench.peers.grouped_mm_moe_forward`).

Run: `python benchmarks/saved_activations.py [--shapes NAMES] [--out PATH]` (sets TRITON_INTERPRET=1
itself so the Triton path is the one traced). The GPU's `peak_memory_mb` in `moe-engine bench` is the
measured counterpart (it adds the transient buffers of the forward and the backward).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_engine.bench.problem import Shape, find_shapes

PATHS = ("ours", "ours_recompute", "grouped_mm")


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def saved_bytes(forward: Callable[[], Any], alive: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes, symbolic): the distinct storages autograd saves while `forward()` runs, less those of `alive`.

    symbolic counts saved storages whose size is data-dependent (left out of bytes; under a fake mode
    they are routing metadata such as per-expert counts, a few bytes per expert).
    """
    skip = {_storage_key(t) for t in alive}
    sizes: dict[int, int | None] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and key not in sizes:
            sizes[key] = _concrete(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(v for v in sizes.values() if v is not None), sum(v is None for v in sizes.values())


def _concrete(value: Any) -> int | None:
    """value as an int, or None for an unbacked SymInt (a data-dependent size)."""
    try:
        return int(value)
    except Exception:
        return None


def _build_ours(shape: Shape, recompute: bool = False) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """(forward, tensors alive anyway) of moe_engine's layer at `shape` (call under the fake mode)."""
    from moe_engine.config import MoEConfig, RouterConfig
    from moe_engine.layer import MoELayer

    cfg = MoEConfig(num_experts=shape.E, ffn_hidden=shape.F, experts_impl="triton", router=RouterConfig(top_k=shape.K),
                    recompute_experts=recompute)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(shape.torch_dtype)  # parameters made in the dtype (a fake module cannot be cast)
    try:
        layer = MoELayer.from_config(shape.D, cfg)
    finally:
        torch.set_default_dtype(previous)
    x = torch.empty(shape.T, shape.D, dtype=shape.torch_dtype).requires_grad_()
    return (lambda: layer(x).y), [x, *layer.parameters()]


def _build_grouped_mm(shape: Shape) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """(forward, tensors alive anyway) of the benchmark's torch._grouped_mm peer at `shape`."""
    from moe_engine.bench.peers import grouped_mm_moe_forward

    def leaf(*size: int) -> torch.Tensor:
        return torch.empty(*size, dtype=shape.torch_dtype).requires_grad_()

    x, router = leaf(shape.T, shape.D), leaf(shape.E, shape.D)
    w_in, w_out = leaf(shape.E, 2 * shape.F, shape.D), leaf(shape.E, shape.D, shape.F)
    return (lambda: grouped_mm_moe_forward(x, router, w_in, w_out, shape.K)), [x, router, w_in, w_out]


def measure(shape: Shape, path: str) -> dict[str, Any]:
    """{"bytes": saved activation bytes, "symbolic": storages of data-dependent size} of one path at `shape`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if path not in PATHS:
        raise ValueError(f"path = {path!r}: allowed: {', '.join(PATHS)}")
    ours = path.startswith("ours")
    if ours and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("tracing the Triton path on CPU needs TRITON_INTERPRET=1 set before triton is imported "
                           "(benchmarks/saved_activations.py sets it)")
    build = {"ours": _build_ours, "ours_recompute": lambda s: _build_ours(s, recompute=True),
             "grouped_mm": _build_grouped_mm}[path]
    previous = os.environ.get("MOE_ENGINE_KERNELS")
    os.environ["MOE_ENGINE_KERNELS"] = "triton" if ours else "torch"
    try:
        with FakeTensorMode(shape_env=ShapeEnv()):
            forward, alive = build(shape)
            nbytes, symbolic = saved_bytes(forward, alive)
    finally:
        if previous is None:
            os.environ.pop("MOE_ENGINE_KERNELS", None)
        else:
            os.environ["MOE_ENGINE_KERNELS"] = previous
    return {"bytes": nbytes, "symbolic": symbolic}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: the five published layers)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    shapes = find_shapes(args.shapes, quick=False)
    rows = []
    print(f"{'shape':<18} {'ours MiB':>10} {'recompute MiB':>14} {'grouped_mm MiB':>15} {'ours / grouped_mm':>18}")
    for shape in shapes:
        result = {path: measure(shape, path) for path in PATHS}
        ratio = result["ours"]["bytes"] / max(1, result["grouped_mm"]["bytes"])
        rows.append({"shape": shape.name, "T": shape.T, "D": shape.D, "F": shape.F, "E": shape.E, "K": shape.K,
                     "dtype": shape.dtype, **{f"{p}_bytes": result[p]["bytes"] for p in PATHS},
                     "ours_over_grouped_mm": ratio})
        mib = {p: result[p]["bytes"] / 2**20 for p in PATHS}
        print(f"{shape.name:<18} {mib['ours']:>10.0f} {mib['ours_recompute']:>14.0f} {mib['grouped_mm']:>15.0f} "
              f"{ratio:>18.2f}", flush=True)
    if args.out:
        report = {"what": "activation bytes saved for the backward per layer (FakeTensorMode trace, no GPU)",
                  "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
