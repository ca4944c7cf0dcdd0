"""The bench and reproduce entry points run end to end on tiny configurations (not their timings)."""
import json

import pytest

from experiments import bench, default_run, reproduce
from taps_lightning.errors import OutputError, SettingsError


@pytest.mark.slow
def test_bench_runs_and_reports_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(["--archs", "test_resnet", "--batch", "2", "--size", "32", "--repeats", "2", "--warmup", "1",
                       "--inference-repeats", "2", "--process-rss", "--profile", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rows))
    for key in ("train_step_ratio", "memory_ratio", "gated_inference_throughput_ratio",
                "merged_inference_throughput_ratio", "stored_bytes_ratio", "count_params_fraction"):
        assert saved[0][key] > 0
    peak = saved[0]["peak_bytes"]
    assert peak["taps"] > peak["finetune"] > 0  # TAPS holds base + delta
    assert peak["taps"] < peak["taps_saved_weight"]  # rebuilding the gated weight saves a weight copy
    # the LoRA baseline trains no full-size tensor: no base gradient or momentum (fine-tuning), no delta (TAPS)
    assert 0 < peak["lora"] < peak["finetune"] and peak["lora"] < peak["taps"]
    for key in ("train_step_ratio_lora", "train_step_ratio_lora_taps", "memory_ratio_lora", "process_rss_ratio_lora"):
        assert saved[0][key] > 0
    assert saved[0]["memory_ratio_lora_taps"] == peak["lora"] / peak["taps"]
    assert saved[0]["threads"] >= 1 and saved[0]["machine"] and "torch" in saved[0]
    assert saved[0]["memory_floor"] > 1
    rss = saved[0]["process_peak_rss_bytes"]
    assert rss["finetune"] > 50 * 2**20  # a process that imported torch and trained; a fresh one per side
    assert saved[0]["process_rss_ratio_taps"] == rss["taps"] / rss["finetune"]
    assert saved[0]["profile_ms_per_step"][-1][0] == "total"


def test_bench_profile_attributes_the_gate_to_taps_only():
    ops = {op: (ft, taps) for op, ft, taps in bench.profile_steps("test_resnet", 2, 32, "cpu", None, steps=1)}
    assert ops["_GatedLayer"][0] == 0 < ops["_GatedLayer"][1]  # TAPS' own autograd function, absent in fine-tuning
    assert ops["total"][0] > 0 and ops["total"][1] > 0


def test_bench_memory_only_in_bf16(tmp_path):
    rows = bench.main(["--archs", "test_vit", "--batch", "2", "--size", "32", "--precision", "bf16",
                       "--memory-only", "--out", str(tmp_path / "b.json")])
    assert rows[0]["precision"] == "bf16" and rows[0]["memory_ratio"] > 1
    assert "train_step_ratio" not in rows[0]


@pytest.mark.slow
def test_reproduce_quick_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    out = reproduce.main(["--quick", "--out", str(tmp_path / "results.md"), "--only", "TAPS memory-efficient, lambda=0.5"])
    text = out.read_text()
    assert "| TAPS memory-efficient, lambda=0.5 |" in text and " ± " not in text and "seed 0, one run per row" in text
    assert "| mnist | mnist_m | uci_digits | sketch |" in text and "Table 5 (DomainNet" in text
    out = reproduce.main(["--quick", "--seeds", "0", "1", "--out", str(tmp_path / "seeds.md"), "--only", "Feature extractor"])
    text = out.read_text()
    assert "--seeds 0 1" in text and "seeds 0, 1: every figure is the mean over seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| Feature extractor | 1.0"))
    # params, the 4 task columns, mean accuracy, % task params, active layers; the worst task has none
    assert row.count(" ± ") == 8 and " ± " not in row.split(" | ")[7] and row.split(" | ")[7].endswith(")")


@pytest.mark.slow
def test_reproduce_keeps_each_run_and_redraws_without_training(tmp_path, monkeypatch):
    """Two worker processes at once; each finished run is kept, so a second call trains nothing
    and redraws the same table and the accuracy-vs-stored-fraction figure."""
    monkeypatch.setenv("TAPS_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    rows = ["TAPS incremental, params penalty, lambda=0.5", "TAPS incremental, budget=0.2"]
    out = reproduce.main(["--quick", "--out", str(tmp_path / "docs" / "results.md"), "--only", *rows, "--jobs", "2"])
    kept = sorted(p.name for p in (tmp_path / "docs" / "runs").glob("*.json"))
    assert kept == ["taps-incremental-budget-0.2-seed0-quick.json",
                    "taps-incremental-params-penalty-lambda-0.5-seed0-quick.json"]
    first = out.read_text()
    assert all(f"| {row} |" in first for row in rows) and "thread(s) per run" in first
    # each run says what CPU made it, and the table names it
    record = json.loads((tmp_path / "docs" / "runs" / kept[0]).read_text())
    assert record["cpu"] == reproduce.cpu_model() and f"({record['cpu']})" in first
    assert "![accuracy vs stored fraction](pareto.png)" in first
    assert (tmp_path / "docs" / "pareto.png").stat().st_size > 1000
    monkeypatch.setattr(reproduce, "run_variant", lambda *a, **k: pytest.fail("a kept run was trained again"))
    assert reproduce.main(["--quick", "--out", str(out), "--only", *rows]).read_text() == first
    assert reproduce.main(["--quick", "--out", str(out), "--only", *rows, "--no-train"]).read_text() == first


def test_reproduce_table_reports_mean_and_spread_over_seeds():
    def run(accs, multiple, active):
        rows = [{"task": t, "accuracy": a, "task_params_pct": 10.0, "active_layers": active, "gated_layers": 52}
                for t, a in zip(("x", "y"), accs)]
        return rows + [{"task": "total", "accuracy": sum(accs) / 2, "params_multiple": multiple}]

    text = reproduce.format_results([("TAPS", [run((90.0, 96.0), 2.5, 30), run((94.0, 98.0), 2.7, 34)])],
                                    "cmd", 60.0, seeds=[0, 1])
    row = next(line for line in text.splitlines() if line.startswith("| TAPS"))
    # seed means 93 and 96: mean 94.5, sample std 3 / sqrt(2) = 2.12; per task: x 90, 94 -> 92 ± 2.83,
    # y 96, 98 -> 97 ± 1.41; the worst task of any seed is x at 90
    assert row == "| TAPS | 2.60x ± 0.14 | 92.0 ± 2.8 | 97.0 ± 1.4 | 94.50 ± 2.12 | 90.00 (x) | 10.0 ± 0.0 | 32.0 ± 2.8 / 52 |"
    single = reproduce.format_results([("TAPS", [run((90.0, 96.0), 2.5, 30)])], "cmd", 60.0)
    assert "| TAPS | 2.50x | 90.0 | 96.0 | 93.00 | 90.00 (x) | 10.0 | 30.0 / 52 |" in single and "seed 0, one run per row" in single


def test_reproduce_judges_the_results_targets_from_the_rows():
    """Each of #22's targets is met or missed by the rows in its scope, values worked out by hand."""
    def run(accs, stored=(10.0, 10.0)):
        rows = [{"task": t, "accuracy": a, "task_params_pct": p} for t, a, p in zip(("x", "y"), accs, stored)]
        return rows + [{"task": "total", "accuracy": sum(accs) / 2}]

    results = [
        ("Fine-tuning", [run((97.0, 97.0)), run((97.0, 99.0))]),  # mean of the seed means: 97.5
        # worst 89.0; seed means 94.5 and 92.5: std sqrt(2) = 1.41; 97.5 - 93.5 = 4.00 below
        ("TAPS incremental, lambda=0.5", [run((89.0, 100.0)), run((90.0, 95.0))]),
        # worst 91.0; seed means 96 and 96: std 0; 1.50 below (the bound itself is met); stored 16, 19, 14, 20
        ("TAPS incremental, budget=0.2", [run((91.0, 101.0), (16.0, 19.0)), run((96.0, 96.0), (14.0, 20.0))]),
        # out of every scope: lambda 1.5 (a task at 50 % and seed means 50 and 75 change nothing)
        ("TAPS incremental, lambda=1.5", [run((50.0, 50.0)), run((100.0, 50.0))]),
    ]
    table = reproduce.format_targets(results).splitlines()
    below = next(line for line in table if line.startswith("| no task below 90 %"))
    assert ("| **missed** by 1 of 2 rows | 1 of 2 rows (lowest 91.00 %) | TAPS incremental, lambda=0.5 (89.00 %) |"
            in below)
    spread = next(line for line in table if line.startswith("| seed standard deviation"))
    assert "| **met** | 2 of 2 rows (largest 1.41) | none |" in spread
    gap = next(line for line in table if "within 1.5 points of fine-tuning" in line)
    assert ("| **missed** by 1 of 2 rows | 1 of 2 rows (largest gap 1.50 below) | TAPS incremental, lambda=0.5 "
            "(4.00 below) |" in gap)
    band = next(line for line in table if line.startswith("| budgets 0.2 and 0.3"))
    assert band.endswith("| **missed** | none | TAPS incremental, budget=0.2: 3 of 4 task-runs in [15, 20] %, "
                         "the others at 14.0 % |")


@pytest.mark.slow
def test_default_run_records_the_report_and_picture_it_made(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPS_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    report, picture = default_run.main(["--quick", "--out", str(tmp_path / "docs")])
    text = report.read_text()
    header, table = text.split("\n\n", 1)
    # the header names the exact command and where it ran; the table is the run's own report
    assert "`python -m experiments.fit --trainer.max_epochs 1 --data.init_args.max_train_per_task 32" in header
    assert f"({reproduce.cpu_model()})" in header and "thread(s), torch" in header and "commit" in header
    assert table.startswith("## mobilenetv2_100, mode=incremental") and "| total / mean |" in table
    assert "Norm statistics:" in table
    from PIL import Image

    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 100
    assert not list(tmp_path.glob("logs")) and not list(tmp_path.glob("taps-default-run-*"))  # nothing left beside


def test_default_run_refuses_a_missing_docs_folder(tmp_path):
    with pytest.raises(SettingsError, match="no such folder"):
        default_run.main(["--out", str(tmp_path / "nope")])
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_an_output_it_cannot_write_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "bench", lambda *a, **k: pytest.fail("measured before the output was checked"))
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match=r"--out .*taken"):
        bench.main(["--archs", "test_resnet", "--out", str(tmp_path / "taken")])
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
