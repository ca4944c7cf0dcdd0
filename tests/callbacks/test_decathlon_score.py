"""DecathlonScore (callbacks/decathlon.py): the S-score against hand values."""
import pytest

from callbacks import decathlon_score


def test_decathlon_score_hand_computed():
    from callbacks.decathlon import BASELINE_ERRORS

    assert decathlon_score(dict(BASELINE_ERRORS)) == pytest.approx(2500.0)  # baseline everywhere: 250 per task
    assert decathlon_score({"svhn": 0.0}) == pytest.approx(1000.0)
    assert decathlon_score({"gtsrb": 0.2}) == 0.0  # worse than E_max = 2 x 2.47 %
    # aircraft error 0.30: E_max 0.7932, alpha 1000/0.7932^2
    assert decathlon_score({"aircraft": 0.30, "unknown": 0.1}) == pytest.approx(1000 / 0.7932**2 * (0.7932 - 0.30) ** 2)
