"""``python -m experiments.reproduce``: accuracy against parameter cost on the offline benchmark.

Trains, seeded, the feature extractor, full fine-tuning, incremental TAPS over a lambda sweep with
the paper's per-layer penalty and with the parameter-weighted one, incremental TAPS at storage
budgets of 10 to 40 % of the backbone, joint TAPS, memory-efficient TAPS, joint (multi-task)
fine-tuning and progressive task-specific adapters on the embedded digit domains
(``python -m experiments.fit`` defaults otherwise), tests each best checkpoint and writes
``docs/results.md`` in the layout of the paper's Tables 1 and 5 (the paper's own numbers quoted for
reference) and ``docs/pareto.png``, accuracy against stored fraction for the sweeps.

``--seeds 0 1 2`` trains every row once per seed and reports the mean and the standard deviation
over seeds. Every finished run is kept as ``<runs>/<row>-seed<N>.json``, so an interrupted
reproduction continues where it stopped and the table and figure can be redrawn without training
(``--no-train``). ``--jobs 2`` trains two runs at a time, each on half the CPU threads.
``--quick`` runs a tiny version (for the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from callbacks import ResultsReport
from experiments.run.provenance import commit, cpu_model
from taps_lightning.errors import SettingsError, TapsError, run_command
from taps_lightning.files.atomic import atomic_write

LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.5)
BUDGETS = (0.1, 0.2, 0.3, 0.4)
LORA_RANKS = (4, 8, 16)
#: The LoRA baseline's learning rate, chosen on validation at rank 8, seed 0 (``--sweep``: docs/lora_sweep.md).
LORA_LR = 0.01
#: The learning rates ``--sweep`` tries (SGD with momentum, as every other row).
LORA_SWEEP_LRS = (0.003, 0.005, 0.01, 0.02, 0.03, 0.1, 0.3)


def _lora_flags(rank: int, lr: float = LORA_LR) -> list[str]:
    return ["--model.mode", "lora", "--model.lora_rank", str(rank), "--model.lr", str(lr)]


#: (label, extra flags) of every row.
VARIANTS = [
    ("Feature extractor", ["--model.mode", "linear"]),
    ("Fine-tuning", ["--model.mode", "finetune"]),
    *[(f"TAPS incremental, lambda={lam}", ["--model.mode", "incremental", "--model.lam", str(lam)]) for lam in LAMBDAS],
    *[(f"TAPS incremental, params penalty, lambda={lam}",
       ["--model.mode", "incremental", "--model.penalty", "params", "--model.lam", str(lam)]) for lam in LAMBDAS],
    *[(f"TAPS incremental, budget={budget}", ["--model.mode", "incremental", "--model.budget", str(budget)])
      for budget in BUDGETS],
    ("TAPS incremental, budget=0.2, layers penalty",
     ["--model.mode", "incremental", "--model.budget", "0.2", "--model.penalty", "layers"]),
    ("TAPS joint, lambda=0.5", ["--model.mode", "joint", "--model.lam", "0.5"]),
    ("TAPS memory-efficient, lambda=0.5", ["--model.mode", "memory_efficient", "--model.lam", "0.5",
                                           "--model.joint_epochs", "2", "--model.sparsity_warmup_epochs", "0"]),
    ("Joint fine-tuning", ["--model.mode", "joint_finetune"]),
    ("Progressive adapters (rank 8)", ["--model.mode", "progressive"]),
    *[(f"LoRA (PEFT), rank {rank}", _lora_flags(rank)) for rank in LORA_RANKS],
    ("LoRA (PEFT), rank 8, grouped convs trained in full", _lora_flags(8) + ["--model.lora_grouped_convs", "full"]),
    # the A/B of the training defaults at lambda 0.5 (docs/ab_defaults.md); the first row above is "A"
    ("TAPS incremental, lambda=0.5, gates frozen in the last epoch",
     ["--model.mode", "incremental", "--model.lam", "0.5", "--model.freeze_gates_epochs", "1"]),
    ("TAPS incremental, lambda=0.5, cosine per step + Nesterov",
     ["--model.mode", "incremental", "--model.lam", "0.5", "--model.scheduler", "cosine_step",
      "--model.nesterov", "true"]),
    ("TAPS incremental, lambda=0.5, cosine per step",
     ["--model.mode", "incremental", "--model.lam", "0.5", "--model.scheduler", "cosine_step"]),
    ("TAPS incremental, lambda=0.5, Nesterov",
     ["--model.mode", "incremental", "--model.lam", "0.5", "--model.nesterov", "true"]),
]
#: The learning-rate sweep of the LoRA baseline (``--sweep``; seed 0, selected on validation accuracy).
SWEEP = [(f"LoRA (PEFT), rank 8, lr={lr} (sweep)", _lora_flags(8, lr)) for lr in LORA_SWEEP_LRS]
#: Every trainable row by label (the table's and the sweep's).
ROWS = dict(VARIANTS + SWEEP)
#: Rows of the A/B of training defaults (written to their own table with --only and --out).
AB_ROWS = ["TAPS incremental, lambda=0.5"] + [label for label, _ in VARIANTS if label.startswith("TAPS incremental, lambda=0.5, ")]
#: What a kept run must have been made with to count (runs of an older protocol are trained again):
#: 2 = BatchNorm statistics re-estimated before every validation and test.
PROTOCOL = 2
#: The figure's series: (name, row-label pattern, marker; None: a reference line across the plot).
SERIES = [
    ("lambda sweep, per-layer penalty (paper)", r"^TAPS incremental, lambda=[0-9.]+$", "o"),
    ("lambda sweep, parameter-weighted penalty", r"^TAPS incremental, params penalty, lambda=[0-9.]+$", "s"),
    ("budget (parameter-weighted penalty)", r"^TAPS incremental, budget=[0-9.]+$", "^"),
    ("budget 0.2, per-layer penalty", r"^TAPS incremental, budget=0.2, layers penalty$", "v"),
    ("LoRA (PEFT), ranks 4, 8, 16", r"^LoRA \(PEFT\), rank [0-9]+$", "D"),
    ("LoRA (PEFT), rank 8, grouped convs in full", r"^LoRA \(PEFT\), rank 8, grouped convs trained in full$", "P"),
    ("fine-tuning", r"^Fine-tuning$", None),
    ("feature extractor", r"^Feature extractor$", None),
]
QUICK = ["--trainer.max_epochs", "1", "--data.init_args.max_train_per_task", "32", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1"]


def quick_flags(flags: list[str]) -> list[str]:
    """:data:`QUICK`, and for the memory-efficient row no joint phase (its one epoch is TAPS'); other
    modes do not read ``joint_epochs`` (the LoRA baseline refuses it)."""
    return QUICK + (["--model.joint_epochs", "0"] if "memory_efficient" in flags else [])

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


def run_variant(extra: list[str], common: list[str], overrides: list[str], seed: int = 0) -> tuple[list[dict], float]:
    """The test report rows of the run's best checkpoint, and its validation score (what selected it)."""
    from experiments.fit import main

    cli = main(common + extra + overrides + ["--seed_everything", str(seed)])
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ResultsReport))
    best = cli.trainer.checkpoint_callback.best_model_score
    return report.rows, float(best) if best is not None else float("nan")


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-")


def run_file(runs: Path, label: str, seed: int, quick: bool) -> Path:
    return runs / f"{_slug(label)}-seed{seed}{'-quick' if quick else ''}.json"


def load_run(path: Path, flags: list[str]) -> list[dict] | None:
    """A finished run's report rows, or ``None`` if there is none for exactly these flags."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["rows"] if record.get("flags") == flags and record.get("protocol") == PROTOCOL else None


def train_and_store(label: str, seed: int, runs: Path, quick: bool) -> list[dict]:
    """Train one row for one seed and keep its report rows (written atomically)."""
    flags = ROWS[label]
    common = ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.name", "reproduce"]
    start = time.time()
    rows, best_val = run_variant(flags, common, quick_flags(flags) if quick else [], seed)
    record = {"label": label, "seed": seed, "flags": flags, "quick": quick, "rows": rows, "best_val": best_val,
              "seconds": time.time() - start, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "cpu": cpu_model(), "protocol": PROTOCOL, "commit": commit()}
    path = run_file(runs, label, seed, quick)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1)), "the run record", text=True)
    return rows


def _train_missing(todo: list[tuple[str, int]], runs: Path, quick: bool, jobs: int) -> None:
    """Train every (label, seed) in ``todo``: in this process, or ``jobs`` worker processes at a time."""
    if jobs <= 1:
        for label, seed in todo:
            train_and_store(label, seed, runs, quick)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    runs.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(todo), [], []
    while pending or running:
        while pending and len(running) < jobs:
            label, seed = pending.pop(0)
            cmd = [sys.executable, "-m", "experiments.reproduce", "--worker", label, "--seeds", str(seed),
                   "--runs", str(runs)] + (["--quick"] if quick else [])
            log = open(run_file(runs, label, seed, quick).with_suffix(".log"), "w")
            running.append(((label, seed), subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1)
        for item in list(running):
            key, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    failed.append(key)
    if failed:
        raise TapsError(f"runs failed (see their .log files in {runs}): {failed}")


def _mean_std(values: list[float], digits: int, suffix: str = "") -> str:
    """``mean`` for one run, ``mean ± std`` (sample standard deviation) over several."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}{suffix}"
    return f"{mean:.{digits}f}{suffix} ± {statistics.stdev(values):.{digits}f}"


def format_results(results: list[tuple[str, list[list[dict]]]], command: str, seconds: float,
                   seeds: Sequence[int] = (0,), machine: str | None = None) -> str:
    """Markdown table; ``results`` holds, per row label, the report rows of each seed's run (a
    row with fewer runs than ``seeds`` says how many it has)."""
    tasks = [r["task"] for r in results[0][1][0][:-1]]
    head = ("| method | params (x backbone) | " + " | ".join(tasks)
            + " | mean | worst task (any seed) | % task params (mean) | active layers (mean) |")
    rule = "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|"
    lines = [head, rule]
    for label, runs in results:
        n = len(tasks)
        per_task = [[run[i]["accuracy"] for run in runs] for i in range(n)]
        pct = [sum(r["task_params_pct"] for r in run[:-1]) / n for run in runs]
        active = [sum(r["active_layers"] for r in run[:-1]) / n for run in runs]
        shown = label if len(runs) == len(seeds) else f"{label} ({len(runs)} of {len(seeds)} seeds)"
        lines.append(
            f"| {shown} | {_mean_std([run[-1]['params_multiple'] for run in runs], 2, 'x')} | "
            + " | ".join(_mean_std(accs, 1) for accs in per_task)
            + f" | {_mean_std([run[-1]['accuracy'] for run in runs], 2)} | {_worst(runs, tasks)} | {_mean_std(pct, 1)} | "
            + f"{_mean_std(active, 1)} / {runs[0][0]['gated_layers']} |"
        )
    machine = machine or f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    runs = (f"seed {seeds[0]}, one run per row" if len(seeds) == 1 else
            f"seeds {', '.join(map(str, seeds))}: every figure is the mean over seeds, ± the standard deviation "
            "over seeds; worst task: the lowest accuracy of any task in any seed's run")
    return (
        "# Results on the embedded benchmark\n\n"
        f"Command: `{command}` ({seconds / 60:.1f} min of training on {machine}); test split, best checkpoint "
        f"by mean validation accuracy, {runs}.\n\n" + "\n".join(lines) + "\n\n"
        "Params: base plus every task's task-specific parameters (an adapter shared by several tasks counted once), in backbones (the paper's Params column). "
        "% task params: each task's own parameters (active deltas, norms, head) as % of the backbone.\n\n" + PAPER
    )


def _worst(runs: list[list[dict]], tasks: list[str]) -> str:
    """The lowest test accuracy of any task in any run, and which task (and seed index) it was."""
    acc, task, i = min((run[t]["accuracy"], tasks[t], i) for i, run in enumerate(runs) for t in range(len(tasks)))
    return f"{acc:.2f} ({task})"


def pareto_points(results: list[tuple[str, list[list[dict]]]]) -> dict[str, list[dict]]:
    """Per figure series, one point per row: stored fraction (% of backbone, mean over tasks) and mean
    accuracy, each as mean and standard deviation over seeds."""
    points: dict[str, list[dict]] = {}
    for name, pattern, _ in SERIES:
        for label, runs in results:
            if not re.search(pattern, label):
                continue
            x = [statistics.fmean(r["task_params_pct"] for r in run[:-1]) for run in runs]
            y = [run[-1]["accuracy"] for run in runs]
            sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
            points.setdefault(name, []).append({"label": label, "x": statistics.fmean(x), "x_sd": sd(x),
                                                "y": statistics.fmean(y), "y_sd": sd(y), "n": len(runs)})
    return points


def draw_pareto(points: dict[str, list[dict]], path: Path, title: str) -> Path | None:
    """Accuracy against stored fraction, error bars one standard deviation over seeds."""
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, _, marker in SERIES:
        pts = sorted(points.get(name, []), key=lambda p: p["x"])
        if not pts:
            continue
        if marker is None:  # a baseline far off the sweeps' range: its accuracy as a line, its size in the label
            p = pts[0]
            ax.axhline(p["y"], linestyle="--", linewidth=1, color="grey" if "extractor" in name else "black",
                       label=f"{name}: {p['y']:.1f} ± {p['y_sd']:.1f} % at {p['x']:.1f} % stored")
            continue
        ax.errorbar([p["x"] for p in pts], [p["y"] for p in pts], xerr=[p["x_sd"] for p in pts],
                    yerr=[p["y_sd"] for p in pts], marker=marker, capsize=3, label=name,
                    linestyle="-" if len(pts) > 1 else "none")
        for p in pts:
            tag = re.search(r"(lambda|budget)=([0-9.]+)|(rank) ([0-9]+)", p["label"])
            if tag:
                kind, value = (tag.group(1), tag.group(2)) if tag.group(1) else (tag.group(3), tag.group(4))
                ax.annotate({"lambda": "λ", "budget": "F", "rank": "r"}[kind] + value, (p["x"], p["y"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("stored per task (% of the backbone's parameters, mean over tasks)")
    ax.set_ylabel("test accuracy (%, mean over tasks)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def pareto_markdown(points: dict[str, list[dict]], figure: Path | None) -> str:
    if not points:
        return ""
    lines = ["", "## Accuracy against stored fraction", ""]
    if figure is not None:
        lines += [f"![accuracy vs stored fraction]({figure.name})", ""]
    lines += ["| series | row | runs | stored (% of backbone) | accuracy (%) |", "|---|---|---:|---:|---:|"]
    for name, pts in points.items():
        for p in sorted(pts, key=lambda p: p["x"]):
            lines.append(f"| {name} | {p['label']} | {p['n']} | {p['x']:.1f} ± {p['x_sd']:.1f} | "
                         f"{p['y']:.2f} ± {p['y_sd']:.2f} |")
    return "\n".join(lines) + "\n"


def _flag(label: str, name: str) -> float | None:
    """A row's numeric flag (``--model.lam``, ``--model.budget``), None when the row does not set it."""
    flags = ROWS.get(label, [])
    return float(flags[flags.index(name) + 1]) if name in flags else None


def _in(value: float | None, low: float, high: float) -> bool:
    return value is not None and low <= value <= high


def _verdict(checked: list[tuple[str, float, bool]], fmt: str, extreme) -> list[str]:
    """The verdict cells of one target: met or missed, the rows that meet it (with their extreme
    value) and each row that misses it, with its value."""
    if not checked:
        return ["not checked (no row in scope)", "", ""]
    met = [value for _, value, ok in checked if ok]
    missed = [f"{label} ({fmt.format(value)})" for label, value, ok in checked if not ok]
    return ["**met**" if not missed else f"**missed** by {len(missed)} of {len(checked)} rows",
            f"{len(met)} of {len(checked)} rows" + (f" ({extreme[0]} {fmt.format(extreme[1](met))})" if met else ""),
            "; ".join(missed) or "none"]


def format_targets(results: list[tuple[str, list[list[dict]]]]) -> str:
    """The results issue's (#22) targets, each met or missed, computed from the rows of the table.

    In scope of the first two: every TAPS row at lambda <= 1.0 or budget >= 0.2; of the third:
    lambda 0.25-0.5 and budget 0.2-0.3; of the fourth: the budget rows at 0.2 and 0.3 (a task's
    stored fraction, in % of the backbone, within [100 F - 5, 100 F] in every seed's run)."""
    taps = [(label, runs, _flag(label, "--model.lam"), _flag(label, "--model.budget"))
            for label, runs in results if label.startswith("TAPS")]
    scope = [(label, runs) for label, runs, lam, budget in taps if _in(lam, 0.0, 1.0) or _in(budget, 0.2, 1.0)]
    worst = [(label, min(r["accuracy"] for run in runs for r in run[:-1])) for label, runs in scope]
    lines = ["", "## Against the targets of the results issue", "",
             "Computed from the table above: every TAPS row in a target's scope, all seeds. "
             "Met by: how many rows meet it, and the extreme value among them.", "",
             "| target | verdict | met by | missed by |", "|---|---|---|---|"]
    lines.append("| no task below 90 % at lambda <= 1.0 or budget >= 0.2 (worst task, any seed) | "
                 + " | ".join(_verdict([(label, acc, acc >= 90.0) for label, acc in worst], "{:.2f} %", ("lowest", min)))
                 + " |")
    spread = [(label, statistics.stdev(run[-1]["accuracy"] for run in runs)) for label, runs in scope if len(runs) > 1]
    lines.append("| seed standard deviation of the mean <= 1.5 points, same rows | "
                 + " | ".join(_verdict([(label, sd, sd <= 1.5) for label, sd in spread], "{:.2f}", ("largest", max))
                              if spread else ["not checked (one seed)", "", ""]) + " |")
    finetune = dict(results).get("Fine-tuning")
    near = [(label, runs) for label, runs, lam, budget in taps if _in(lam, 0.25, 0.5) or _in(budget, 0.2, 0.3)]
    if finetune:
        reference = statistics.fmean(run[-1]["accuracy"] for run in finetune)
        gaps = [(label, reference - statistics.fmean(run[-1]["accuracy"] for run in runs)) for label, runs in near]
        cells = _verdict([(label, gap, gap <= 1.5) for label, gap in gaps], "{:.2f} below", ("largest gap", max))
    else:
        cells = ["not checked (no fine-tuning row)", "", ""]
    lines.append("| lambda 0.25-0.5 and budget 0.2-0.3 within 1.5 points of fine-tuning (mean accuracy) | "
                 + " | ".join(cells) + " |")
    landed = []
    for label, runs, _, budget in taps:
        if budget in (0.2, 0.3):
            stored = [r["task_params_pct"] for run in runs for r in run[:-1]]
            inside = [p for p in stored if 100 * budget - 5 <= p <= 100 * budget]
            outside = sorted(p for p in stored if p not in inside)
            landed.append((f"{label}: {len(inside)} of {len(stored)} task-runs in [{100 * budget - 5:.0f}, "
                           f"{100 * budget:.0f}] %" + (f", the others at {', '.join(f'{p:.1f}' for p in outside)} %"
                                                      if outside else ""), not outside))
    lines.append("| budgets 0.2 and 0.3 land every task in [F - 5 points, F] (stored % of the backbone) | "
                 + ("**met**" if landed and all(ok for _, ok in landed) else "**missed**" if landed else "not checked")
                 + " | " + ("; ".join(text for text, ok in landed if ok) or "none") + " | "
                 + ("; ".join(text for text, ok in landed if not ok) or "none") + " |")
    return "\n".join(lines) + "\n"


def _machine(records: list[dict]) -> str:
    """What the kept runs were made on: machine, CPU model(s), threads per run, torch, commit(s)."""
    threads = sorted({r.get("threads") for r in records})
    commits = sorted({str(r.get("commit")) for r in records})
    cpus = sorted({r["cpu"] for r in records if r.get("cpu")})
    return (f"{records[0].get('machine', platform.machine())}"
            + (f" ({' / '.join(cpus)}{', and CPUs not recorded' if any(not r.get('cpu') for r in records) else ''})"
               if cpus else "")
            + f", {'/'.join(map(str, threads))} thread(s) per run, "
            f"torch {records[0].get('torch', torch.__version__)}, CPU, commit {'/'.join(commits)}")


def format_sweep(records: list[dict], machine: str, command: str) -> str:
    """The LoRA learning-rate sweep: each rate's best validation accuracy (what selects it) and, for
    reference only, its test accuracy; the selected rate is the highest validation accuracy."""
    best = max(records, key=lambda r: r["best_val"])
    lines = ["| learning rate | validation acc (%, best epoch; selects) | test acc (%) | worst task (test) | selected |",
             "|---:|---:|---:|---:|:---:|"]
    for r in sorted(records, key=lambda r: float(r["flags"][r["flags"].index("--model.lr") + 1])):
        lr = r["flags"][r["flags"].index("--model.lr") + 1]
        tasks = [row["task"] for row in r["rows"][:-1]]
        lines.append(f"| {lr} | {100 * r['best_val']:.2f} | {r['rows'][-1]['accuracy']:.2f} | {_worst([r['rows']], tasks)} "
                     f"| {'yes' if r is best else ''} |")
    chosen = best["flags"][best["flags"].index("--model.lr") + 1]
    return ("# Learning rate of the LoRA baseline\n\n"
            f"Command: `{command}` (made on {machine}). LoRA (PEFT) at rank 8, seed 0, SGD with momentum 0.9 and "
            "the per-epoch cosine of every other row, the `experiments.fit` defaults otherwise; the rate is chosen by the best "
            "epoch's mean validation accuracy over tasks (the checkpoint selection of every row). Test accuracy is shown "
            "for reference and chose nothing.\n\n" + "\n".join(lines) + "\n\n"
            f"Selected: `--model.lr {chosen}` (`LORA_LR` in `experiments/reproduce.py`), used by every LoRA row of "
            "[the results](results.md).\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/results.md")
    parser.add_argument("--figure", default=None, help="accuracy vs stored fraction (default: pareto.png beside --out)")
    parser.add_argument("--runs", default=None, help="folder of finished runs (default: runs/ beside --out)")
    parser.add_argument("--quick", action="store_true", help="tiny run for testing the pipeline")
    parser.add_argument("--only", nargs="*", default=None, help="row labels to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train every row once per seed; the table shows mean ± standard deviation (default: 0)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each on cores/jobs threads")
    parser.add_argument("--rerun", action="store_true", help="train again even where a finished run is kept")
    parser.add_argument("--no-train", action="store_true", help="only redraw the table and figure from kept runs")
    parser.add_argument("--sweep", action="store_true",
                        help="the LoRA baseline's learning-rate sweep (rank 8, seed 0) into lora_sweep.md beside --out")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one (row, seed) in a child process
    args = parser.parse_args(argv)
    labels = [label for label, _ in (SWEEP if args.sweep else VARIANTS)]
    unknown = sorted(set(args.only or ()) - set(labels) | ({args.worker} - set(ROWS) if args.worker else set()))
    if unknown:
        parser.error(f"unknown row(s) {unknown}; rows are {labels}")
    if args.sweep and args.seeds != [0]:
        parser.error("--sweep selects the learning rate on seed 0 only; drop --seeds")
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out.parent / "runs"
    if args.worker:
        train_and_store(args.worker, args.seeds[0], runs, args.quick)
        return runs
    chosen = [label for label in labels if args.only is None or label in args.only]
    flags = ROWS
    todo = [(label, seed) for seed in args.seeds for label in chosen  # seed-major: every row once first
            if args.rerun or load_run(run_file(runs, label, seed, args.quick), flags[label]) is None]
    if todo and not args.no_train:
        _train_missing(todo, runs, args.quick, args.jobs)
    results, records = [], []
    for label in chosen:
        found = []
        for seed in args.seeds:
            path = run_file(runs, label, seed, args.quick)
            if load_run(path, flags[label]) is not None:
                found.append(json.loads(path.read_text()))
        if found:
            results.append((label, [r["rows"] for r in found]))
            records += found
    if not results:
        raise SettingsError(f"no finished runs in {runs}; run without --no-train first")
    if args.sweep:
        path = out.parent / "lora_sweep.md"
        command = "python -m experiments.reproduce --sweep" + (" --quick" if args.quick else "")
        text = format_sweep(records, _machine(records), command)
        atomic_write(path, lambda f: f.write(text), "the sweep table", text=True)
        print(path.read_text())
        return path
    command = ("python -m experiments.reproduce" + (" --quick" if args.quick else "")
               + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else ""))
    machine = _machine(records)
    seconds = sum(r.get("seconds", 0.0) for r in records)
    points = pareto_points(results)
    figure = draw_pareto(points, Path(args.figure) if args.figure else out.parent / "pareto.png",
                         f"seeds {', '.join(map(str, args.seeds))} (runs per point: see results.md); "
                         "error bars: one standard deviation over seeds")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(format_results(results, command, seconds, args.seeds, machine) + format_targets(results)
                   + pareto_markdown(points, figure))
    print(out.read_text())
    return out


if __name__ == "__main__":
    run_command(main, sys.argv[1:])  # the error boundary: a user error is its message and exit status 2
