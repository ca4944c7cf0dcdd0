"""``python -m datamodules.check <benchmark> <root>``: walk a benchmark before a long run.

Prints, per task, the classes and images per split and every problem found (missing folder
or split file, a split line naming a missing image, a class-count mismatch, an unreadable or
truncated image), each naming the file and the fix. Exit status 1 when anything is wrong.
"""
from __future__ import annotations

import argparse
import sys

from .base import MultiTaskDataModule
from .decathlon import VisualDecathlon
from .domainnet import DomainNet
from .folder import ImageFolderTasks, ImageNetToSketch
from .images import CorruptImageError, DataLayoutError, ImageListDataset, load_rgb

BENCHMARKS = {
    "imagefolder": ImageFolderTasks,
    "imagenet_to_sketch": ImageNetToSketch,
    "domainnet": DomainNet,
    "decathlon": VisualDecathlon,
}


def check(dm: MultiTaskDataModule, decode: bool = True, out=None) -> list[str]:
    """Check every task and split of ``dm``; returns the problems (also printed)."""
    out = out or sys.stdout
    problems: list[str] = []
    try:
        tasks = dm.tasks
        classes = dm.num_classes
    except (DataLayoutError, ValueError) as err:
        print(f"PROBLEM {err}", file=out)
        return [str(err)]
    for task in tasks:
        counts = {}
        for split in ("train", "val", "test"):
            try:
                ds = dm.build_dataset(task, split)
            except DataLayoutError as err:
                problems.append(str(err))
                print(f"PROBLEM {err}", file=out)
                continue
            counts[split] = len(ds)
            if decode and isinstance(ds, ImageListDataset):
                for path, _ in ds.samples:
                    try:
                        load_rgb(path)
                    except CorruptImageError as err:
                        problems.append(str(err))
                        print(f"PROBLEM {err}", file=out)
        sizes = ", ".join(f"{s} {n}" for s, n in counts.items())
        print(f"{task}: {classes[task]} classes; images: {sizes}", file=out)
    print(f"{len(problems)} problem(s) found" if problems else "OK: no problems found", file=out)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datamodules.check", description=__doc__.split("\n")[0])
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("root", help="the benchmark's folder")
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    parser.add_argument("--quick", action="store_true", help="layout and counts only; do not decode every image")
    args = parser.parse_args(argv)
    dm = BENCHMARKS[args.benchmark](root=args.root, tasks=args.tasks, num_workers=0)
    return 1 if check(dm, decode=not args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
