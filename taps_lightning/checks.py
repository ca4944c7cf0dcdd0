"""Refuse settings that would make a TAPS run meaningless before any compute is spent on it.

Each rule names the flag, the value given and what to set instead. All problems are reported
at once, so a user fixing a config does not discover them one run at a time.
"""
from __future__ import annotations

import math
import re

__all__ = ["SettingsError", "PENALTIES", "check_training_settings", "normalize_sha256",
           "data_class_names", "class_name_changes"]

class SettingsError(ValueError):
    """A setting or input refused before it could waste a run; the message names the flag or file and
    the fix (the command-line tools print it without a traceback)."""


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: ``--model.penalty`` values: the paper's per-layer penalty, and one weighted by layer size.
PENALTIES = ("layers", "params")


def normalize_sha256(value: str | None) -> str | None:
    """A SHA-256 hex digest in lower case (as ``hashlib`` prints it), or a clear error."""
    if value is None:
        return None
    digest = str(value).strip().lower()
    if not _SHA256.match(digest):
        raise SettingsError(f"--model.weights_sha256 {value!r} is not a SHA-256 digest (64 hexadecimal characters); "
                         "compute it with `sha256sum FILE`")
    return digest


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training_settings(*, taps: bool, lam: float, threshold: float, score_init: float, lr: float,
                            momentum: float, weight_decay: float, score_lr: float | None,
                            sparsity_warmup_epochs: int, joint_epochs: int, adapter_rank: int,
                            num_stages: int, similarity_batches: int, penalty_divisor: float | None = None,
                            cosine_epochs: int | None = None, penalty: str = "layers",
                            budget_rate: float, budget: float | None = None, recalibrate_batches: int = 0,
                            freeze_gates_epochs: int = 0) -> None:
    """Raise ``ValueError`` listing every out-of-range training setting.

    Args:
        taps: whether the mode learns TAPS gates (threshold/score_init/lam then matter).
    """
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(_finite(lr) and lr > 0, f"--model.lr must be a finite number > 0, got {lr}")
    need(score_lr is None or (_finite(score_lr) and score_lr > 0),
         f"--model.score_lr must be a finite number > 0 (or null for --model.lr), got {score_lr}")
    need(_finite(momentum) and 0 <= momentum < 1, f"--model.momentum must be in [0, 1), got {momentum}")
    need(_finite(weight_decay) and weight_decay >= 0, f"--model.weight_decay must be >= 0, got {weight_decay}")
    need(isinstance(sparsity_warmup_epochs, int) and sparsity_warmup_epochs >= 0,
         f"--model.sparsity_warmup_epochs must be an integer >= 0, got {sparsity_warmup_epochs}")
    need(isinstance(joint_epochs, int) and joint_epochs >= 0,
         f"--model.joint_epochs must be an integer >= 0, got {joint_epochs}")
    need(isinstance(adapter_rank, int) and adapter_rank >= 1, f"--model.adapter_rank must be >= 1, got {adapter_rank}")
    need(isinstance(num_stages, int) and num_stages >= 1, f"--model.num_stages must be >= 1, got {num_stages}")
    need(isinstance(similarity_batches, int) and similarity_batches >= 1,
         f"--model.similarity_batches must be >= 1, got {similarity_batches}")
    need(penalty_divisor is None or (_finite(penalty_divisor) and penalty_divisor > 0),
         f"--model.penalty_divisor must be > 0 (or null for L, the number of gated layers), got {penalty_divisor}")
    need(cosine_epochs is None or (isinstance(cosine_epochs, int) and cosine_epochs >= 1),
         f"--model.cosine_epochs must be an integer >= 1 (or null for --trainer.max_epochs), got {cosine_epochs}")
    need(isinstance(recalibrate_batches, int) and recalibrate_batches >= 0,
         f"--model.recalibrate_batches must be an integer >= 0 (0: keep the training-time statistics), "
         f"got {recalibrate_batches}")
    need(isinstance(freeze_gates_epochs, int) and freeze_gates_epochs >= 0,
         f"--model.freeze_gates_epochs must be an integer >= 0, got {freeze_gates_epochs}")
    need(penalty in PENALTIES, f"--model.penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
    need(penalty_divisor is None or penalty != "params",
         "--model.penalty_divisor replaces L in the 'layers' penalty; --model.penalty params (the default with "
         "--model.budget) weights each layer by its share of the gated parameters and takes no divisor (drop the "
         "divisor, or pass --model.penalty layers)")
    need(budget is None or (_finite(budget) and 0 < budget <= 1),
         f"--model.budget is the fraction of the backbone each task may store, in (0, 1] (0.2 = 20 %), got {budget}")
    need(_finite(budget_rate) and budget_rate > 0, f"--model.budget_rate must be a finite number > 0, got {budget_rate}")
    need(budget is None or taps,
         "--model.budget needs a mode that learns TAPS gates (incremental, joint, memory_efficient); "
         "the other modes store a fixed size per task")
    if taps:
        need(_finite(lam) and lam >= 0,
             f"--model.lam must be a finite number >= 0 (a negative lambda rewards large scores), got {lam}")
        need(_finite(threshold) and threshold > 0,
             f"--model.threshold (tau) must be a finite number > 0 (the penalty drives scores to 0, so a layer "
             f"can only switch off below a positive tau; paper: 0.1), got {threshold}")
        need(_finite(score_init), f"--model.score_init must be a finite number, got {score_init}")
        if _finite(threshold) and _finite(score_init) and score_init < threshold:
            problems.append(
                f"--model.score_init {score_init} < --model.threshold {threshold}: every layer starts off with a "
                "zero delta, so its score gradient <dL/dw, delta> is 0 and no layer can ever switch on; the run "
                "would be a linear probe. Use score_init >= threshold (paper: 0.15 and 0.1), or --model.mode linear")
    if problems:
        raise SettingsError("invalid settings:\n  - " + "\n  - ".join(problems))


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
