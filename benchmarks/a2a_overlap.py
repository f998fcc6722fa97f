"""All-to-all overlap: one MoE layer's forward+backward under expert parallelism, the exchanges in
1, 2 or 4 chunks (`AllToAllDispatcher(num_chunks=n).dispatch_compute_combine`).

    python benchmarks/a2a_overlap.py OUT.json [--ranks 2 4] [--chunks 1 2 4] [--tokens 4096]
        [--d-model 256] [--ffn 512] [--experts 8] [--top-k 2] [--reps 5] [--threads N]

CPU ranks on gloo, EP = number of ranks, fp32, T tokens per rank, dropless top-k routing. Per
(ranks, chunks): the median over `reps` steps of the slowest rank's router + dispatch + experts +
combine forward and backward, and the all-to-all wait time (what TrafficMeter counts: the time the
step waited for exchanges, so overlap shows as a smaller number), mean over ranks. Writes OUT.json
and prints a table.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_engine.bench.common import device_info, format_table, now, versions, write_json
from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.layer import MoELayer
from moe_engine.parallel import AllToAllDispatcher, build_parallel_groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, threads: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(threads)
        groups = build_parallel_groups(world, args.experts)
        cfg = MoEConfig(
            num_experts=args.experts, ffn_hidden=args.ffn,
            router=RouterConfig(top_k=args.top_k, aux_loss_coef=0.0, z_loss_coef=0.0),
        )
        torch.manual_seed(0)
        layer = MoELayer.from_config(args.d_model, cfg, AllToAllDispatcher(args.experts, groups.ep_group))
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.tokens, args.d_model, generator=g).requires_grad_()
        grad_y = torch.randn(args.tokens, args.d_model, generator=g)
        impl = layer.experts.resolve_impl(x.device, x.dtype)
        for num_chunks in args.chunks:
            dispatcher = AllToAllDispatcher(args.experts, groups.ep_group, num_chunks=num_chunks)
            step_ms, wait_ms = [], []
            for step in range(args.warmup + args.reps):
                dist.barrier()
                start = time.perf_counter()
                y, _ = dispatcher.dispatch_compute_combine(x, layer.router(x, None), layer.experts)
                y.backward(grad_y)
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
                waited = torch.tensor([dispatcher.traffic.read_and_reset()["seconds"]])
                dist.all_reduce(waited)
                x.grad = None
                layer.zero_grad(set_to_none=True)
                if step >= args.warmup:
                    step_ms.append(1e3 * float(elapsed))
                    wait_ms.append(1e3 * float(waited) / world)
            if rank == 0:
                results.put({
                    "ranks": world, "num_chunks": num_chunks, "threads_per_rank": threads, "experts_impl": impl,
                    "fwd_bwd_ms": statistics.median(step_ms), "fwd_bwd_ms_all": step_ms,
                    "a2a_wait_ms": statistics.median(wait_ms),
                })
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the JSON results")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores // ranks)")
    args = parser.parse_args(argv)

    records = []
    for world in args.ranks:
        threads = args.threads or max(1, (os.cpu_count() or 1) // world)
        results = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_rank, args=(world, _free_port(), args, threads, results), nprocs=world, join=True)
        while not results.empty():
            records.append(results.get())
    for record in records:
        base = next(r for r in records if r["ranks"] == record["ranks"] and r["num_chunks"] == 1)
        record["speedup_vs_1"] = base["fwd_bwd_ms"] / record["fwd_bwd_ms"] if 1 in args.chunks else None
    report = {
        "schema": "moe_engine.bench/a2a_overlap/1",
        "date": now().isoformat(timespec="seconds"),
        "device": device_info(torch.device("cpu")),
        "versions": versions(),
        "backend": "gloo",
        "dtype": "float32",
        "shape": {"tokens_per_rank": args.tokens, "d_model": args.d_model, "ffn_hidden": args.ffn,
                  "experts": args.experts, "top_k": args.top_k},
        "results": records,
    }
    write_json(report, args.out)
    rows = [[r["ranks"], r["num_chunks"], r["threads_per_rank"], r["fwd_bwd_ms"], r["a2a_wait_ms"], r["speedup_vs_1"]]
            for r in records]
    print(format_table(["ranks", "chunks", "threads/rank", "fwd+bwd ms", "a2a wait ms", "speedup"], rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
