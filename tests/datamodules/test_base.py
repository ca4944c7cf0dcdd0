"""``MultiTaskDataModule`` (datamodules/base.py): the loader the BatchNorm statistics are
re-estimated on, its size in training batches and its own fixed permutation."""
import csv

import lightning as L
import pytest
import torch

from callbacks import ResultsReport
from helpers import TINY, TinyTasks
from taps_lightning.training.lightning_module import TapsModule


def _norm_data(batch_size=4, eval_batch_size=7, n=24):
    """Tiny tasks whose evaluation batches (7) differ from the training batches (4)."""
    data = TinyTasks.make(n=n, batch_size=batch_size)
    data.eval_batch_size = eval_batch_size
    data.setup("fit")
    return data


def test_norm_loader_holds_num_batches_training_batches():
    """3 batches of ``batch_size`` (4), not of ``eval_batch_size`` (7): 12 distinct training images."""
    data = _norm_data()
    for task in ("a", "b"):
        loader = data.norm_dataloader(task, 3)
        indices = list(loader.batch_sampler)
        assert [len(b) for b in indices] == [4, 4, 4]
        flat = [i for b in indices for i in b]
        assert len(set(flat)) == 12 and all(0 <= i < 24 for i in flat)
        batches = [x for x, _ in loader]
        assert [tuple(x.shape) for x in batches] == [(4, 3, 32, 32)] * 3
    # fewer images than asked for: full batches of 4 only (24 images = 6 batches, not 10)
    assert [len(b) for b in data.norm_dataloader("a", 10).batch_sampler] == [4] * 6


def test_the_report_counts_the_images_the_norms_were_re_estimated_on(tmp_path):
    data = _norm_data()
    module = TapsModule(tasks=data.num_classes, recalibrate_batches=3, **TINY)
    report = ResultsReport()
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[report],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, data, verbose=False)
    with open(tmp_path / "report.csv") as f:
        rows = {r["task"]: r for r in csv.DictReader(f)}
    assert int(rows["a"]["norm_images"]) == int(rows["b"]["norm_images"]) == 3 * 4
    assert "re-estimated for these weights on 12 training images per task" in (tmp_path / "report.md").read_text()


def test_norm_permutation_is_fixed_and_leaves_the_global_rng_alone():
    """The same images every call, whatever the global RNG's state, and that state unchanged."""
    data = _norm_data(n=40)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = list(data.norm_dataloader("a", 3).batch_sampler)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG was not drawn from
    torch.manual_seed(456)  # another global state: the same images
    second = list(data.norm_dataloader("a", 3).batch_sampler)
    assert first == second
    # and not simply the first images in order: a permutation of the 40
    flat = [i for b in first for i in b]
    assert flat != list(range(12)) and len(set(flat)) == 12
