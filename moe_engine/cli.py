"""`moe-engine`: the command line.

    moe-engine train [--config PATH] [--set a.b.c=VALUE ...] [--resume [CHECKPOINT]] [--overwrite]
    moe-engine config [--config PATH] [--set ...]      print the resolved config as YAML
    moe-engine bench [--quick] [--shapes ...] [--routing ...] [--out PATH]   benchmark vs peers

Errors a user can fix (a config value, a checkpoint that does not fit, a run directory in use)
print one line naming the problem and exit with status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from moe_engine.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from moe_engine.train import Trainer, TrainResult


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML run config (default: the embedded default job)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config field, e.g. --set moe.num_experts=16 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-engine", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the multi-task MoE model")
    _add_config_args(train)
    train.add_argument(
        "--resume", nargs="?", const="auto", metavar="CHECKPOINT",
        help="continue from a checkpoint file or run directory; alone: the newest in train.out_dir, if any",
    )
    train.add_argument("--overwrite", action="store_true", help="start over in a train.out_dir that holds checkpoints")
    train.add_argument(
        "--deepspeed_config", "--deepspeed-config", metavar="JSON",
        help="train under DeepSpeed's engine with this config (same as --set parallel.deepspeed_config=JSON)",
    )
    # The deepspeed launcher passes --local_rank to every rank; LOCAL_RANK in the environment says the same.
    train.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    show = commands.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    from moe_engine.mtl.mmoe_experiment import DESCRIPTION as MMOE_DESCRIPTION, add_arguments as add_mmoe_arguments

    mmoe = commands.add_parser("mmoe-synthetic", help="MMoE vs OMoE vs shared-bottom on the MMoE paper's synthetic tasks",
                               description=MMOE_DESCRIPTION)
    add_mmoe_arguments(mmoe)
    bench = commands.add_parser("bench", help="benchmark our MoE layer and kernels against their peers")
    from moe_engine.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    return parser


def _task_expert_lines(task_names: list[str], counts_LXE) -> list[str]:
    """Which experts each task's test tokens went to (share of its choices), per MoE layer: how a
    task-conditional router has split the experts among the tasks."""
    lines = ["\nexperts each task uses on the test split (expert:share of the task's choices)"]
    for layer, counts_XE in enumerate(counts_LXE.tolist()):
        for name, counts_E in zip(task_names, counts_XE):
            total = max(sum(counts_E), 1)
            used = [(e, c / total) for e, c in enumerate(counts_E) if c]
            cells = " ".join(f"{e}:{share:.0%}" for e, share in used)
            lines.append(f"moe layer {layer} {name:<8} {len(used)} experts  {cells}")
    return lines


def format_report(cfg: Config, trainer: Trainer, result: TrainResult) -> str:
    """The end-of-run summary: per-task results against chance, tokens per expert, where files went."""
    ranks = f" x {trainer.run_info.world_size} ranks" if trainer.run_info.world_size > 1 else ""
    lines = [f"\ntrained {result.step} steps in {result.wall_seconds:.1f} s on {trainer.device}{ranks}"]
    lines.append(f"{'task':<8} {'metric':<9} {'result':>7} {'chance':>7}  description")
    for spec in trainer.data.tasks:
        acc = result.eval_metrics[f"accuracy_{spec.name}"]
        lines.append(f"{spec.name:<8} {'accuracy':<9} {acc:>7.3f} {spec.chance:>7.3f}  {spec.description}")
    counts_LE = result.tokens_per_expert_LE
    lines.append(f"\ntokens per expert on the test split (top-{cfg.moe.router.top_k} choices, {cfg.moe.num_experts} experts)")
    for layer, counts_E in enumerate(counts_LE.tolist()):
        total = max(sum(counts_E), 1)
        imbalance = max(counts_E) / (total / len(counts_E))
        cells = " ".join(f"{c:>6}" for c in counts_E)
        lines.append(f"moe layer {layer}: {cells}   max/mean {imbalance:.2f}")
    if cfg.moe.router.type not in ("softmax_topk", "sigmoid_topk", "noisy_topk"):
        lines.extend(_task_expert_lines(trainer.data.task_names, result.tokens_per_task_expert_LXE))
    outputs = "train.csv, eval.csv, tensorboard/, checkpoints/, results.json"
    if cfg.logging.routing_telemetry and counts_LE.numel():
        outputs += ", routing.csv, routing/ (task x expert heatmaps)"
    lines.append(f"\nrun directory: {trainer.out_dir} ({outputs})")
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> int:
    from moe_engine.checkpoint import CheckpointMismatchError
    from moe_engine.parallel.deepspeed_engine import DeepSpeedConfigError
    from moe_engine.parallel.runtime import shutdown_distributed
    from moe_engine.train import NonFiniteLossError, RunDirectoryError, Trainer, TrainingInterrupted

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"parallel.deepspeed_config={args.deepspeed_config}")
    cfg = load_config(args.config, overrides)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except (CheckpointMismatchError, RunDirectoryError, FileNotFoundError, DeepSpeedConfigError) as err:
        print(f"moe-engine train: error: {err}", file=sys.stderr)
        return 2
    main_rank = trainer.run_info.is_main  # under a launcher, rank 0 speaks for the job
    try:
        if trainer.step and main_rank:
            print(f"resuming from {trainer.last_checkpoint} at step {trainer.step}", file=sys.stderr)
        try:
            result = trainer.run()
        except TrainingInterrupted as err:
            if main_rank:
                print(f"moe-engine train: {err}", file=sys.stderr)
            return 128 + err.signum
        except NonFiniteLossError as err:
            if main_rank:
                print(f"moe-engine train: error: {err}", file=sys.stderr)
            return 1
        if main_rank:
            report = {
                "step": result.step,
                "wall_seconds": result.wall_seconds,
                "eval": result.eval_metrics,
                "chance": {t.name: t.chance for t in trainer.data.tasks},
                "tokens_per_expert": result.tokens_per_expert_LE.tolist(),
                "tokens_per_task_expert": result.tokens_per_task_expert_LXE.tolist(),
                "checkpoint": str(result.checkpoint),
                "world_size": trainer.run_info.world_size,
            }
            (trainer.out_dir / "results.json").write_text(json.dumps(report, indent=2))
            print(format_report(cfg, trainer, result))
        return 0
    finally:
        shutdown_distributed(trainer.run_info)


def _bench(args: argparse.Namespace) -> int:
    from moe_engine.bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "mmoe-synthetic":
            from moe_engine.mtl.mmoe_experiment import run_from_args

            return run_from_args(args)
        if args.command == "config":
            print(load_config(args.config, args.overrides).to_yaml(), end="")
            return 0
        return _train(args)
    except ConfigError as err:
        print(f"moe-engine {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
