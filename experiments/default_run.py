"""``python -m experiments.default_run``: record the offline default run for the docs.

Runs ``python -m experiments.fit`` with no flags (the run the README starts with) in a temporary
folder and writes what it produced, unedited, into the docs: its test report as
``docs/embedded_report.md``, headed by the command, machine, threads, torch and commit it was
made with, and the layer selection it drew at the end of fit as
``docs/embedded_layer_selection.png`` (the picture of the README and the docs' front page).
Extra arguments go to ``experiments.fit`` and are named in the header (``--quick`` runs a tiny
version, for the tests).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from callbacks import ResultsReport
from experiments.reproduce import QUICK
from experiments.run.provenance import provenance
from taps_lightning.errors import SettingsError, run_command
from taps_lightning.files.atomic import atomic_write


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(prog="python -m experiments.default_run", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs", help="folder to write embedded_report.md and the PNG into")
    parser.add_argument("--quick", action="store_true", help="tiny run for testing the pipeline")
    args, fit_args = parser.parse_known_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        raise SettingsError(f"--out {out}: no such folder; give the docs folder (it is not created)")
    from experiments.fit import main as fit

    flags = (QUICK if args.quick else []) + fit_args
    with tempfile.TemporaryDirectory(prefix="taps-default-run-") as root:
        cli = fit(flags + ["--trainer.default_root_dir", root, "--trainer.enable_progress_bar", "false"])
        report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ResultsReport)).path
        picture = Path(cli.trainer.checkpoint_callback.dirpath) / "layer_selection.png"
        command = " ".join(["python -m experiments.fit", *flags])
        made = provenance()
        header = (f"Made by `python -m experiments.default_run`: the report of `{command}` as it printed it (made on "
                  f"{made['machine']}, {made['threads']} thread(s), torch {made['torch']}, CPU, commit "
                  f"{made['commit']}). On another machine or thread count the run follows "
                  "another path; the mean and spread over seeds are on the [results](results.md) page.\n\n")
        text = header + report.read_text()
        report_out, picture_out = out / "embedded_report.md", out / "embedded_layer_selection.png"
        atomic_write(report_out, lambda f: f.write(text), "the default run's report", text=True)
        atomic_write(picture_out, lambda f: f.write(picture.read_bytes()), "the layer selection")
    print(f"wrote {report_out} and {picture_out}")
    return report_out, picture_out


if __name__ == "__main__":
    run_command(main, sys.argv[1:])  # the error boundary: a user error is its message and exit status 2
