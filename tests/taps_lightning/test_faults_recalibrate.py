"""recalibrate_norms is all or nothing (#31 §6) and feeds inputs in the model's dtype (#31 §5)."""
from __future__ import annotations

import pytest
import torch

from helpers import randomize_tasks, tiny_resnet
from taps_lightning import recalibrate_norms


def _norm_state(model, task):
    return [(n.momentum, n.training, n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone())
            for n in model.task_batchnorms(task)]


def _assert_same(before, after):
    assert len(before) == len(after)
    for (m0, t0, *tensors0), (m1, t1, *tensors1) in zip(before, after):
        assert (m0, t0) == (m1, t1)
        for a, b in zip(tensors0, tensors1):
            assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["wrong_shape", "single_image"])
@pytest.mark.parametrize("training", [False, True])
def test_a_failing_later_batch_restores_every_norm(bad, training):
    """Today the first batch's statistics would stay (the second batch fails after the reset)."""
    model = tiny_resnet({"a": 3, "b": 4})
    randomize_tasks(model)
    model.train(training)
    before = _norm_state(model, "a")
    flags = {name: m.training for name, m in model.named_modules()}
    later = torch.randn(2, 1, 32, 32) if bad == "wrong_shape" else torch.randn(1, 3, 32, 32)
    with pytest.raises((RuntimeError, ValueError)) as err:
        recalibrate_norms(model, "a", [torch.randn(4, 3, 32, 32), later])
    assert any("restored" in note for note in getattr(err.value, "__notes__", []))
    _assert_same(before, _norm_state(model, "a"))
    assert {name: m.training for name, m in model.named_modules()} == flags


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float32_images_reach_a_model_of_another_dtype(dtype):
    """64-true / bf16-true models get the loader's float32 images: converted, not a dtype error."""
    model = tiny_resnet({"a": 3}).to(dtype)
    assert recalibrate_norms(model, "a", [torch.randn(4, 3, 32, 32), None, torch.randn(4, 3, 32, 32)]) == 8
    assert all(n.running_mean.dtype == dtype and n.num_batches_tracked == 2 for n in model.task_batchnorms("a"))
