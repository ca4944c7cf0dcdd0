"""``python -m datamodules.check <benchmark> <root>``: walk a benchmark before a long run.

Prints, per task, the classes and images per split and every problem found (missing folder
or split file, no task or an empty class or split, a split line naming a missing image, a
class-count mismatch, an unreadable or truncated image), each naming the file and the fix.
Warnings (files that are not images, classes missing from a test split) and high bit depth
images (16-bit greyscale, scaled to 8 bit when loaded) are listed too but are no problem.
Exit status 1 when anything is wrong.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from taps_lightning.errors import EXIT_USER_ERROR, run_command

from .base import SPLITS, MultiTaskDataModule
from .decathlon import VisualDecathlon
from .domainnet import DomainNet
from .folder import ImageFolderTasks, ImageNetToSketch
from .images import HIGH_BIT_DEPTH_MODES, CorruptImageError, DataLayoutError, ImageListDataset, decode_rgb

BENCHMARKS = {
    "imagefolder": ImageFolderTasks,
    "imagenet_to_sketch": ImageNetToSketch,
    "domainnet": DomainNet,
    "decathlon": VisualDecathlon,
}


class _Report:
    """Problems and warnings, each printed once as it is found."""

    def __init__(self, out) -> None:
        self.out, self.problems, self.warnings = out, [], []

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)
            print(f"PROBLEM {message}", file=self.out)

    def warn(self, caught: list[warnings.WarningMessage]) -> None:
        for message in map(str, (w.message for w in caught)):
            if message not in self.warnings:
                self.warnings.append(message)
                print(f"WARNING {message}", file=self.out)
        caught.clear()


def check(dm: MultiTaskDataModule, decode: bool = True, out=None) -> list[str]:
    """Check every task and split of ``dm``; returns the problems (also printed)."""
    report = _Report(out or sys.stdout)
    decoded: set[str] = set()
    high_bit_depth: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tasks, classes = dm.tasks, dm.num_classes
        except (DataLayoutError, ValueError) as err:
            tasks = []
            report.problem(str(err))
        report.warn(caught)
        for task in tasks:
            try:
                dm.check_classes(task)
            except DataLayoutError as err:
                report.problem(str(err))
            counts = {}
            for split in SPLITS:
                try:
                    ds = dm.checked_dataset(task, split)
                except DataLayoutError as err:
                    report.problem(str(err))
                    continue
                finally:
                    report.warn(caught)
                counts[split] = len(ds)
                if decode and isinstance(ds, ImageListDataset):
                    for path in (path for path, _ in ds.samples if path not in decoded):
                        decoded.add(path)
                        try:
                            if decode_rgb(path)[1] in HIGH_BIT_DEPTH_MODES:
                                high_bit_depth.append(path)
                        except CorruptImageError as err:
                            report.problem(str(err))
            sizes = ", ".join(f"{s} {n}" for s, n in counts.items())
            print(f"{task}: {classes[task]} classes; images: {sizes}", file=report.out)
    if high_bit_depth:
        shown = ", ".join(high_bit_depth[:10]) + (" ..." if len(high_bit_depth) > 10 else "")
        print(f"INFO {len(high_bit_depth)} high bit depth image(s) (16-bit greyscale), scaled to 8 bit when "
              f"loaded: {shown}", file=report.out)
    notes = f" ({len(report.warnings)} warning(s))" if report.warnings else ""
    print(f"{len(report.problems)} problem(s) found{notes}" if report.problems else f"OK: no problems found{notes}",
          file=report.out)
    return report.problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.check", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("root", help="the benchmark's folder")
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    parser.add_argument("--quick", action="store_true", help="layout and counts only; do not decode every image")
    args = parser.parse_args(argv)
    dm = BENCHMARKS[args.benchmark](root=args.root, tasks=args.tasks, num_workers=0)
    return EXIT_USER_ERROR if check(dm, decode=not args.quick) else 0  # problems: data to fix (the boundary's status 2)


if __name__ == "__main__":
    sys.exit(run_command(main))  # the error boundary: a user error is its message and exit status 2
