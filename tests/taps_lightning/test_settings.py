"""``taps_lightning.training.settings``: each typed group of ``TapsModule`` settings checks its own ranges, and
settings that would make a run meaningless are refused before any compute, every problem at once,
each naming the flag, the value given and what to set instead."""
import dataclasses

import pytest
import torch

from helpers import TINY
from taps_lightning.training.checks import SettingsError
from taps_lightning.training.settings import (EvaluationSettings, GateSettings, ModeSettings, OptimizerSettings,
                                     check_settings)
from taps_lightning.training.compose import create_taps_module, flag_defaults


def settings_of(cls, **flags):
    """A settings group of the default flags with ``flags`` changed (the defaults are the composition root's)."""
    return cls.of({**flag_defaults(), **flags})


@pytest.mark.parametrize("settings,message", [
    (dict(lam=-0.5), r"--model.lam must be a finite number >= 0 \(a negative lambda rewards large scores\), got -0.5"),
    (dict(lam=float("nan")), r"--model.lam must be a finite number >= 0"),
    (dict(threshold=0.2, score_init=0.15), r"--model.score_init 0.15 < --model.threshold 0.2: .*no layer can ever "
                                           r"switch on.*linear probe"),
    (dict(threshold=0.0, score_init=0.15), r"--model.threshold \(tau\) must be a finite number > 0"),
    (dict(lr=0.0), r"--model.lr must be a finite number > 0, got 0.0"),
    (dict(lr=float("inf")), r"--model.lr must be a finite number > 0"),
    (dict(score_lr=-1.0), r"--model.score_lr must be a finite number > 0"),
    (dict(momentum=1.0), r"--model.momentum must be in \[0, 1\)"),
    (dict(weight_decay=-1e-4), r"--model.weight_decay must be >= 0"),
    (dict(sparsity_warmup_epochs=-1), r"--model.sparsity_warmup_epochs must be an integer >= 0"),
])
def test_meaningless_settings_are_refused_with_the_flag(settings, message):
    with pytest.raises(ValueError, match=message):
        create_taps_module(tasks={"a": 3}, **{**TINY, **settings})


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as info:
        create_taps_module(tasks={"a": 3}, **{**TINY, "lam": -1.0, "lr": -1.0})
    assert "--model.lam" in str(info.value) and "--model.lr" in str(info.value)


# -- the rules themselves, called directly on the typed groups ---------------------------------------
GROUPS = (OptimizerSettings, ModeSettings, GateSettings, EvaluationSettings)
#: Settings every rule accepts (the paper's and the defaults'): each test changes one or a few.
GOOD = dict(lam=0.5, threshold=0.1, score_init=0.15, lr=0.01, momentum=0.9, weight_decay=0.0,
            score_lr=None, sparsity_warmup_epochs=3, joint_epochs=1, adapter_rank=8, num_stages=4,
            similarity_batches=8, budget_rate=0.05)


def _check(taps: bool = True, **settings) -> None:
    hparams = {**flag_defaults(), **GOOD, **settings}
    check_settings(*(group.of(hparams) for group in GROUPS), learns_gates=taps)


def _problems(**settings) -> list[str]:
    """The problems the groups list for ``GOOD`` changed by ``settings``, one per line."""
    with pytest.raises(SettingsError) as info:
        _check(**settings)
    head, *problems = str(info.value).split("\n  - ")
    assert head == "invalid settings:"
    return problems


def test_good_settings_pass_and_gate_settings_bind_only_modes_with_gates():
    assert _check() is None
    gates = dict(lam=-1.0, threshold=0.0, score_init=float("nan"))
    assert _check(taps=False, **gates) is None  # a baseline has no gates
    assert len(_problems(**gates)) == 3


def test_every_setting_of_the_module_belongs_to_exactly_one_group_or_is_the_network():
    """A flag can be followed to the one group that reads and checks it."""
    owners = {}
    for group in GROUPS:
        for f in dataclasses.fields(group):
            owners.setdefault(f.name, []).append(group.__name__)
    assert all(len(groups) == 1 for name, groups in owners.items() if name != "backbone"), owners
    arguments = set(flag_defaults())
    network = {"backbone", "tasks", "mode", "pretrained", "weights", "weights_sha256", "timm_kwargs"}
    assert arguments - network == set(owners) - {"backbone"}


def test_a_group_takes_its_own_fields_from_the_hyper_parameters_and_ignores_the_rest():
    opt = OptimizerSettings.of({**flag_defaults(), "lr": 0.2, "score_lr": None, "lam": 3.0, "tasks": {"a": 1}})
    assert (opt.lr, opt.scores_lr, opt.momentum) == (0.2, 0.2, 0.9)  # the other flags' defaults
    with pytest.raises(TypeError, match=r"OptimizerSettings.of: no value for \['momentum'"):
        OptimizerSettings.of({"lr": 0.2, "score_lr": None, "nesterov": False})  # the defaults are the root's alone
    assert OptimizerSettings.of({**flag_defaults(), "lr": 0.2, "score_lr": 0.5}).scores_lr == 0.5


@pytest.mark.parametrize("settings, flag, rule", [
    (dict(lr=True), "--model.lr", "a finite number > 0, got True"),  # a bool is no learning rate
    (dict(momentum=-0.1), "--model.momentum", "in [0, 1), got -0.1"),
    (dict(joint_epochs=1.5), "--model.joint_epochs", "an integer >= 0, got 1.5"),
    (dict(adapter_rank=0), "--model.adapter_rank", ">= 1, got 0"),
    (dict(num_stages=0), "--model.num_stages", ">= 1, got 0"),
    (dict(similarity_batches=0), "--model.similarity_batches", ">= 1, got 0"),
    (dict(penalty_divisor=0), "--model.penalty_divisor", "> 0 (or null for L, the number of gated layers), got 0"),
    (dict(scheduler="cos"), "--model.scheduler", "one of cosine (per epoch), cosine_step (per optimizer step), none"),
    (dict(cosine_epochs=2.5), "--model.cosine_epochs", "an integer >= 1 (or null for --trainer.max_epochs), got 2.5"),
    (dict(recalibrate_batches=-1), "--model.recalibrate_batches",
     "an integer >= 0 (0: keep the training-time statistics), got -1"),
    (dict(freeze_gates_epochs=-2), "--model.freeze_gates_epochs", "an integer >= 0, got -2"),
    (dict(penalty="sum"), "--model.penalty", "one of layers, params, got 'sum'"),
    (dict(penalty="params", penalty_divisor=52), "--model.penalty_divisor",
     "drop the divisor, or pass --model.penalty layers"),
    (dict(budget=1.2), "--model.budget", "in (0, 1] (0.2 = 20 %), got 1.2"),
    (dict(budget_rate=float("inf")), "--model.budget_rate", "a finite number > 0, got inf"),
    (dict(budget=0.2, taps=False), "--model.budget",
     "needs a mode that learns TAPS gates (incremental, joint, memory_efficient)"),
    (dict(threshold=float("inf")), "--model.threshold", "a finite number > 0"),
    (dict(score_init=float("nan")), "--model.score_init", "a finite number, got nan"),
    (dict(score_init=0.05), "--model.score_init 0.05 < --model.threshold 0.1",
     "Use score_init >= threshold (paper: 0.15 and 0.1), or --model.mode linear"),
])
def test_each_bad_setting_is_one_problem_naming_the_flag_and_the_fix(settings, flag, rule):
    problems = _problems(**settings)
    assert len(problems) == 1, problems
    assert problems[0].startswith(flag) and rule in problems[0], problems[0]


def test_every_problem_is_one_line_in_the_order_of_the_flags():
    problems = _problems(lr=-1.0, momentum=2.0, num_stages=0, lam=-1.0)
    assert [p.split(" ")[0] for p in problems] == ["--model.lr", "--model.momentum", "--model.num_stages",
                                                   "--model.lam"]


# -- what the groups are ------------------------------------------------------------------------------
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_a_group_is_frozen_once_built(group):
    settings = settings_of(group)
    for f in dataclasses.fields(group):
        before = getattr(settings, f.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, f.name, "changed")
        assert getattr(settings, f.name) is before


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_the_defaults_of_every_group_pass_its_own_checks(group):
    assert settings_of(group).problems(learns_gates=True) == [] and settings_of(group).problems(learns_gates=False) == []


def test_the_scores_train_at_the_learning_rate_unless_they_have_their_own():
    assert settings_of(OptimizerSettings, lr=0.3).scores_lr == 0.3
    assert settings_of(OptimizerSettings, lr=0.3, score_lr=None).scores_lr == 0.3
    assert settings_of(OptimizerSettings, lr=0.3, score_lr=0.7).scores_lr == 0.7
    assert settings_of(OptimizerSettings, lr=0.3, score_lr=1e-6).scores_lr == 1e-6  # a small rate is a rate, not "unset"


def test_nesterov_reaches_sgd_only_with_momentum_which_torch_requires():
    assert settings_of(OptimizerSettings, nesterov=True, momentum=0.9).sgd_nesterov is True
    assert settings_of(OptimizerSettings, nesterov=False, momentum=0.9).sgd_nesterov is False
    off = settings_of(OptimizerSettings, nesterov=True, momentum=0.0)
    assert off.sgd_nesterov is False
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.0, nesterov=True)
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=off.momentum, nesterov=off.sgd_nesterov)


# -- the edges of the ranges ----------------------------------------------------------------------------
#: The smallest positive float: "> 0" must accept it.
TINIEST = 5e-324
#: The largest float below 1: "< 1" must accept it.
BELOW_ONE = 1 - 2 ** -53


@pytest.mark.parametrize("settings", [
    dict(lr=TINIEST), dict(score_lr=TINIEST), dict(momentum=0), dict(momentum=0.0), dict(momentum=BELOW_ONE),
    dict(weight_decay=0.0), dict(cosine_epochs=1), dict(sparsity_warmup_epochs=0), dict(joint_epochs=0),
    dict(adapter_rank=1), dict(num_stages=1), dict(similarity_batches=1), dict(threshold=TINIEST, score_init=0.15),
    dict(threshold=0.2, score_init=0.2),  # score_init == tau: the gate (s >= tau) starts open
    dict(lam=0.0), dict(penalty_divisor=TINIEST), dict(budget=1.0), dict(budget=1), dict(budget=TINIEST),
    dict(budget_rate=TINIEST), dict(freeze_gates_epochs=0), dict(recalibrate_batches=0),
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_a_value_exactly_at_the_edge_of_its_range_is_accepted(settings):
    assert _check(**settings) is None


@pytest.mark.parametrize("settings", [
    dict(lr=0), dict(lr=-TINIEST), dict(score_lr=0.0), dict(momentum=1), dict(momentum=-TINIEST),
    dict(weight_decay=-TINIEST), dict(cosine_epochs=0), dict(sparsity_warmup_epochs=-1), dict(joint_epochs=-1),
    dict(joint_epochs=True), dict(num_stages=True),  # a bool is no count
    dict(adapter_rank=0), dict(similarity_batches=0), dict(threshold=0.0),
    dict(threshold=0.2, score_init=0.2 - 2 ** -55),  # the float just below tau
    dict(lam=-TINIEST), dict(penalty_divisor=0.0), dict(budget=0.0), dict(budget=1 + 2 ** -52), dict(budget=True),
    dict(budget_rate=0.0), dict(freeze_gates_epochs=-1), dict(recalibrate_batches=-1),
    dict(recalibrate_batches=2.0),  # a float is no count, even a whole one
], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_a_value_just_outside_its_range_is_one_problem_naming_its_flag(settings):
    flag = "--model." + list(settings)[-1]  # the setting whose rule is broken is the last one given
    problems = _problems(**settings)
    assert len(problems) == 1 and problems[0].startswith(flag + " "), problems


def test_a_mode_without_gates_skips_only_the_gate_rules():
    gate_rules = dict(lam=-1.0, threshold=0.0, score_init=float("nan"))
    others = dict(lr=0.0, momentum=1.0, num_stages=0, penalty="sum", budget_rate=0.0, recalibrate_batches=-1)
    hparams = {**flag_defaults(), **GOOD, **gate_rules, **others}
    flags = {group.__name__: [p.split(" ")[0] for p in group.of(hparams).problems(learns_gates=False)]
             for group in GROUPS}
    assert flags == {"OptimizerSettings": ["--model.lr", "--model.momentum"], "ModeSettings": ["--model.num_stages"],
                     "GateSettings": ["--model.penalty", "--model.budget_rate"],
                     "EvaluationSettings": ["--model.recalibrate_batches"]}
    with_gates = [p.split(" ")[0] for g in GROUPS for p in g.of(hparams).problems(learns_gates=True)]
    assert set(with_gates) - {f for fs in flags.values() for f in fs} == {"--model.lam", "--model.threshold",
                                                                           "--model.score_init"}


def test_a_start_below_tau_is_a_problem_only_for_a_mode_with_gates():
    assert settings_of(ModeSettings, threshold=0.5, score_init=0.1).problems(learns_gates=False) == []
    assert len(settings_of(ModeSettings, threshold=0.5, score_init=0.1).problems(learns_gates=True)) == 1
