"""``MultiTaskDataModule`` (datamodules/base.py): the loader the BatchNorm statistics are
re-estimated on, its size in training batches and its own fixed permutation."""
import csv
import json

import pytest
import torch

from callbacks import ResultsReport
from datamodules import DataLayoutError, DomainNet, ImageFolderTasks, VisualDecathlon
from datamodules.base import _unrepeated_sampler
from helpers import TINY, TinyTasks, taps_trainer
from layouts import _decathlon, _folder_tree
from taps_lightning.training.compose import create_taps_module


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
    module = create_taps_module(tasks=data.num_classes, recalibrate_batches=3, **TINY)
    report = ResultsReport()
    trainer = taps_trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[report],
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


def test_joint_batches_are_tagged_by_task(tmp_path):
    _folder_tree(tmp_path)
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"cars", "flowers"}
    x, y = batch["cars"]
    assert x.shape == (2, 3, 8, 8) and y.dtype == torch.int64
    assert [len(d) for d in dm.val_dataloader()] == [3, 3]


def test_smaller_tasks_cycle_within_the_largest_tasks_epoch(tmp_path):
    _folder_tree(tmp_path, tasks=("flowers",), classes=3, per_class=4)  # 12 training images: 6 batches of 2
    _folder_tree(tmp_path, tasks=("cars",), classes=2, per_class=2)  # 4 images: 2 batches, cycled 3 times
    dm = ImageFolderTasks(str(tmp_path), image_size=8, num_workers=0, batch_size=2)
    dm.setup("fit")
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == 6
    assert all(set(b) == {"cars", "flowers"} and len(b["cars"][1]) == len(b["flowers"][1]) == 2 for b in batches)
    for start in (0, 2, 4):  # each pass over cars holds all of its images once
        labels = torch.cat([b["cars"][1] for b in batches[start:start + 2]])
        assert sorted(labels.tolist()) == [0, 0, 1, 1]
    flowers = torch.cat([b["flowers"][1] for b in batches])
    assert sorted(flowers.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # the largest task, once


def test_eval_sharding_covers_every_sample_once(tmp_path, monkeypatch):
    dataset = list(range(11))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, r=rank: r)
        seen += list(_unrepeated_sampler(dataset))
    assert sorted(seen) == dataset


def test_empty_splits_of_every_benchmark_are_refused(tmp_path):
    _decathlon(tmp_path / "decathlon")
    train = tmp_path / "decathlon/annotations/vgg-flowers_train.json"
    train.write_text(json.dumps({**json.loads(train.read_text()), "images": [], "annotations": []}))
    with pytest.raises(DataLayoutError, match="vgg-flowers_train.json: lists no images"):
        VisualDecathlon(str(tmp_path / "decathlon"), tasks=["vgg-flowers"], num_workers=0).setup("fit")
    (tmp_path / "domainnet").mkdir()
    (tmp_path / "domainnet/clipart_train.txt").write_text("\n")
    with pytest.raises(DataLayoutError, match="clipart_train.txt: no samples"):
        DomainNet(str(tmp_path / "domainnet"), tasks=["clipart"], num_workers=0).setup("fit")
    from tests.helpers import TinyTasks

    with pytest.raises(DataLayoutError, match="task 'a' has no train samples"):  # any other DataModule
        TinyTasks.make(n=0).setup("fit")
