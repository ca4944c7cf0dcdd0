"""What a measurement was made on: machine, CPU model, threads, torch and commit. Every published
number (a results run, a benchmark row, the recorded default run) carries these, from here."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), so a kept run says what it was made on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str | None:
    """The checked-out commit (with ``+`` when the tree has uncommitted changes), if in a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+" if dirty else "")) or None


def provenance() -> dict:
    """Machine and CPU model, thread count, torch and commit, as one record."""
    return {"machine": f"{platform.machine()} ({cpu_model()})", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": commit()}
