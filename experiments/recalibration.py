"""``python -m experiments.recalibration``: validation accuracy against the number of batches the
BatchNorm statistics are re-estimated on, for given checkpoints (how ``--model.recalibrate_batches``'
default was chosen).

Each checkpoint is evaluated with ``experiments.evaluate --recalibrate_batches N`` for every ``N``
(0: the statistics stored in the checkpoint). Give checkpoints of a run trained with
``--model.recalibrate_batches 0 --checkpoint.save_top_k -1``: re-estimation does not change the
training trajectory, so their weights are those of any run with the same settings and seed, and
their statistics are the training-time running averages. Prints a Markdown table (mean over tasks,
and the worst task) and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from callbacks import ResultsReport

from taps_lightning.errors import run_command


def evaluate(ckpt: Path, batches: int, split: str, root: str, extra: list[str]) -> list[dict]:
    """The report rows (tasks, then the total) of one evaluation."""
    from experiments.evaluate import main

    cli = main(["--ckpt_path", str(ckpt), "--split", split, "--recalibrate_batches", str(batches),
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", root] + extra)
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, ResultsReport)).rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m experiments.recalibration", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpts", nargs="+", required=True, help="checkpoints of experiments.fit")
    parser.add_argument("--batches", nargs="+", type=int, default=[0, 1, 2, 4, 8, 16, 32])
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--out", default=None, help="also write the table here")
    args, extra = parser.parse_known_args(argv)  # anything else goes to experiments.evaluate (e.g. --config)
    lines = ["| checkpoint | " + " | ".join(f"N={n}" for n in args.batches) + " |",
             "|---|" + "---:|" * len(args.batches)]
    with tempfile.TemporaryDirectory() as root:
        for ckpt in map(Path, args.ckpts):
            cells = []
            for n in args.batches:
                rows = evaluate(ckpt, n, args.split, root, extra)
                tasks = rows[:-1]
                worst = min(tasks, key=lambda r: r["accuracy"])
                cells.append(f"{statistics.fmean(r['accuracy'] for r in tasks):.2f} "
                             f"(worst {worst['task']} {worst['accuracy']:.1f})")
            lines.append(f"| {ckpt.parent.parent.name}/{ckpt.name} | " + " | ".join(cells) + " |")
    table = (f"Mean {args.split} accuracy over tasks (%), and the worst task, with the BatchNorm statistics "
             "re-estimated on N batches of each task's training images (N=0: as stored).\n\n" + "\n".join(lines) + "\n")
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


if __name__ == "__main__":
    run_command(main)  # the error boundary: a user error is its message and exit status 2
