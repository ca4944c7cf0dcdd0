"""The composition root: the flat ``--model.*`` flags in, a :class:`TapsModule` ready to train out.

:func:`create_taps_module` is what ``experiments.fit`` hands to ``LightningCLI`` as its model
(a callable ``model_class``), so its signature is the flag list: every flag's name, type,
default and documentation is declared here and nowhere else. It sorts the flags into the typed
settings groups (each checks its own ranges; every problem is refused at once), builds the
backbone, the mode, the multi-task model and the lambda policy, and gives them to the module,
which only trains what it receives. The flags as given are the module's hyper-parameters, so a
checkpoint records them and :func:`module_from_checkpoint` rebuilds the module from them.
"""
from __future__ import annotations

import inspect
import os
import types
import typing
from typing import Any, Mapping

import torch

from ..core.config import SCORE_INIT, THRESHOLD
from ..errors import CheckpointError, SettingsError
from ..models.factory import check_weights_file, create_backbone, input_mean_std
from ..models.lora import DEFAULT_LORA_RANK
from ..models.progressive import DEFAULT_ADAPTER_RANK
from .budget import DEFAULT_BUDGET_RATE, create_lambda_policy
from .checks import normalize_sha256
from .lightning_module import TapsModule
from .modes import MODE_FLAGS, Mode, mode_class, unused_flags
from .settings import (DEFAULT_RECALIBRATE_BATCHES, EvaluationSettings, GateSettings, ModeSettings,
                       OptimizerSettings, check_settings)

__all__ = ["create_taps_module", "flag_defaults", "module_from_checkpoint", "refuse_unused_flags",
           "unread_flag_defaults", "NETWORK_FLAGS"]

#: Flags that say which network to build (checked where it is built, :mod:`~taps_lightning.models.factory`).
NETWORK_FLAGS = ("backbone", "pretrained", "weights", "weights_sha256", "timm_kwargs")


def create_taps_module(
    backbone: str = "resnet50",
    tasks: dict[str, int] | None = None,
    mode: str = "incremental",
    lam: float = 0.5,
    threshold: float = THRESHOLD,
    score_init: float = SCORE_INIT,
    sparsity_warmup_epochs: int = 3,
    joint_epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    score_lr: float | None = None,
    scheduler: str = "cosine",
    cosine_epochs: int | None = None,
    penalty_divisor: float | None = None,
    penalty: str | None = None,
    budget: float | None = None,
    budget_rate: float = DEFAULT_BUDGET_RATE,
    pretrained: bool = False,
    weights: str | None = None,
    weights_sha256: str | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    adapter_rank: int = DEFAULT_ADAPTER_RANK,
    num_stages: int = 4,
    adapter_schedule: list[int] | None = None,
    similarity_epochs: int = 1,
    similarity_batches: int = 8,
    recompute_weight: bool = True,
    recalibrate_batches: int = DEFAULT_RECALIBRATE_BATCHES,
    freeze_gates_epochs: int = 0,
    lora_rank: int = DEFAULT_LORA_RANK,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_grouped_convs: str = "frozen",
) -> TapsModule:
    """Build the module that trains one backbone on several tasks with TAPS or a baseline.

    Args:
        backbone: timm model name (``timm.list_models()``).
        tasks: ``{task: num_classes}``; ``experiments.fit`` fills it from the DataModule.
        mode: ``incremental`` (Eq. 3: frozen base, each task adapts on its own),
            ``joint`` (Eq. 4: base trained with all tasks), ``memory_efficient`` (Sec. 3.3: the
            base and task heads/norms trained jointly for ``joint_epochs``, then incremental
            TAPS on that base), ``finetune`` (a full copy per task), ``linear`` (frozen
            feature extractor, heads only), ``joint_finetune`` (one shared backbone, heads),
            ``progressive`` (progressive task-specific LoRA adapters grouped by gradient similarity),
            ``lora`` (Hugging Face PEFT's LoRA, one adapter per task, frozen backbone, task norms
            and heads as TAPS; a flag of another mode is refused).
        lam: ``lambda``, weight of the sparsity penalty ``(1/L) sum |s|`` (not used with a ``budget``).
        threshold: ``tau``.
        score_init: initial layer score (above ``tau``: every layer starts task-specific).
        sparsity_warmup_epochs: epochs of TAPS training before the penalty starts (3: the authors'
            script penalises from epoch index ``warmup_epochs + 1`` = 3).
        joint_epochs: memory-efficient mode: length of the joint phase.
        lr: learning rate (SGD with momentum; the paper's optimiser).
        momentum: SGD momentum, in ``[0, 1)``.
        nesterov: Nesterov momentum (off: the authors' script builds plain-momentum SGD).
        weight_decay: applied to all trained weights except the scores.
        score_lr: learning rate of the scores (default: ``lr``).
        scheduler: ``cosine`` (per epoch, as the authors' ``CosineAnnealingLR``), ``cosine_step``
            (per optimizer step) or ``none``.
        cosine_epochs: length of the per-epoch cosine (default ``trainer.max_epochs``); the
            authors' script runs one epoch past its 30-epoch cosine, at learning rate 0.
        penalty_divisor: divide ``sum |s|`` by this instead of ``L`` (the authors' script: 52).
        penalty: ``layers`` (the paper's ``(1/L) sum |s_i|``: every layer costs the same) or
            ``params`` (``sum (n_i/N) |s_i|``: each layer costs its share of the gated weights).
            Default: ``params`` with a ``budget`` (the Lagrangian of "stored fraction <= budget"
            is exactly that sum), ``layers`` without.
        budget: storage budget ``F`` in (0, 1]: the fraction of the backbone's parameters each
            task may store. ``lambda`` then becomes per task and is adjusted every step by dual
            ascent (:class:`~taps_lightning.training.budget.BudgetController`, from 0 when the
            warm-up ends; ``lam`` is not used) so that each task ends at most at ``F``; at each
            epoch's end an over-budget task's lowest-score layers are switched off, and
            checkpoints are ranked by ``val/budget_acc``, which puts every epoch over budget
            below every epoch within it (:class:`callbacks.BudgetEnforcement`).
        budget_rate: dual-ascent step: ``lambda`` added per step per unit of fraction over budget.
        pretrained: load timm hub weights (downloads once; never in the tests).
        weights: local weights file for the backbone (see ``taps_lightning.load_weights``).
        weights_sha256: expected SHA-256 of ``weights``; a different file is refused.
        timm_kwargs: extra ``timm.create_model`` arguments (e.g. ``{"img_size": 64}``).
        adapter_rank: progressive mode: LoRA rank.
        num_stages: progressive mode: stages the adapted layers are split into.
        adapter_schedule: progressive mode: adapters per stage (default 1, 2, 4, ..., n_tasks).
        similarity_epochs: progressive mode: warm-up epochs with all adapters shared; task
            gradients are collected during the last of them and tasks grouped at its end.
        similarity_batches: progressive mode: batches whose gradients measure task similarity.
        recompute_weight: TAPS modes: rebuild each gated weight in backward instead of saving
            it from forward (less memory, one add more per active layer; see
            docs/performance.md).
        recalibrate_batches: before every validation and test (and so before every checkpoint
            and export), re-estimate each task's own BatchNorm statistics on this many batches of
            its training images under the evaluation transform (:class:`callbacks.NormRecalibration`);
            0 keeps the training-time running averages, which go stale when gates flip late in an epoch.
        freeze_gates_epochs: TAPS modes: keep every gate as it is during the last this many
            epochs (the scores get no update; deltas, norms and heads keep training), so the
            selection settles before the end.
        lora_rank: lora mode: LoRA rank ``r`` of every adapted layer (PEFT's ``LoraConfig.r``).
        lora_alpha: lora mode: PEFT's ``lora_alpha``; the update is scaled by ``alpha / r``
            (default: ``lora_rank``, a scale of 1).
        lora_dropout: lora mode: PEFT's ``lora_dropout`` on each adapter's input.
        lora_grouped_convs: lora mode: what happens to grouped and depthwise convolutions, which
            PEFT's LoRA cannot adapt: ``frozen`` (shared, as pre-trained) or ``full`` (a full copy
            trained per task, PEFT's ``modules_to_save``).
    """
    given = {k: v for k, v in locals().items()}  # the flags as given: the module's hyper-parameters
    mode_cls = mode_class(mode)  # before anything else: the flag's allowed values
    refuse_unused_flags(mode_cls, given)
    if not tasks:
        raise SettingsError("no tasks: give `tasks={name: num_classes}` (experiments.fit takes them from --data)")
    resolved = dict(given, weights_sha256=normalize_sha256(weights_sha256))
    optimizer_settings, mode_settings = OptimizerSettings.of(resolved), ModeSettings.of(resolved)
    gate_settings, evaluation_settings = GateSettings.of(resolved), EvaluationSettings.of(resolved)
    check_settings(optimizer_settings, mode_settings, gate_settings, evaluation_settings,
                   learns_gates=mode_cls.learns_gates)
    if weights is not None:
        check_weights_file(weights, resolved["weights_sha256"])
    net = create_backbone(backbone, pretrained=pretrained, weights=weights, **(timm_kwargs or {}))
    mean_std = input_mean_std(net)
    training_mode = mode_cls(mode_settings)
    model = training_mode.build(net, dict(tasks))
    lam_policy = create_lambda_policy(model.tasks, gate_settings.lam, gate_settings.budget, gate_settings.budget_rate,
                                      minimum=model.minimum_fractions)
    module = TapsModule(model, training_mode, lam_policy, optimizer_settings, gate_settings, evaluation_settings,
                        input_mean_std=mean_std)
    module.save_hyperparameters(dict(given, weights_sha256=resolved["weights_sha256"]))  # the digest as sha256sum prints it
    return module


def refuse_unused_flags(mode_cls: type[Mode], flags: Mapping[str, Any],
                        defaults: Mapping[str, Any] | None = None) -> None:
    """For a mode that refuses them (:attr:`Mode.refuses_unused_flags`), a
    :class:`SettingsError` listing every flag changed from ``defaults`` (default:
    :func:`flag_defaults`) that the mode would not read."""
    if not mode_cls.refuses_unused_flags:
        return
    notes = unused_flags(mode_cls, flags, flag_defaults() if defaults is None else defaults)
    if notes:
        raise SettingsError(f"--model.mode {mode_cls.name} refuses flags it would not use:\n  - " + "\n  - ".join(notes)
                            + "\ndrop them (or pick the mode that reads them)")


def unread_flag_defaults(mode_cls: type[Mode]) -> dict[str, Any]:
    """The defaults of the :data:`~taps_lightning.training.modes.MODE_FLAGS` ``mode_cls`` does not read:
    what a command line with other defaults (``experiments.fit``'s) resets them to for a mode that
    refuses unused flags."""
    defaults = flag_defaults()
    return {k: defaults[k] for k in MODE_FLAGS if k not in mode_cls.reads}


def flag_defaults() -> dict[str, Any]:
    """Every ``--model.*`` flag's default, as :func:`create_taps_module` declares it."""
    return {name: p.default for name, p in inspect.signature(create_taps_module).parameters.items()}


#: Hyper-parameter keys that are not flags (Lightning's ``LightningCLI`` adds ``_instantiator``).
_NOT_FLAGS = ("_instantiator", "_class_path")


def _is_a(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the flag type ``kind`` (the annotations :func:`create_taps_module` uses)."""
    if kind is Any:
        return True
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return any(_is_a(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is dict:
        return isinstance(value, dict) and all(_is_a(k, args[0]) and _is_a(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_is_a(v, args[0]) for v in value)
    return isinstance(value, kind)


def module_flags(hparams: Mapping[str, Any], origin: str = "the checkpoint") -> dict[str, Any]:
    """The flags recorded in a checkpoint's hyper-parameters (written by this or an earlier version),
    without the keys Lightning adds; an unknown flag, or one of the wrong type (an edited file), is
    refused naming the file, the key and the type it must have."""
    flags = {k: v for k, v in hparams.items() if k not in _NOT_FLAGS}
    kinds = typing.get_type_hints(create_taps_module)
    problems = [f"{key}: not a --model flag of this version" for key in sorted(set(flags) - set(kinds))]
    problems += [f"{key}: {value!r} is not a {getattr(kinds[key], '__name__', kinds[key])}"
                 for key, value in flags.items() if key in kinds and not _is_a(value, kinds[key])]
    if problems:
        raise CheckpointError(f"{origin}: hyper-parameters that this version cannot use (the file was edited, or not "
                              "written by experiments.fit):\n  - " + "\n  - ".join(problems))
    return flags


def module_from_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", **overrides: Any) -> TapsModule:
    """The :class:`TapsModule` a checkpoint of ``experiments.fit`` was trained as, with its weights
    (read with ``weights_only=True``; ``overrides`` replace recorded flags, e.g. ``weights=None``:
    the checkpoint holds every weight)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    flags = {**module_flags(checkpoint.get("hyper_parameters") or {}, str(path)), "pretrained": False, "weights": None,
             "weights_sha256": None, **overrides}
    module = create_taps_module(**flags)
    module.load_state_dict(checkpoint["state_dict"])
    return module
