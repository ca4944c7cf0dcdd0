"""Refuse inputs that would make a run meaningless before any compute is spent on it: a weights
digest that is not one, data whose class names changed since the tasks were trained. Each
message names the flag or file and the fix. (The ranges of the training settings are checked by
their own groups, :mod:`taps_lightning.training.settings`.)
"""
from __future__ import annotations

import re

from ..errors import SettingsError

__all__ = ["SettingsError", "normalize_sha256", "data_class_names", "class_name_changes", "resume_conflicts",
           "resume_changes", "RESUME_FIXED_FLAGS"]

#: Flags a resume must keep: they decide what the checkpoint's weights are, or how its best checkpoint was ranked.
RESUME_FIXED_FLAGS = ("backbone", "mode", "tasks", "threshold", "budget")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def normalize_sha256(value: str | None) -> str | None:
    """A SHA-256 hex digest in lower case (as ``hashlib`` prints it), or a clear error."""
    if value is None:
        return None
    digest = str(value).strip().lower()
    if not _SHA256.match(digest):
        raise SettingsError(f"--model.weights_sha256 {value!r} is not a SHA-256 digest (64 hexadecimal characters); "
                         "compute it with `sha256sum FILE`")
    return digest


def data_class_names(datamodule, tasks) -> dict[str, list[str] | None]:
    """``{task: class names}`` as ``datamodule.class_names(task)`` gives them (``None`` when it has no
    names, or no data module, or the data cannot be read now)."""
    names_of = getattr(datamodule, "class_names", None)
    names: dict[str, list[str] | None] = {}
    for task in tasks:
        try:
            found = names_of(task) if names_of is not None else None
        except (OSError, KeyError, ValueError):  # the data is not there: the data module says so itself
            found = None
        names[task] = [str(n) for n in found] if found is not None else None
    return names


def class_name_changes(recorded: dict, current: dict, origin: str) -> str | None:
    """What differs between the class names ``recorded`` when tasks were trained (a checkpoint's,
    a task file's) and those of the data now, task by task, or ``None`` when nothing does. Labels
    are positions in the class list, so a renamed, added or removed class shifts them silently."""
    problems = []
    for task, saved in (recorded.items() if isinstance(recorded, dict) else ()):
        now = current.get(task)
        if not isinstance(saved, (list, tuple)) or now is None or list(saved) == list(now):
            continue
        saved, now = list(saved), list(now)
        parts = []
        if len(saved) != len(now):
            parts.append(f"{len(saved)} classes when trained, {len(now)} in the data")
        gone, new = [c for c in saved if c not in now], [c for c in now if c not in saved]
        if gone or new:
            parts.append(f"only when trained: {_few(gone)}; only in the data: {_few(new)}")
        moved = [f"{i}: {a!r} -> {b!r}" for i, (a, b) in enumerate(zip(saved, now)) if a != b]
        if moved:
            parts.append("labels that now mean another class: " + _few(moved, quote=False))
        problems.append(f"task {task!r}: " + "; ".join(parts))
    if not problems:
        return None
    return (f"{origin} was trained with other class names than the data has now (a class folder renamed, added or "
            "removed?); its labels would silently mean other classes:\n  - " + "\n  - ".join(problems)
            + "\nUse the data the tasks were trained on (e.g. rename the folders back), or train a new run.")


def _few(items: list, limit: int = 5, quote: bool = True) -> str:
    shown = ", ".join(repr(i) if quote else str(i) for i in items[:limit])
    return "[" + shown + (f", ... {len(items) - limit} more" if len(items) > limit else "") + "]"


def resume_conflicts(saved: dict, current: dict, origin: str) -> list[str]:
    """The :data:`RESUME_FIXED_FLAGS` whose value differs between a checkpoint's recorded flags
    (``saved``) and this run's (``current``), one line each naming the flag, both values and the fix."""
    return [f"--model.{key}: the checkpoint was trained with {key}={saved[key]!r}, but this run has {key}={current[key]!r}; "
            "use the same setting (e.g. --config <run folder>/config.yaml) or start a new run (drop --ckpt_path)"
            for key in RESUME_FIXED_FLAGS if key in saved and key in current and saved[key] != current[key]]


def resume_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """``{flag: (checkpoint's value, this run's)}`` for every other recorded flag a resume changes
    (allowed, e.g. another ``lam`` or ``lr`` from here on, but never silently)."""
    return {k: (saved[k], v) for k, v in current.items()
            if k in saved and saved[k] != v and k not in RESUME_FIXED_FLAGS and not k.startswith("_")}
