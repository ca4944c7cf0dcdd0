"""``taps_lightning.core.config``: the ``TapsConfig`` every gated layer reads refuses what no gate can
compare against, and warns when a new task could never switch a layer on."""
import warnings

import pytest
from torch import nn

import taps_lightning as tl
from taps_lightning.core.config import SCORE_INIT, THRESHOLD, StartsOffWarning, TapsConfig


def test_the_defaults_are_the_papers_tau_and_the_authors_initial_score():
    config = TapsConfig()
    assert (config.threshold, config.score_init, config.recompute_weight) == (THRESHOLD, SCORE_INIT, True) == (
        0.1, 0.15, True)


def test_the_threshold_and_initial_score_are_kept_as_python_floats():
    config = TapsConfig(threshold=1, score_init=2)
    assert type(config.threshold) is float and type(config.score_init) is float
    assert (config.threshold, config.score_init) == (1.0, 2.0)


@pytest.mark.parametrize("threshold, score_init", [
    (float("nan"), 0.15), (float("inf"), 0.15), (-float("inf"), 0.15),
    (0.1, float("nan")), (0.1, float("inf")), (0.1, -float("inf")),
])
def test_a_threshold_or_initial_score_that_is_not_finite_is_refused(threshold, score_init):
    flag = "threshold \\(tau\\) must be a finite number > 0" if threshold != 0.1 else "score_init must be a finite number"
    with pytest.raises(ValueError, match=rf"--model.{flag}.*, got {score_init if threshold == 0.1 else threshold}$"):
        TapsConfig(threshold, score_init)


@pytest.mark.parametrize("threshold", [0.0, -1.0, -1e-9])
def test_a_threshold_at_or_below_zero_is_refused_in_the_library_too(threshold):
    """tau <= 0 opens every gate for ever (scores are driven to 0, never below it): the core refuses
    it as the command line does, for a library user's TapsConfig, TapsModel and create_taps_model."""
    import timm

    import taps_lightning as tl

    with pytest.raises(tl.errors.SettingsError, match=rf"threshold \(tau\) must be a finite number > 0.*got {threshold}"):
        TapsConfig(threshold)
    with pytest.raises(tl.errors.SettingsError, match="threshold"):
        tl.create_taps_model("test_resnet", {"a": 2}, threshold=threshold)
    with pytest.raises(tl.errors.SettingsError, match="threshold"):
        tl.TapsModel(timm.create_model("test_resnet", num_classes=0), tasks={"a": 2}, config=TapsConfig(threshold=threshold))


def test_a_start_below_tau_is_allowed_and_only_warned_about_when_a_task_is_added():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = TapsConfig(threshold=0.5, score_init=0.1)  # a model carrying tasks loaded from files: fine
    with pytest.warns(StartsOffWarning, match=r"score_init 0.1 < threshold 0.5: every layer of task 'sketch' starts "
                                              r"off .*Use score_init >= threshold") as record:
        config.warn_if_starts_off("sketch")
    assert len(record) == 1 and issubclass(StartsOffWarning, UserWarning)


@pytest.mark.parametrize("score_init", [0.1, 0.15, 2.0], ids=["equal", "above", "far-above"])
def test_a_start_at_or_above_tau_is_not_warned_about(score_init):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TapsConfig(threshold=0.1, score_init=score_init).warn_if_starts_off("a")  # s >= tau: the gate starts open


def test_the_warning_points_at_the_line_that_adds_the_task():
    model = tl.TapsModel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                         num_features=4, threshold=0.5, score_init=0.1)
    with pytest.warns(StartsOffWarning) as record:
        model.add_task("a", 2)
    assert [r.filename for r in record] == [__file__]
