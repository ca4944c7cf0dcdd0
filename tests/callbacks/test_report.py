"""``ResultsReport`` (callbacks/report.py): the "stored MB" column against the exported task files."""
import csv

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks import ResultsReport, TaskExport
from helpers import TINY, TinyTasks, randomize_tasks
from taps_lightning.training.lightning_module import TapsModule


def _report_cells(text: str) -> dict[str, list[str]]:
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def test_stored_mb_is_the_exported_task_files_size_in_mebibytes(tmp_path):
    """MB = 2**20 bytes (MiB): each task's ``stored_mb`` equals the size of the adapter file fit
    exports for the tested weights, divided by 1,048,576; the total row is their sum."""
    data = TinyTasks.make()
    module = TapsModule(tasks=data.num_classes, **TINY)
    randomize_tasks(module.model, off=("layer1.0.conv1", "layer2.0.conv2"))  # some deltas stored, some not
    report = ResultsReport()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, default_root_dir=tmp_path,
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
