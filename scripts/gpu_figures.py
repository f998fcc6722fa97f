"""The GPU figures of scripts/gpu_checks.sh in one process: the micro-benchmarks, the dispatch overhead, the layer.

    python scripts/gpu_figures.py OUT_DIR [--dispatch-shapes mixtral,olmoe,qwen3_30b_a3b] [bench options ...]

Writes, in this order, OUT_DIR/micro.json (`moe-engine bench --only router,permute`),
OUT_DIR/dispatch.json (benchmarks/dispatch_overhead.py) and OUT_DIR/bench.json + bench.png
(`moe-engine bench --only layer`); any other option goes to both `moe-engine bench` calls (e.g.
--shapes, --routing, --peers, --quick). Cheapest first: a time limit that cuts the run short takes
the layer's last shapes, not the router, permute and dispatch figures. One process because Triton's
autotuner remembers its choices per process only (the grouped GEMM's configs carry a pre-hook, so
triton does not cache them on disk): the layer benchmark then runs on the configs the dispatch
overhead's layers tuned at its shapes instead of tuning them again, which a short GPU session cannot
afford. Every JSON file is rewritten after every record, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for micro.json, dispatch.json, bench.json and bench.png")
    parser.add_argument("--dispatch-shapes", default=None,
                        help="shapes of benchmarks/dispatch_overhead.py (default: its own; 'none' skips it)")
    args, bench_args = parser.parse_known_args(argv)
    if "--only" in bench_args or any(a.startswith("--only=") for a in bench_args):
        parser.error("--only: this script runs router,permute then layer itself; run `moe-engine bench --only ...` instead")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import dispatch_overhead

    from moe_engine.bench.suite import main as bench

    args.out_dir.mkdir(parents=True, exist_ok=True)
    codes = [_stage("micro-benchmarks", lambda: bench([*bench_args, "--only", "router,permute", "--out",
                                                       str(args.out_dir / "micro.json")]))]
    if args.dispatch_shapes != "none":
        dispatch_args = [str(args.out_dir / "dispatch.json")]
        if args.dispatch_shapes:
            dispatch_args += ["--shapes", args.dispatch_shapes]
        codes.append(_stage("dispatch overhead", lambda: dispatch_overhead.main(dispatch_args)))
    codes.append(_stage("layer benchmark", lambda: bench([*bench_args, "--only", "layer", "--out",
                                                          str(args.out_dir / "bench.json")])))
    return next((code for code in codes if code), 0)


def _stage(name: str, run: Callable[[], int | None]) -> int:
    """run() -> its exit status; whatever it raises (an out-of-memory error, a SystemExit from an
    argument parser) is printed and counts as status 1, so the later stages still run."""
    try:
        code = run() or 0
    except BaseException as err:  # noqa: BLE001 - a failed stage must not cost the others their figures
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc()
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) and err.code else 1
    print(f"{name} exit status {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
