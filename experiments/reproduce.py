"""``python -m experiments.reproduce``: accuracy against parameter cost on the offline benchmark.

Trains, one after the other and seeded, the feature extractor, full fine-tuning, incremental
TAPS at lambda 0.25 / 0.5 / 0.75, joint TAPS, memory-efficient TAPS, joint (multi-task)
fine-tuning and progressive task-specific adapters on the embedded digit
domains (``python -m experiments.fit`` defaults otherwise), tests each best checkpoint and
writes ``docs/results.md`` in the layout of the paper's Tables 1 and 5, with the paper's own
numbers quoted for reference. ``--seeds 0 1 2`` trains every row once per seed and reports the
mean and the standard deviation over seeds. ``--quick`` runs a tiny version (for the tests).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from callbacks import ResultsReport

#: (label, extra flags) of every row.
VARIANTS = [
    ("Feature extractor", ["--model.mode", "linear"]),
    ("Fine-tuning", ["--model.mode", "finetune"]),
    ("TAPS incremental, lambda=0.25", ["--model.mode", "incremental", "--model.lam", "0.25"]),
    ("TAPS incremental, lambda=0.5", ["--model.mode", "incremental", "--model.lam", "0.5"]),
    ("TAPS incremental, lambda=0.75", ["--model.mode", "incremental", "--model.lam", "0.75"]),
    ("TAPS joint, lambda=0.5", ["--model.mode", "joint", "--model.lam", "0.5"]),
    ("TAPS memory-efficient, lambda=0.5", ["--model.mode", "memory_efficient", "--model.lam", "0.5",
                                           "--model.joint_epochs", "2", "--model.sparsity_warmup_epochs", "0"]),
    ("Joint fine-tuning", ["--model.mode", "joint_finetune"]),
    ("Progressive adapters (rank 8)", ["--model.mode", "progressive"]),
]
QUICK = ["--trainer.max_epochs", "1", "--data.init_args.max_train_per_task", "32", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--model.joint_epochs", "0"]

PAPER = """Paper, for reference (real benchmarks, ResNet-50 / ResNet-34 at 224 px; not comparable in value):

| Table 1 (ImageNet-to-Sketch, ResNet-50) | Params | Flowers | WikiArt | Sketch | Cars | CUB |
|---|---:|---:|---:|---:|---:|---:|
| Fine-Tuning | 6x | 95.73 | 78.02 | 81.83 | 91.89 | 83.61 |
| Feature Extractor | 1x | 89.14 | 61.74 | 65.90 | 55.52 | 63.46 |
| TAPS | 4.12x | 96.68 | 76.94 | 80.74 | 89.76 | 82.65 |

| Table 5 (DomainNet, ResNet-34) | Params | Real | Painting | Quickdraw | Clipart | Infograph | Sketch | Mean |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| Joint fine-tuning | 1x | 75.01 | 66.13 | 54.72 | 75.00 | 36.35 | 65.55 | 62.12 |
| Joint TAPS | 1.46x | 78.91 | 67.91 | 70.18 | 76.98 | 39.30 | 67.81 | 66.84 |
| Incremental fine-tuning | 6x | 81.51 | 69.90 | 73.17 | 74.08 | 40.38 | 67.39 | 67.73 |
| Incremental TAPS | 4.90x | 80.28 | 67.28 | 71.79 | 74.85 | 38.21 | 66.66 | 66.51 |
"""


def run_variant(extra: list[str], common: list[str], overrides: list[str], seed: int = 0) -> list[dict]:
    from experiments.fit import main

    cli = main(common + extra + overrides + ["--seed_everything", str(seed)])
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ResultsReport))
    return report.rows


def _mean_std(values: list[float], digits: int, suffix: str = "") -> str:
    """``mean`` for one run, ``mean ± std`` (sample standard deviation) over several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{suffix}"
    return f"{mean:.{digits}f}{suffix} ± {statistics.stdev(values):.{digits}f}"


def format_results(results: list[tuple[str, list[list[dict]]]], command: str, seconds: float,
                   seeds: Sequence[int] = (0,)) -> str:
    """Markdown table; ``results`` holds, per row label, the report rows of each seed's run."""
    tasks = [r["task"] for r in results[0][1][0][:-1]]
    head = "| method | params (x backbone) | " + " | ".join(tasks) + " | mean | % task params (mean) | active layers (mean) |"
    rule = "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"
    lines = [head, rule]
    for label, runs in results:
        n = len(tasks)
        per_task = [[run[i]["accuracy"] for run in runs] for i in range(n)]
        pct = [sum(r["task_params_pct"] for r in run[:-1]) / n for run in runs]
        active = [sum(r["active_layers"] for r in run[:-1]) / n for run in runs]
        lines.append(
            f"| {label} | {_mean_std([run[-1]['params_multiple'] for run in runs], 2, 'x')} | "
            + " | ".join(f"{statistics.fmean(accs):.2f}" for accs in per_task)
            + f" | {_mean_std([run[-1]['accuracy'] for run in runs], 2)} | {_mean_std(pct, 1)} | "
            + f"{_mean_std(active, 1)} / {runs[0][0]['gated_layers']} |"
        )
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    runs = (f"seed {seeds[0]}, one run per row" if len(seeds) == 1 else
            f"seeds {', '.join(map(str, seeds))}: every figure is the mean over seeds, ± the standard deviation "
            "over seeds (per-task columns: means only)")
    return (
        "# Results on the embedded benchmark\n\n"
        f"Command: `{command}` ({seconds / 60:.1f} min wall on {machine}); test split, best checkpoint "
        f"by mean validation accuracy, {runs}.\n\n" + "\n".join(lines) + "\n\n"
        "Params: base plus every task's task-specific parameters (an adapter shared by several tasks counted once), in backbones (the paper's Params column). "
        "% task params: each task's own parameters (active deltas, norms, head) as % of the backbone.\n\n" + PAPER
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--quick", action="store_true", help="tiny run for testing the pipeline")
    parser.add_argument("--only", nargs="*", default=None, help="row labels to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train every row once per seed; the table shows mean ± standard deviation (default: 0)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {label for label, _ in VARIANTS})
    if unknown:
        parser.error(f"--only: unknown row(s) {unknown}; rows are {[label for label, _ in VARIANTS]}")
    common = ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.name", "reproduce"]
    overrides = QUICK if args.quick else []
    start = time.time()
    results = [(label, [run_variant(extra, common, overrides, seed) for seed in args.seeds])
               for label, extra in VARIANTS if args.only is None or label in args.only]
    command = ("python -m experiments.reproduce" + (" --quick" if args.quick else "")
               + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_results(results, command, time.time() - start, args.seeds))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
