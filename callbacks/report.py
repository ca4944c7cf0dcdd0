"""``ResultsReport``: the paper's table (accuracy beside parameter cost) as Markdown and CSV."""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from taps_lightning import save_task
from taps_lightning.training.lightning_module import TapsModule

from .recalibration import NormRecalibration

__all__ = ["ResultsReport", "collect_rows", "format_markdown"]

COLUMNS = ("task", "accuracy", "active_layers", "gated_layers", "task_params", "task_params_pct", "stored_mb", "lam",
           "norm_images")


def _stored_mb(module: TapsModule, task: str) -> float:
    """Size of what the task needs on disk besides the shared base."""
    model = module.model
    if model.can_export:
        with tempfile.TemporaryDirectory() as tmp:
            path = save_task(model, task, Path(tmp) / "t.safetensors")
            return os.path.getsize(path) / 2**20
    return module.task_cost(task)["task_params"] * 4 / 2**20  # fp32 weights of a baseline


def collect_rows(module: TapsModule, metrics: dict, stage: str, norm_images: dict[str, int] | None = None) -> list[dict]:
    """One row per task from the logged ``<stage>/<task>/acc`` and the module's costs, plus a total
    (``norm_images``: ``{task: images}`` its BatchNorm statistics were re-estimated on)."""
    norm_images = norm_images or {}
    rows = []
    for task in module.tasks:
        cost = module.task_cost(task)
        acc = metrics.get(f"{stage}/{task}/acc")
        rows.append({
            "task": task,
            "accuracy": float(acc) * 100 if acc is not None else float("nan"),
            "active_layers": int(cost["active_layers"]),
            "gated_layers": int(cost["gated_layers"]),
            "task_params": int(cost["task_params"]),
            "task_params_pct": 100 * float(cost["fraction"]),
            "stored_mb": _stored_mb(module, task),
            "lam": module.task_lam(task),  # the final lambda (per task with a budget); None without gates
            # training images its BatchNorm statistics were re-estimated on (0: training-time averages)
            "norm_images": norm_images.get(task, 0),
        })
    base = rows and module.task_cost(rows[0]["task"])["base_params"]
    total_params = sum(r["task_params"] for r in rows)
    accs = [r["accuracy"] for r in rows]
    rows.append({
        "task": "total / mean",
        "accuracy": sum(accs) / len(accs) if accs else float("nan"),
        "active_layers": sum(r["active_layers"] for r in rows),
        "gated_layers": sum(r["gated_layers"] for r in rows),
        "task_params": total_params,
        "task_params_pct": 100 * total_params / base if base else float("nan"),
        "stored_mb": sum(r["stored_mb"] for r in rows),
        "params_multiple": module.total_params_multiple() if rows else float("nan"),
    })
    return rows


def _lam_cell(lam: float | None) -> str:
    return "" if lam is None else f"{lam:.3g}"


def format_markdown(rows: list[dict], title: str, budget: float | None = None,
                    within: dict[str, bool] | None = None) -> str:
    head = ("| task | acc (%) | active / gated layers | task params | % of backbone | stored MB | lambda |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['task']} | {r['accuracy']:.2f} | {r['active_layers']} / {r['gated_layers']} | {r['task_params']:,} | "
        f"{r['task_params_pct']:.2f} | {r['stored_mb']:.2f} | {_lam_cell(r.get('lam'))} |\n"
        for r in rows
    )
    total = rows[-1] if rows else {}
    tail = f"\nTotal parameters for all tasks: {total.get('params_multiple', float('nan')):.2f}x one backbone.\n"
    if budget is not None and within is not None:
        tail += "\n" + budget_line(rows[:-1], budget, within) + "\n"
    tail += "\n" + norms_line(rows[:-1]) + "\n"
    return f"## {title}\n\n{head}{body}{tail}"


def norms_line(rows: list[dict]) -> str:
    """How the BatchNorm statistics of the reported weights were obtained."""
    counts = {r["task"]: int(r.get("norm_images") or 0) for r in rows}
    if not any(counts.values()):
        return ("Norm statistics: as stored with the weights, not re-estimated here (--model.recalibrate_batches 0, "
                "or no task-specific BatchNorm).")
    if len(set(counts.values())) == 1:
        per_task = f"{next(iter(counts.values())):,} training images per task"
    else:
        per_task = ", ".join(f"{t} {n:,}" for t, n in counts.items()) + " training images"
    return (f"Norm statistics: each task's BatchNorm statistics were re-estimated for these weights on {per_task} "
            "(evaluation transform; --model.recalibrate_batches).")


def budget_line(rows: list[dict], budget: float, within: dict[str, bool]) -> str:
    """Whether every task row stores at most ``budget`` of the backbone, said in one line
    (``within``: the module's own verdict per task, :meth:`TapsModule.within_budget`)."""
    over = [r for r in rows if not within[r["task"]]]
    if not over:
        largest = max(r["task_params_pct"] for r in rows)
        return (f"Budget {100 * budget:.4g} % of the backbone per task: every task is within it "
                f"(largest {largest:.2f} %); lambda column: each task's lambda from the budget controller when these "
                "weights were saved.")
    return (f"Budget {100 * budget:.4g} % of the backbone per task: these weights are OVER BUDGET: "
            + ", ".join(f"{r['task']} {r['task_params_pct']:.2f} %" for r in over)
            + ". A budget run tests and exports the best checkpoint within budget when an epoch met it "
            "(else it warns); train longer after the warm-up or raise --model.budget_rate.")


def grouping_markdown(pl_module) -> str:
    """Progressive adapters: which tasks share an adapter in each stage, and the similarities."""
    model = pl_module.model
    sharing = model.sharing()
    if not sharing:
        return ""
    lines = ["", "### Adapter sharing (progressive adapters)", "", "| stage | adapters | groups |", "|---|---:|---|"]
    for stage, groups in sorted(sharing.items()):
        lines.append(f"| {stage} | {len(groups)} | " + " / ".join("{" + ", ".join(g) + "}" for g in groups) + " |")
    for stage, sim in sorted(pl_module.mode.similarity.items()):
        tasks = model.tasks
        lines += ["", f"Gradient cosine similarity, stage {stage}:", "",
                  "| | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += [f"| {t} | " + " | ".join(f"{float(v):.2f}" for v in row) + " |" for t, row in zip(tasks, sim)]
    return "\n".join(lines) + "\n"


class ResultsReport(L.Callback):
    """At the end of test or of ``trainer.validate`` (or of fit, from validation metrics, when
    no test runs) write ``report.md`` and ``report.csv`` to the log directory and print the table."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.path: Path | None = None

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        recalibration = NormRecalibration.of(trainer)
        rows = collect_rows(pl_module, trainer.callback_metrics, stage, recalibration.images if recalibration else None)
        self.rows = rows
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        policy = pl_module.lam_policy
        setting = pl_module.mode.describe(policy, pl_module.gate_settings.penalty)
        title = f"{pl_module.model.backbone_name}, mode={pl_module.mode.name}{f', {setting}' if setting else ''} ({stage} set)"
        budget = policy.budget
        within = policy.within(pl_module.task_fractions())
        text = format_markdown(rows, title, budget, within) + grouping_markdown(pl_module)
        folder = Path(log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
        with open(folder / "report.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS) + ["params_multiple"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.path = folder / "report.md"
        rank_zero_info("\n" + text + f"\n(written to {self.path} and report.csv)")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # a trainer.validate run (experiments.evaluate), not fit's epochs
            self._write(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")
