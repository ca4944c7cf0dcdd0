"""``experiments.fit`` from the command line: the default run offline (report, adapters, resume
into the same folder), and the data normalised as the backbone expects."""
import pytest
import torch

from helpers import QUICK
from helpers import run_fit_cli as _run_cli
from taps_lightning.training.compose import create_taps_module


@pytest.mark.slow
def test_cli_default_runs_offline_and_resumes(tmp_path):
    first = _run_cli(QUICK, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "backbone=mobilenetv2_100 mode=incremental" in out
    assert "| mnist_m |" in out and "tensorboard --logdir" in out
    run = tmp_path / "logs" / "taps" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "report.md").is_file()
    assert sorted(p.name for p in (run / "checkpoints" / "adapters").iterdir()) == [
        "mnist.safetensors", "mnist_m.safetensors", "sketch.safetensors", "uci_digits.safetensors"]
    resumed = _run_cli(QUICK[:1] + ["2"] + QUICK[2:] + ["--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "logs" / "taps" / "version_1").exists()  # continued in the same run folder


def test_fit_normalises_inputs_as_the_backbone_expects(tmp_path, monkeypatch):
    """The DataModule gets the timm model's own mean/std (0.5 for test_vit, ImageNet's for resnet18)."""
    import timm

    from datamodules import MultiTaskDataModule
    from experiments.run.cli import TapsCLI

    monkeypatch.chdir(tmp_path)
    means = []
    for backbone in ("test_vit", "resnet18"):
        cli = TapsCLI(create_taps_module, MultiTaskDataModule, subclass_mode_data=True, run=False,
                      args=["--model.backbone", backbone, "--model.weights", "null"])
        cfg = timm.create_model(backbone).pretrained_cfg
        white = cli.datamodule._transform(train=False)(torch.full((3, 8, 8), 255, dtype=torch.uint8))
        expected = [(1 - m) / s for m, s in zip(cfg["mean"], cfg["std"])]
        torch.testing.assert_close(white[:, 0, 0], torch.tensor(expected))
        means.append(tuple(cfg["mean"]))
    assert means == [(0.5, 0.5, 0.5), (0.485, 0.456, 0.406)]
