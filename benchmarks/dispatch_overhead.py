"""Dispatch overhead at EP=1: how much of one MoE layer's forward+backward is the dispatch path.

    python benchmarks/dispatch_overhead.py OUT.json [--device auto] [--dtype bf16]
        [--shapes mixtral,olmoe,qwen3_30b_a3b] [--dispatchers local,all_to_all]

Per shape (T, D, F, E, K) and dispatcher, forward+backward timings of the same tokens and routing:
  layer     the whole MoELayer (router -> dispatch -> experts -> combine)
  router    the router alone (logits, fused top-k gating, aux loss)
  experts   the experts alone on the rows the dispatcher produced (same tokens_per_expert)
  dispatch  the dispatch path alone: expert order, permute (materialised), weighted combine and, for
            `all_to_all`, its count and row exchanges on a 1-rank group, with identity experts
`dispatch_share` = dispatch / layer; the issue's target on a GPU: < 10% of layer time. (The local
dispatcher's layer path fuses the gather into the experts, so there its true cost is lower.) Writes JSON (device, versions, date, shapes) and prints
a table. Runs on CPU too (small shapes with --shapes tiny), where the figures say little.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from moe_engine.bench.common import TimingSettings, device_info, format_table, measure, now, resolve_device, versions, write_json
from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.kernels.permute import GatheredRows
from moe_engine.layer import MoELayer
from moe_engine.parallel import AllToAllDispatcher, LocalDispatcher, build_parallel_groups

# (T, D, F, E, K), the bench suite's shapes (../shared/DESIGN.md) and a tiny CPU one.
SHAPES = {
    "mixtral": (8192, 4096, 14336, 8, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "qwen3_30b_a3b": (16384, 2048, 768, 128, 8),
    "deepseek_v3_ep4": (16384, 7168, 2048, 64, 8),
    "tiny": (512, 64, 128, 8, 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _one_rank_group(device: torch.device) -> dist.ProcessGroup:
    """A 1-rank process group, so the all-to-all dispatcher runs its full path at EP=1."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return build_parallel_groups(1, 1).ep_group


def _measure_shape(name: str, dispatcher_name: str, device: torch.device, dtype: torch.dtype, timing: TimingSettings) -> dict:
    T, D, F, E, K = SHAPES[name]
    cfg = MoEConfig(num_experts=E, ffn_hidden=F, router=RouterConfig(top_k=K, z_loss_coef=0.0))
    dispatcher = (
        LocalDispatcher(E, fuse_gather=True) if dispatcher_name == "local" else AllToAllDispatcher(E, _one_rank_group(device))
    )
    torch.manual_seed(0)
    layer = MoELayer.from_config(D, cfg, dispatcher).to(device=device, dtype=dtype)
    layer.router.float()  # routing decisions stay in fp32 (the router casts its input)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(T, D, device=device, dtype=dtype)

    def whole():
        layer(x).y.backward(grad_y)

    def router_only():
        routing = layer.router(x)
        (routing.weights_TK.sum() + routing.aux_loss).backward()

    with torch.no_grad():
        rows, tokens_per_expert_E, _ = dispatcher.dispatch(x, layer.router(x))
    rows_ND = (rows.materialize() if isinstance(rows, GatheredRows) else rows).detach().requires_grad_()
    grad_rows = torch.randn_like(rows_ND)

    def experts_only():
        layer.experts(rows_ND, tokens_per_expert_E).backward(grad_rows)

    with torch.no_grad():
        fixed = layer.router(x)
    routing = replace(fixed, weights_TK=fixed.weights_TK.clone().requires_grad_())

    def dispatch_only():
        rows, _, meta = dispatcher.dispatch(x, routing)
        rows = rows.materialize() if isinstance(rows, GatheredRows) else rows
        dispatcher.combine(rows, meta).backward(grad_y)

    layer_ms = measure(whole, device, timing).median_ms
    router_ms = measure(router_only, device, timing).median_ms
    experts_ms = measure(experts_only, device, timing).median_ms
    dispatch_ms = measure(dispatch_only, device, timing).median_ms
    return {
        "shape": name, "T": T, "D": D, "F": F, "E": E, "K": K, "dispatcher": dispatcher_name,
        "experts_impl": layer.experts.resolve_impl(device, dtype),
        "layer_ms": layer_ms, "router_ms": router_ms, "experts_ms": experts_ms,
        "dispatch_ms": dispatch_ms, "dispatch_share": dispatch_ms / layer_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--shapes", default=None, help=f"comma-separated of {', '.join(SHAPES)} (default: GPU shapes on CUDA, tiny on CPU)")
    parser.add_argument("--dispatchers", default="local,all_to_all")
    parser.add_argument("--reps", type=int, default=5,
                        help="timed calls on CPU (CUDA: at least 10, as many as fit 100 ms; see moe_engine.bench.common)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shapes = (args.shapes or ("mixtral,olmoe,qwen3_30b_a3b" if device.type == "cuda" else "tiny")).split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes {','.join(unknown)}: allowed: {', '.join(SHAPES)}")
    dispatchers = args.dispatchers.split(",")
    if any(d not in ("local", "all_to_all") for d in dispatchers):
        parser.error(f"--dispatchers {args.dispatchers}: allowed: local, all_to_all")
    timing = TimingSettings(reps=args.reps)
    records = []
    report = {
        "schema": "moe_engine.bench/dispatch_overhead/1",
        "date": now().isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": versions(),
        "dtype": str(dtype).removeprefix("torch."),
        "results": records,
        "complete": False,
    }
    for shape in shapes:
        for name in dispatchers:
            records.append(_measure_shape(shape, name, device, dtype, timing))
            print(f"{shape} {name}: dispatch {records[-1]['dispatch_share']:.1%} of the layer", flush=True)
            write_json(report, args.out)  # after every record: a run cut short keeps what it measured
    report["complete"] = True
    write_json(report, args.out)
    rows = [[r["shape"], r["dispatcher"], r["layer_ms"], r["router_ms"], r["experts_ms"], r["dispatch_ms"], r["dispatch_share"]]
            for r in records]
    print(format_table(["shape", "dispatcher", "layer ms", "router ms", "experts ms", "dispatch ms", "share"], rows))
    print(f"wrote {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
