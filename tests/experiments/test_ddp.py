"""Two gloo processes on CPU: ``experiments.fit`` with DDP (joint, progressive and the LoRA baseline), and every
validation and test sample counted once."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import QUICK
from helpers import run_fit_cli as _run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["joint", "progressive", "lora"])
def test_cli_ddp_gloo_two_processes(mode, tmp_path):
    args = QUICK + ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                    "--model.backbone", "test_resnet", "--model.weights", "null", "--model.mode", mode,
                    "--data.tasks", "[mnist, sketch]"]
    if mode == "progressive":
        args[1] = "2"  # a warm-up epoch, then grouped adapters
        args += ["--model.num_stages", "2", "--model.similarity_batches", "1"]
    result = _run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "x2" in out and "| sketch |" in out
    if mode == "progressive":
        assert "ddp_find_unused_parameters_true" in out and "progressive adapters grouped" in out
    if mode == "lora":  # every task's adapters take part in every step: plain DDP, task files written
        assert "ddp_find_unused_parameters_true" not in out and "mode=lora" in out
        folder = next((tmp_path / "logs" / "taps").glob("version_*"))
        assert sorted(p.name for p in (folder / "checkpoints" / "adapters").glob("*.safetensors")) == \
            ["mnist.safetensors", "sketch.safetensors"]


@pytest.mark.slow
def test_ddp_evaluation_counts_every_sample_once(tmp_path):
    """2 gloo processes on 11 samples per task: each is evaluated once (a padding sampler would give 12)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_eval_counts.py"), "11", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("COUNTS "))
    assert json.loads(line[len("COUNTS "):]) == {"val/a": 11, "val/b": 11, "test/a": 11, "test/b": 11}
