"""Every --trainer.precision Lightning offers runs end to end on CPU, or is refused before anything
is built (#31 §5): fit (BatchNorm re-estimation included), test, save_task, load_task, merge, predict."""
from __future__ import annotations

import typing
import warnings
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.connector import _PRECISION_INPUT
from torch.utils.data import DataLoader

import taps_lightning as tl
from callbacks import NormRecalibration
from helpers import TINY, TinyTasks, cpu_trainer
from taps_lightning.errors import SettingsError
from taps_lightning.training.compose import create_taps_module

#: Every value Lightning accepts (ints, their strings, the named ones).
ALL_PRECISIONS = [v for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group)]
#: The distinct ones (64 / "64" are 64-true, 32 / "32" are 32-true, 16 / "16" are 16-mixed, "bf16" is bf16-mixed).
RUNNABLE = ["32-true", "64-true", "bf16-true", "bf16-mixed", "16-mixed", "16-true"]


def test_every_lightning_precision_is_covered():
    from experiments.run.inputs import precision_problem

    named = {str(v) for v in ALL_PRECISIONS}
    assert named - {"64", "32", "16", "bf16"} == set(RUNNABLE) | {"transformer-engine", "transformer-engine-float16"}
    assert all(precision_problem(v) is None for v in ALL_PRECISIONS if not str(v).startswith("transformer"))


@pytest.mark.parametrize("precision", ["transformer-engine", "transformer-engine-float16"])
def test_transformer_engine_is_refused_before_anything_is_built(precision):
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may have Transformer Engine")
    from experiments.run.inputs import check_data_flags

    with pytest.raises(SettingsError, match=rf"--trainer.precision {precision} needs NVIDIA Transformer Engine.*"
                                            r"use --trainer.precision bf16-mixed"):
        check_data_flags(SimpleNamespace(init_args={}), None, SimpleNamespace(precision=precision))


@pytest.mark.parametrize("precision", RUNNABLE)
def test_precision_runs_end_to_end(precision, tmp_path):
    """Today 64-true and bf16-true train an epoch, then crash re-estimating the norms on float32 images."""
    dm = TinyTasks.make(n=16, batch_size=8)
    torch.manual_seed(0)
    module = create_taps_module(**TINY, tasks=dm.num_classes)
    trainer = cpu_trainer(tmp_path, max_epochs=1, precision=precision, limit_train_batches=2, limit_val_batches=1,
                          limit_test_batches=1, deterministic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
        trainer.test(module, datamodule=dm, verbose=False)
    assert NormRecalibration.of(trainer).images  # the norms were re-estimated
    dtype = next(module.model.parameters()).dtype
    merged = tl.merge(module.model.eval(), "a").eval()  # merge in the precision it was trained in
    with torch.no_grad():
        assert merged(torch.rand(2, 3, 32, 32, dtype=dtype)).dtype == dtype
    path = tl.save_task(module.model, "a", tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = create_taps_module(**TINY, tasks={"b": 3})  # the float32 base evaluate/predict build
    assert tl.load_task(fresh.model, path) == "a"  # strict: the base fingerprint matches
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    from experiments.predict import predict_task

    images = DataLoader(torch.rand(5, 3, 32, 32), batch_size=4)
    for net in (fabric.setup_module(tl.merge(fresh.model, "a").eval()),
                partial(fabric.setup_module(fresh.eval()), task="a")):
        probs, labels = predict_task(net, images, fabric.device, top_k=2, desc="a", progress=False)
        assert probs.shape == labels.shape == (5, 2) and bool(torch.isfinite(probs).all())
