"""Checkpoints and task files written by an earlier version (main at 00b60cb, before the
composition root and the lifecycle callbacks; made by ``tests/fixtures/make_main_00b60cb.py``)
load, resume and evaluate here, to the numbers that version computed from them."""
from pathlib import Path

import lightning as L
import pytest
import torch

import taps_lightning as tl
from helpers import TinyTasks, taps_trainer
from taps_lightning.training.compose import create_taps_module, module_flags
from taps_lightning.training.lightning_module import TapsModule

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "main_00b60cb"
RUNS = ("incremental", "budget", "progressive")


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "expected_logits.pt", weights_only=True)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # the same weights and code path: only the order of float32 sums differs (another thread count or
    # CPU). A few 1e-5 through ~20 layers; a wrong or missing tensor moves logits by their own size.
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * (1 + scale))


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_loads_to_the_logits_it_gave(run, expected):
    module = TapsModule.load_from_checkpoint(FIXTURES / f"{run}.ckpt", weights_only=True).eval()
    with torch.no_grad():
        for task in module.tasks:
            _close(module.model(expected["x"], task), expected[f"{run}/{task}"])


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_resumes_for_another_epoch_and_evaluates(run, tmp_path):
    saved = torch.load(FIXTURES / f"{run}.ckpt", weights_only=True)
    flags = module_flags(saved["hyper_parameters"])  # the old hparams (LightningCLI's _instantiator dropped)
    L.seed_everything(0)
    data = TinyTasks.make(n=16, batch_size=8)
    module = TapsModule.load_from_checkpoint(FIXTURES / f"{run}.ckpt")
    trainer = taps_trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                           default_root_dir=tmp_path)
    fresh = create_taps_module(**flags)
    trainer.fit(fresh, data, ckpt_path=str(FIXTURES / f"{run}.ckpt"), weights_only=True)
    assert trainer.current_epoch == 2 and trainer.global_step == saved["global_step"] * 2  # one more epoch
    if run == "budget":  # the controller's lambdas carried on from the old checkpoint's state
        assert fresh.lam_policy.controller.steps == saved["taps_budget"]["steps"] * 2
    metrics = trainer.test(module, data, verbose=False)[0]
    assert set(metrics) >= {"test/acc", "test/a/acc", "test/b/acc"}


def test_an_old_task_file_loads_to_the_logits_it_gave(expected):
    module = TapsModule.load_from_checkpoint(FIXTURES / "incremental.ckpt").eval()
    model = module.model
    model.remove_task("a")
    assert tl.load_task(model, FIXTURES / "incremental_a.safetensors") == "a"
    assert tl.task_metadata(FIXTURES / "incremental_a.safetensors")["class_names"] == ["c0", "c1", "c2", "c3"]
    with torch.no_grad():
        _close(model.eval()(expected["x"], "a"), expected["incremental/a"])
