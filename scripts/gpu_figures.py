"""The GPU figures of scripts/gpu_checks.sh in one process: `moe-engine bench`, then the dispatch overhead.

    python scripts/gpu_figures.py OUT_DIR [--dispatch-shapes mixtral,olmoe,qwen3_30b_a3b] [bench options ...]

Writes OUT_DIR/bench.json (+ bench.png) and OUT_DIR/dispatch.json; any other option goes to
`moe-engine bench` (e.g. --shapes, --routing, --quick, --only). One process because Triton's autotuner
remembers its choices per process only (the grouped GEMM's configs carry a pre-hook, so triton does
not cache them on disk): the dispatch-overhead layers, of the benchmark's shapes, then run on the
configs the benchmark tuned instead of tuning again, which a short GPU session cannot afford. Both
JSON files are rewritten after every record, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for bench.json, bench.png and dispatch.json")
    parser.add_argument("--dispatch-shapes", default=None,
                        help="shapes of benchmarks/dispatch_overhead.py (default: its own; 'none' skips it)")
    args, bench_args = parser.parse_known_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import dispatch_overhead

    from moe_engine.bench.suite import main as bench

    args.out_dir.mkdir(parents=True, exist_ok=True)
    code = bench([*bench_args, "--out", str(args.out_dir / "bench.json")])
    print(f"bench exit status {code}", flush=True)
    if args.dispatch_shapes == "none":
        return code
    dispatch_args = [str(args.out_dir / "dispatch.json")]
    if args.dispatch_shapes:
        dispatch_args += ["--shapes", args.dispatch_shapes]
    return dispatch_overhead.main(dispatch_args) or code


if __name__ == "__main__":
    sys.exit(main())
