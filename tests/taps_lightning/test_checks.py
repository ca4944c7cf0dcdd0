"""``taps_lightning.checks``: settings that would make a run meaningless are refused before any
compute, every problem at once, each naming the flag, the value given and what to set instead."""
import pytest

from helpers import TINY
from taps_lightning.module import TapsModule


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
        TapsModule(tasks={"a": 3}, **{**TINY, **settings})


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as info:
        TapsModule(tasks={"a": 3}, **{**TINY, "lam": -1.0, "lr": -1.0})
    assert "--model.lam" in str(info.value) and "--model.lr" in str(info.value)
