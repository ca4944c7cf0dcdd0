"""Store a task in a few percent of a model, load it back, and fold it into a plain model.

A task file (``.safetensors``, no pickle) holds only what the task adds to the shared base:
the deltas of its *active* layers, all its scores (one scalar per layer), its norms and its
head, plus metadata that ties it to the base it was trained on.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ..core.config import StartsOffWarning
from ..core.gate import gate_open
from ..core.inject import restore_classifier
from ..models.taps_model import TASK_NAME, TapsModel
from ..models.multitask import MultiTaskModel
from ..core.signature import base_fingerprint, layout_signature
from ..errors import TaskFileError
from .atomic import atomic_write

__all__ = ["save_task", "load_task", "merge", "task_metadata", "layout_signature", "base_fingerprint", "TaskFileError"]


def _class_names_metadata(model, task: str, class_names: Sequence[str] | None) -> dict[str, str]:
    """``{"class_names": JSON list}``, checked against the task's head (empty when not given)."""
    if class_names is None:
        return {}
    names, num_classes = [str(n) for n in class_names], model.heads[task].out_features
    if len(names) != num_classes:
        raise ValueError(f"task {task!r}: {len(names)} class names for {num_classes} classes")
    return {"class_names": json.dumps(names)}


#: The task-file formats, by the ``task_file_kind`` a model declares: this module is their one owner
#: (it writes the ``format`` key, lays out the tensors and reads both back).
TASK_FORMATS = {"taps": "taps-task/1", "progressive": "progressive-task/1", "lora": "lora-task/1"}
#: What loads each kind of task file, for the message refusing it elsewhere.
_LOADED_BY = {"taps": "a TapsModel (--model.mode incremental, joint or memory_efficient)",
              "lora": "a LoRAModel (--model.mode lora)"}


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], task: str) -> None:
    """Refuse non-finite values, then write atomically (a temporary file renamed into place),
    so an interrupted export never leaves a truncated task file behind."""
    check_finite(tensors, f"save_task({task!r}) to {path}", _DIVERGED, error=ValueError)
    data = safetensors_bytes({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data), f"task file of {task!r}")


def save_task(model: MultiTaskModel, task: str, path: str | os.PathLike,
              class_names: Sequence[str] | None = None) -> Path:
    """Write what ``task`` adds to the shared base to ``path`` (.safetensors): for a
    :class:`TapsModel` its active deltas, scores, norms and head; for progressive adapters the
    task's path through the shared and task-specific adapters, its norms and head.
    ``class_names`` (one per output of the head, optional) go into the metadata, so that
    predictions can be named without the dataset (:func:`task_metadata` reads them back).
    """
    model._check_task(task)
    if model.task_file_kind is None:
        raise TaskFileError(f"{type(model).__name__} has no task files; it stores tasks in its checkpoint")
    tensors = task_file_tensors(model, task)
    metadata = {"format": TASK_FORMATS[model.task_file_kind], **model.task_file_metadata(task)}
    metadata.update(_class_names_metadata(model, task, class_names))
    if "base_fingerprint" in metadata:  # the same whatever --trainer.precision the base had
        dtype = _base_dtype(model)
        metadata["base_fingerprint"] = _file_fingerprint(model)
        if dtype != FILE_FLOAT_DTYPE:
            metadata["base_dtype"] = str(dtype).replace("torch.", "")
    path = Path(path)
    _write(tensors, path, metadata, task)
    return path


def file_key(local: str, layer: str) -> str:
    """A layer's tensor in a task file: ``delta`` of ``conv1`` -> ``delta.conv1``, ``norm.weight``
    of ``bn1`` -> ``norm.bn1.weight`` (what every task file, TAPS or progressive, is keyed by)."""
    first, _, rest = local.partition(".")
    return f"{first}.{layer}" + (f".{rest}" if rest else "")


#: The dtype of every floating-point tensor in a task file, whatever precision trained the task
#: (64-true, bf16-true, 16-true...): a file is then loadable onto any model, and what it holds never
#: depends on the --trainer.precision of the run that wrote it.
FILE_FLOAT_DTYPE = torch.float32


def task_file_tensors(model: MultiTaskModel, task: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``task``'s file: each per-task layer's :meth:`~TaskLayer.task_state` under
    :func:`file_key`, and the head as ``head.<key>``; floating-point ones as :data:`FILE_FLOAT_DTYPE`."""
    tensors = {file_key(k, name): v for name, layer in model.task_layers() for k, v in layer.task_state(task).items()}
    tensors.update({f"head.{k}": v.detach() for k, v in model.heads[task].state_dict().items()})
    return {k: v.to(FILE_FLOAT_DTYPE) if v.is_floating_point() else v for k, v in tensors.items()}


#: Floating dtypes a base may have been trained in (``--trainer.precision`` 64-true, 32-true, bf16-true, 16-true).
_BASE_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def _base_dtype(model: MultiTaskModel) -> torch.dtype:
    return next((p.dtype for p in model.shared_parameters() if p.is_floating_point()), torch.float32)


def _file_fingerprint(model: MultiTaskModel, rounded_to: torch.dtype | None = None) -> str:
    """:func:`base_fingerprint` of the shared weights as :data:`FILE_FLOAT_DTYPE`, after rounding them to
    ``rounded_to`` (the dtype the task was trained on): a task trained with a float64 or bf16 base matches
    the float32 base it came from (what evaluate and predict build before applying their precision).
    For a float32 base it is :func:`base_fingerprint` itself, as in files written before."""
    import hashlib

    h = hashlib.sha256()
    for p in model.shared_parameters():
        t = p.detach().cpu()
        if t.is_floating_point():
            t = t.to(rounded_to or t.dtype).to(FILE_FLOAT_DTYPE)
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _held_dtypes(model: MultiTaskModel) -> dict[str, torch.dtype]:
    """The dtype ``model`` holds for each task-file key, read from its existing tasks; a key no task holds
    now (a closed layer's delta) has the dtype of the model's floating-point weights."""
    floating = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    held: dict[str, torch.dtype] = {}
    for task in model.tasks:
        for name, layer in model.task_layers():
            for k, v in layer.task_state(task).items():
                held.setdefault(file_key(k, name), v.dtype)
        for k, v in model.heads[task].state_dict().items():
            held.setdefault(f"head.{k}", v.dtype)
    return {k: held.get(k, torch.long if k.endswith("num_batches_tracked") else floating)
            for k in _expected_tensors(model, 1)}


def _wrong_dtypes(tensors: dict[str, torch.Tensor], model: MultiTaskModel) -> list[str]:
    """Entries whose dtype is not the one the model holds for them (a floating tensor may also be
    :data:`FILE_FLOAT_DTYPE`, what save_task writes): int8 scores would become 0 and switch every layer off."""
    held = _held_dtypes(model)
    wrong = []
    for k, v in tensors.items():
        want = held.get(k)
        if want is None or v.dtype == want or (v.dtype == FILE_FLOAT_DTYPE and want.is_floating_point):
            continue
        wrong.append(f"{k} {str(v.dtype).replace('torch.', '')} (expected {str(want).replace('torch.', '')})")
    return wrong


def _is_torch_file(path: Path) -> bool:
    """A checkpoint or weights file written by ``torch.save`` (a zip archive), by its first bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _unreadable(path: Path, err: Exception) -> TaskFileError:
    if _is_torch_file(path):
        return TaskFileError(f"{path}: a torch file (a checkpoint or weights), not a .safetensors task file; give a "
                             "checkpoint to experiments.evaluate or fit with --ckpt_path, or export its tasks with "
                             "save_task")
    return TaskFileError(f"{path}: not a readable .safetensors task file ({err}); re-export it with save_task")


def _read_metadata(path: Path) -> dict[str, str]:
    """The file's metadata (its header only), or a clear error naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file; save one with taps_lightning.save_task(model, task, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def _read(path: Path, model: MultiTaskModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata, if it is a task file of the kind ``model`` loads."""
    metadata = _read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err
    kind, found = model.task_file_kind, metadata.get("format")
    if found == TASK_FORMATS["progressive"]:
        raise TaskFileError(f"{path}: a progressive-adapter task file; load_task reads TAPS and LoRA task files only "
                            "(restore progressive runs from their checkpoint)")
    if kind not in _FILE_RULES:
        raise TaskFileError(f"{type(model).__name__} loads no task files; it stores tasks in its checkpoint")
    other = next((k for k, f in TASK_FORMATS.items() if f == found and k != kind), None)
    if other in _LOADED_BY:
        raise TaskFileError(f"{path}: a {other} task file ({found}), but this model is a {type(model).__name__}; "
                            f"load it onto {_LOADED_BY[other]}")
    if found != TASK_FORMATS[kind]:
        name = "TAPS" if kind == "taps" else kind
        raise TaskFileError(
            f"{path}: not a {name} task file (format {found!r}, expected {TASK_FORMATS[kind]!r}); "
            "export tasks with taps_lightning.save_task"
        )
    return tensors, metadata


def _meta(path: Path, meta: dict[str, str], key: str, parse=str):
    """``parse(meta[key])``, or a :class:`TaskFileError` naming the file and the key."""
    if key not in meta:
        raise TaskFileError(f"{path}: metadata key {key!r} is missing; the file is damaged or was not written by "
                            "save_task: re-export the task with taps_lightning.save_task")
    try:
        return parse(meta[key])
    except (TypeError, ValueError, KeyError) as err:
        raise TaskFileError(f"{path}: metadata {key}={meta[key]!r} is malformed ({err}); re-export the task "
                            "with taps_lightning.save_task") from err


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    return value


def _json_of(kind: type) -> Any:
    def parse(text: str):
        value = json.loads(text)
        if not isinstance(value, kind):
            raise ValueError(f"expected a JSON {kind.__name__}")
        return value
    return parse


def _string_list(text: str) -> list[str]:
    names = _json_of(list)(text)
    if not all(isinstance(n, str) for n in names):
        raise ValueError("expected a JSON list of strings")
    return names


#: Every metadata key a task file (TAPS or progressive) may hold, with its parser: the one place that
#: says what a valid value is. A present key that does not parse is a TaskFileError naming the file
#: and the key; which keys must be present depends on the reader (load_task needs more than predict).
METADATA_FIELDS: dict[str, Any] = {
    "format": str, "task": str, "backbone": str, "threshold": _finite_float, "num_classes": _positive_int,
    "gated_layers": _count, "active_layers": _count, "layout_signature": str, "base_fingerprint": str,
    "layer_order": _json_of(list), "class_names": _string_list, "schedule": _json_of(list),
    "groups": _json_of(dict), "path": _json_of(list), "base_dtype": lambda text: _BASE_DTYPES[text],
    "lora_rank": _positive_int, "lora_alpha": _finite_float, "lora_grouped_convs": str, "task_layout_signature": str,
}


def checked_metadata(path: Path, meta: dict[str, str], required: Sequence[str] = ()) -> dict[str, Any]:
    """Every known key of ``meta`` parsed (:data:`METADATA_FIELDS`), the ``required`` ones present, and
    the class names one per class; a bad or missing one is a :class:`TaskFileError` naming the file and
    the key. Returns the parsed values (unknown keys as stored)."""
    for key in required:
        _meta(path, meta, key)
    parsed: dict[str, Any] = dict(meta)
    for key, parse in METADATA_FIELDS.items():
        if key in meta:
            parsed[key] = _meta(path, meta, key, parse)
    names, count = parsed.get("class_names"), parsed.get("num_classes")
    if names is not None and count is not None and len(names) != count:
        raise TaskFileError(f"{path}: metadata class_names is malformed (a JSON list of {count} names expected) "
                            f"but has {len(names)}; re-export the task with save_task")
    active, gated = parsed.get("active_layers"), parsed.get("gated_layers")
    if isinstance(active, int) and isinstance(gated, int) and active > gated:
        raise TaskFileError(f"{path}: metadata active_layers={active} exceeds gated_layers={gated}; "
                            "re-export the task with save_task")
    return parsed


def check_finite(tensors: dict[str, torch.Tensor], where: str, fix: str,
                 error: type[Exception] = TaskFileError) -> None:
    """Refuse NaN/inf in any floating tensor, naming the first offending entries."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise error(f"{where}: non-finite values (NaN/inf) in {', '.join(bad[:3])}{more}; {fix}")


_DIVERGED = ("the task's weights diverged; export a checkpoint from before the divergence "
             "(e.g. best-*.ckpt) or retrain with a lower --model.lr")


def _expected_tensors(model: TapsModel, num_classes: int) -> dict[str, torch.Size]:
    """Every key a task file for ``model`` may hold, with its exact shape (deltas optional)."""
    shapes = {file_key(k, name): shape for name, layer in model.task_layers() for k, shape in layer.state_shapes().items()}
    shapes["head.weight"] = torch.Size([num_classes, model.num_features])
    shapes["head.bias"] = torch.Size([num_classes])
    return shapes


def _validate(path: Path, tensors: dict[str, torch.Tensor], model: TapsModel, num_classes: int) -> None:
    """Every tensor present, of exactly the right shape, dtype and finite; then the kind's own rule."""
    rule = _FILE_RULES[model.task_file_kind]
    expected = _expected_tensors(model, num_classes)
    fix = "re-export the task with save_task"
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise TaskFileError(f"{path}: unexpected tensors {unexpected[:3]} (not in this model's layout); {fix}")
    missing = sorted(k for k in expected if k not in tensors and not (rule.optional and k.startswith(rule.optional)))
    if missing:
        raise TaskFileError(f"{path}: incomplete task file, missing {missing[:3]}"
                            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}; {fix}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in tensors.items()
             if v.shape != expected[k]]
    if wrong:
        raise TaskFileError(f"{path}: wrong tensor shapes: {'; '.join(wrong[:3])}; {fix}")
    wrong = _wrong_dtypes(tensors, model)
    if wrong:
        raise TaskFileError(f"{path}: wrong tensor dtypes: {'; '.join(wrong[:3])}"
                            f"{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}; {fix}")
    check_finite(tensors, str(path), fix)
    if rule.check_tensors is not None:
        rule.check_tensors(path, tensors, model, fix)


def _layout_refused(path: Path, meta: dict[str, Any], model: MultiTaskModel, ours: str, key: str) -> None:
    if meta[key] != ours:
        raise TaskFileError(
            f"{path}: made for backbone {meta['backbone']!r} (layout {meta[key]}), "
            f"but this model is {model.backbone_name!r} (layout {ours}); "
            f"create the model from {meta['backbone']!r} to load it"
        )


def _check_taps_file(path: Path, meta: dict[str, Any], raw: dict[str, str], model: TapsModel) -> None:
    """A TAPS file: the same gated layers and norms, and the same threshold."""
    _layout_refused(path, meta, model, layout_signature(model), "layout_signature")
    if meta["threshold"] != model.threshold:
        raise TaskFileError(f"{path}: saved with threshold {raw['threshold']}, this model uses {model.threshold}; "
                            f"create the model with threshold={raw['threshold']}")


def _check_lora_file(path: Path, meta: dict[str, Any], raw: dict[str, str], model) -> None:
    """A LoRA file: the same rank, alpha and grouped-convolution variant (each named by its flag),
    then the same adapted layers and norms."""
    wrong = [f"--model.{key} {raw[key]} (this model: {ours})" for key, ours in (
        ("lora_rank", model.rank), ("lora_alpha", model.alpha), ("lora_grouped_convs", model.grouped_convs))
        if meta[key] != ours]
    if wrong:
        raise TaskFileError(f"{path}: trained with {', '.join(wrong)}; build the model with the file's settings "
                            "(experiments.evaluate/predict take them from the files)")
    _layout_refused(path, meta, model, model.file_layout(), "task_layout_signature")


def _check_taps_deltas(path: Path, tensors: dict[str, torch.Tensor], model: TapsModel, fix: str) -> None:
    """A TAPS file may leave out a closed layer's delta, never an active one's."""
    for name, _ in model.taps_layers():
        score, delta = tensors[file_key("score", name)], file_key("delta", name)
        if gate_open(score.reshape(()), model.threshold) and delta not in tensors:
            raise TaskFileError(f"{path}: layer {name} is active (score {score.item():.4g}) but its delta "
                                f"{delta} is missing; {fix}")


@dataclass(frozen=True)
class _FileRule:
    """How a task file of one loadable kind is checked against the model."""

    check_metadata: Callable[..., None]  # (path, parsed metadata, raw metadata, model)
    required: tuple[str, ...]  # the metadata keys check_metadata reads
    optional: str | None = None  # prefix of the tensors a file may leave out
    check_tensors: Callable[..., None] | None = None  # (path, tensors, model, fix), after the common checks


_FILE_RULES = {
    "taps": _FileRule(_check_taps_file, ("layout_signature", "threshold"), optional="delta.",
                      check_tensors=_check_taps_deltas),
    "lora": _FileRule(_check_lora_file, ("lora_rank", "lora_alpha", "lora_grouped_convs", "task_layout_signature")),
}


def load_task(model: TapsModel, path: str | os.PathLike, task: str | None = None, strict_base: bool = True) -> str:
    """Add (or replace) the task stored in ``path``; returns its name.

    The whole file is checked first (metadata, every key and exact shape, finite values);
    only then is the model changed, so a file that is refused leaves the model as it was,
    including a task of the same name.

    Args:
        model: a ``TapsModel`` (or ``LoRAModel``, for a LoRA file) on the same backbone and
            settings the file was made with.
        path: a file written by :func:`save_task`.
        task: name to load it under (default: the name stored in the file).
        strict_base: refuse a file trained on other shared weights (e.g. a joint-mode task
            loaded onto the pre-trained base). ``False`` loads it anyway.
    """
    path = Path(path)
    tensors, raw = _read(path, model)
    rule = _FILE_RULES[model.task_file_kind]
    meta = checked_metadata(path, raw, (*rule.required, "backbone", "base_fingerprint", "num_classes",
                                        *(() if task else ("task",))))
    rule.check_metadata(path, meta, raw, model)
    fingerprint = meta["base_fingerprint"]
    if strict_base and fingerprint != (ours := _file_fingerprint(model, meta.get("base_dtype"))):
        raise TaskFileError(
            f"{path}: trained on different shared weights than this model's (base fingerprint "
            f"{fingerprint} vs {ours}); load the same pre-trained or jointly "
            "trained base first (e.g. from its checkpoint), or pass strict_base=False"
        )
    num_classes = meta["num_classes"]
    task = task or meta["task"]
    if not isinstance(task, str) or not TASK_NAME.match(task):
        raise TaskFileError(f"{path}: task name {task!r} is not valid (letters, digits, '_' or '-'); "
                            "pass task=<name> to load it under another name")
    _validate(path, tensors, model, num_classes)
    # Everything is checked: now swap (nothing below can fail on the file's account).
    was_active = model.active_task == task
    if task in model.tasks:
        model.remove_task(task)
    with warnings.catch_warnings():  # the file's scores replace the initial ones below
        warnings.simplefilter("ignore", StartsOffWarning)
        model.add_task(task, num_classes)
    for name, layer in model.task_layers():
        layer.load_task_state(task, {k: tensors[file_key(k, name)] for k in layer.state_shapes()
                                     if file_key(k, name) in tensors})
    with torch.no_grad():
        model.heads[task].load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    if was_active:
        model.set_task(task)
    return task


def merge(model: MultiTaskModel, task: str) -> nn.Module:
    """A plain copy of the backbone for ``task``: each per-task layer replaced by its
    :meth:`~taps_lightning.core.task_layer.TaskLayer.merged_layer` (``w_base + I*delta`` folded in, the
    task's norm) and its head as the classifier. No TAPS code remains in its forward;
    ``model`` is not modified."""
    model._check_task(task)
    layers = list(model.task_layers())
    folded = {file_key(kind, name): t for name, layer in layers for kind, t in layer.task_tensors(task).items()}
    folded.update({f"head.{k}": v.detach() for k, v in model.heads[task].state_dict().items()})
    check_finite(folded, f"merge({task!r})", _DIVERGED, error=ValueError)
    memo: dict[int, object] = {id(layer): layer.merged_layer(task) for _, layer in layers}
    merged = copy.deepcopy(model.backbone, memo)
    merged = restore_classifier(merged, model.classifier, copy.deepcopy(model.heads[task]))
    merged.requires_grad_(True)
    return merged.train(model.training)


def task_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a task file (``task``, ``backbone``, ``num_classes``, ...) without reading
    its tensors; ``class_names`` is decoded to a list, or ``None`` when the file has none."""
    path = Path(path)
    metadata: dict[str, Any] = _read_metadata(path)
    parsed = checked_metadata(path, metadata)  # every known key valid, or a TaskFileError naming it
    metadata["class_names"] = parsed.get("class_names")
    return metadata
