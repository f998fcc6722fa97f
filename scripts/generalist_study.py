"""The generalist's multi-task study: single-task baselines, then one pre-training run per loss
weighting method, each reported against the baselines as Delta_p; prints a Markdown table.

    python scripts/generalist_study.py --steps 800 --methods equal,uncertainty,dwa,pcgrad,nash_mtl

Every run is `moe-engine` itself (baselines, then train --baselines) on configs/generalist_pretrain.yaml
with the same steps, so the numbers come from the same commands a user runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _cli(*args: str) -> None:
    command = [sys.executable, "-m", "moe_engine.cli", *args]
    print("$ moe-engine " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/generalist_pretrain.yaml")
    parser.add_argument("--steps", type=int, default=800, help="training steps of every run (baselines included)")
    parser.add_argument("--methods", default="equal,uncertainty,dwa,pcgrad,nash_mtl")
    parser.add_argument("--out", default="runs/study", help="folder of the runs and of study.json")
    parser.add_argument("--threads", type=int, default=None, help="train.num_threads of every run")
    parser.add_argument("--skip-baselines", action="store_true", help="reuse OUT/baselines.json")
    args = parser.parse_args()
    out = Path(args.out)
    common = ["--config", args.config, "--set", f"train.max_steps={args.steps}", "--set", f"train.eval_every={args.steps}",
              "--set", f"train.checkpoint_every={args.steps}", "--set", "logging.progress_bar=false"]
    if args.threads:
        common += ["--set", f"train.num_threads={args.threads}"]
    baselines = out / "baselines.json"
    if not args.skip_baselines:
        _cli("baselines", *common, "--set", f"train.out_dir={out / 'single'}", "--out", str(baselines))
    rows = {}
    for method in args.methods.split(","):
        run = out / method
        _cli("train", *common, "--set", f"mtl.weighting={method}", "--set", f"train.out_dir={run}",
             "--baselines", str(baselines), "--overwrite")
        report = json.loads((run / "results.json").read_text())
        rows[method] = {"results": report["results"], "delta_p": report["delta_p"], "seconds": report["wall_seconds"]}
    single = json.loads(baselines.read_text())["results"]
    (out / "study.json").write_text(json.dumps({"baselines": single, "methods": rows, "steps": args.steps}, indent=2))
    tasks = list(single)
    header = "| weighting | " + " | ".join(f"{t} ({next(iter(single[t]))})" for t in tasks) + " | Delta_p | time |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    lines.append("| single-task | " + " | ".join(f"{next(iter(single[t].values())):.3f}" for t in tasks) + " | 0 | |")
    for method, row in rows.items():
        cells = " | ".join(f"{next(iter(row['results'][t].values())):.3f}" for t in tasks)
        lines.append(f"| {method} | {cells} | {row['delta_p']:+.1f} % | {row['seconds']:.0f} s |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
