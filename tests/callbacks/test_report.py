"""``ResultsReport`` (callbacks/report.py): the results table against hand values, when it is written, and
the "stored MB" column against the exported task files."""
import csv

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ResultsReport, TaskExport
from helpers import TinyTasks, randomize_tasks, taps_trainer
from taps_lightning.training.compose import create_taps_module

TINY = dict(backbone="test_resnet", sparsity_warmup_epochs=0)


def _report_cells(text: str) -> dict[str, list[str]]:
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def test_stored_mb_is_the_exported_task_files_size_in_mebibytes(tmp_path):
    """MB = 2**20 bytes (MiB): each task's ``stored_mb`` equals the size of the adapter file fit
    exports for the tested weights, divided by 1,048,576; the total row is their sum."""
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    randomize_tasks(module.model, off=("layer1.0.conv1", "layer2.0.conv2"))  # some deltas stored, some not
    report = ResultsReport()
    trainer = taps_trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt"), TaskExport(), report],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=1)
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    sizes = {t: (tmp_path / "ckpt" / "adapters" / f"{t}.safetensors").stat().st_size for t in ("a", "b")}
    expected = {t: size / 1048576 for t, size in sizes.items()}
    with open(tmp_path / "report.csv") as f:
        rows = {r["task"]: float(r["stored_mb"]) for r in csv.DictReader(f)}
    assert rows == pytest.approx({**expected, "total / mean": sum(expected.values())}, rel=1e-12)
    cells = _report_cells((tmp_path / "report.md").read_text())
    for task, mb in expected.items():
        assert cells[task][5] == f"{mb:.2f}"


def _table(text: str) -> dict[str, float]:
    """``{task: acc (%)}`` of a report.md table, the ``total / mean`` row included."""
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): float(cells[1]) for cells in rows[1:]}


@pytest.mark.parametrize("stage", ["val", "test"])
def test_report_mean_row_is_the_mean_of_the_task_rows_and_val_acc(stage, tmp_path):
    """Heads that always answer class 0 on labels 0..k-1 repeated: a task's accuracy is the share of
    label 0, known by hand, and differs per task (so the mean differs from the median, the first,
    the largest or the sample-weighted value). Tasks in non-alphabetical order."""
    classes = {"zeta": 4, "alpha": 3, "mid": 5}
    counts = {"zeta": 24, "alpha": 12, "mid": 40}  # label 0: 6 of 24, 4 of 12, 8 of 40
    data = TinyTasks.make(tasks=tuple(classes), classes=tuple(classes.values()), n=counts)
    module = create_taps_module(tasks=classes, **TINY)
    with torch.no_grad():
        for head in module.model.heads.values():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = 1.0
    expected = {"zeta": 100 * 6 / 24, "alpha": 100 * 4 / 12, "mid": 100 * 8 / 40}
    mean = sum(expected.values()) / 3  # 26.11; weighted by samples 23.68, median 25
    report = ResultsReport()
    trainer = taps_trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[report],
                        enable_progress_bar=False, enable_model_summary=False)
    metrics = (trainer.validate if stage == "val" else trainer.test)(module, data, verbose=False)[0]
    assert 100 * metrics[f"{stage}/acc"] == pytest.approx(mean, abs=1e-4)
    rows = {r["task"]: r["accuracy"] for r in report.rows}
    assert list(rows) == ["zeta", "alpha", "mid", "total / mean"]
    assert rows == pytest.approx({**expected, "total / mean": mean}, abs=1e-4)
    text = (tmp_path / "report.md").read_text()
    assert f"({stage} set)" in text
    assert _table(text) == pytest.approx({**{t: round(a, 2) for t, a in expected.items()}, "total / mean": 26.11},
                                         abs=1e-9)
    with open(tmp_path / "report.csv") as f:
        csv_rows = {r["task"]: float(r["accuracy"]) for r in csv.DictReader(f)}
    assert csv_rows == pytest.approx(rows, abs=1e-9)


def test_report_is_written_after_validate_and_once_per_fit(tmp_path):
    data = TinyTasks.make()
    module = create_taps_module(tasks=data.num_classes, **TINY)
    report = ResultsReport()
    stages = []
    write = report._write
    report._write = lambda trainer, pl_module, stage: (stages.append(stage), write(trainer, pl_module, stage))
    kw = dict(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[report], enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    taps_trainer(max_epochs=2, **kw).fit(module, data)
    assert stages == ["val"]  # at the end of fit, not after each validation epoch
    metrics = taps_trainer(**kw).validate(module, data, verbose=False)[0]
    assert stages == ["val", "val"]
    assert "(val set)" in (tmp_path / "report.md").read_text()
    assert report.rows[0]["accuracy"] == pytest.approx(100 * metrics["val/a/acc"])
