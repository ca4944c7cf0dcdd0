"""Progressive task-specific adapters: grouping, similarity, schedule, zero-init, export."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open

import taps_lightning as tl
from taps_lightning.training.compose import create_taps_module
from tests.helpers import assert_rounding_close
from taps_lightning.models.progressive import (ProgressiveAdapterModel, assign_stages, cosine_similarity_matrix,
                                        default_schedule, group_tasks)


def test_grouping_of_a_hand_made_similarity_matrix():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.2],
                        [0.9, 1.0, 0.0, 0.1],
                        [0.1, 0.0, 1.0, 0.7],
                        [0.2, 0.1, 0.7, 1.0]])
    groups, merges = group_tasks(sim, 2)
    assert groups == [[0, 1], [2, 3]]
    assert merges == [([0], [1], pytest.approx(0.9)), ([2], [3], pytest.approx(0.7))]
    groups, merges = group_tasks(sim, 1)
    # average linkage of {0,1} and {2,3}: mean of 0.1, 0.2, 0.0, 0.1
    assert groups == [[0, 1, 2, 3]] and merges[-1][2] == pytest.approx(0.1)
    assert group_tasks(sim, 4)[0] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="cannot make 5 groups of 4 tasks"):
        group_tasks(sim, 5)


def test_cosine_similarity_matrix_by_hand():
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    sim = cosine_similarity_matrix(v)
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(0.0)
    assert sim[0, 3] == pytest.approx(2 ** -0.5)


def test_schedule_and_stages():
    assert default_schedule(6, 4) == [1, 2, 4, 6]
    assert default_schedule(3, 4) == [1, 2, 3, 3]
    torch.manual_seed(0)
    model = ProgressiveAdapterModel(timm.create_model("resnet18", num_classes=0), {"a": 2, "b": 2, "c": 2, "d": 2},
                                    rank=2, num_stages=4, schedule=[1, 2, 3, 4])
    stages = [model.stage_of[n] for n in model.gated_names]
    assert stages == sorted(stages) and set(stages) == {0, 1, 2, 3}
    assert model.stage_of["conv1"] == 0 and model.stage_of["layer4.1.conv2"] == 3
    for name, layer in model.lora_layers():  # adapters per stage follow the schedule
        assert len(layer.lora_A) == [1, 2, 3, 4][model.stage_of[name]]
    assert assign_stages(torch.nn.Sequential(), ["x", "y", "z", "w"], 2) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="schedule"):
        ProgressiveAdapterModel(timm.create_model("resnet18", num_classes=0), {"a": 2}, schedule=[1, 2], num_stages=2)


def test_zero_initialised_adapters_keep_the_backbone_output():
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", num_classes=0).eval()
    reference = copy.deepcopy(backbone)
    model = ProgressiveAdapterModel(backbone, {"a": 3, "b": 3}, rank=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_task("b")
        torch.testing.assert_close(model.backbone(x), reference(x))
        layer = model.backbone.layer1[0].conv1
        layer.lora_B["0"].normal_()  # a non-zero adapter does change it, by exactly B @ A
        h = torch.randn(1, 64, 8, 8)
        expected = F.conv2d(h, layer.base_layer.weight + (layer.lora_B["0"] @ layer.lora_A["0"]).view_as(
            layer.base_layer.weight) * layer.scaling, padding=1)
        torch.testing.assert_close(layer(h), expected)


def test_identical_tasks_have_similarity_one_and_share_an_adapter():
    torch.manual_seed(0)
    module = create_taps_module(backbone="test_resnet", tasks={"a": 3, "b": 3, "c": 3}, mode="progressive",
                        adapter_rank=2, num_stages=2, adapter_schedule=[2, 3])
    model = module.model
    with torch.no_grad():
        for layer in model.lora_layers():
            layer[1].lora_B["0"].normal_(0, 0.1)  # as after a warm-up: gradients reach A too
        model.heads["b"].load_state_dict(model.heads["a"].state_dict())
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    x2, y2 = torch.randn(4, 3, 32, 32), torch.tensor([2, 2, 1, 0])
    losses = {"a": F.cross_entropy(model(x, "a"), y), "b": F.cross_entropy(model(x, "b"), y),
              "c": F.cross_entropy(model(x2, "c"), y2)}
    module.mode.collect(model, losses)
    for stage in range(2):
        vectors = torch.stack([module.mode.task_grads[t][stage] for t in ("a", "b", "c")])
        assert torch.equal(vectors[0], vectors[1])  # the same loss: the same gradient
        sim = cosine_similarity_matrix(vectors)
        # |a|^2 / (|a| |a|): sums of n squares, a square root, n divisions, within 2n + 4 roundings
        assert_rounding_close(sim[0, 1], torch.tensor(1.0), 1.0, terms=2 * vectors.shape[1] + 4)
        assert sim[0, 2] < 0.99
        assert group_tasks(sim, 2)[0] == [[0, 1], [2]]


def test_progressive_export_and_counts(tmp_path):
    torch.manual_seed(0)
    model = ProgressiveAdapterModel(timm.create_model("resnet18", num_classes=0), {"a": 3, "b": 4, "c": 5},
                                    rank=2, num_stages=2, schedule=[1, 3])
    model.assign({0: [["a", "b", "c"]], 1: [["a"], ["b"], ["c"]]})
    path = tl.save_task(model, "b", tmp_path / "b.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {k for k in keys if k.startswith("lora_A.")} == {f"lora_A.{n}" for n in model.gated_names}
    assert meta["format"] == "progressive-task/1" and '"layer4.1.conv2", "1"' in meta["path"]
    with pytest.raises(tl.TaskFileError, match="progressive-adapter task file"):
        tl.load_task(tl.TapsModel(timm.create_model("resnet18", num_classes=0)), path)
    counts = tl.count_params(model, "b")
    layers = dict(model.lora_layers())
    lora = sum(layers[n].lora_A["0"].numel() + layers[n].lora_B["0"].numel() for n in model.gated_names)
    assert counts["delta_params"] == lora  # every adapter has the same shape as adapter 0 of its layer
    assert counts["active_layers"] == sum(model.stage_of[n] == 1 for n in model.gated_names)
    assert counts["head_params"] == 512 * 4 + 4
    state = model.state_dict()  # the grouping travels with checkpoints
    fresh = ProgressiveAdapterModel(timm.create_model("resnet18", num_classes=0), {"a": 3, "b": 4, "c": 5},
                                    rank=2, num_stages=2, schedule=[1, 3])
    fresh.load_state_dict(state)
    assert fresh.grouped and fresh.groups[1] == [["a"], ["b"], ["c"]]
    assert fresh.backbone.layer4[1].conv2.adapter_of["c"] == "2"


def test_progressive_trains_groups_and_logs_similarity(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from callbacks import ResultsReport, TaskSimilarityLogger
    from helpers import TinyTasks, taps_trainer

    class WarmUpBatches(L.Callback):  # the model and batch of each step whose gradients measure similarity
        def __init__(self):
            self.steps = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0 and batch_idx < 2:
                self.steps.append((copy.deepcopy(pl_module.model), batch))

    L.seed_everything(0)
    data = TinyTasks.make(tasks=("a", "b", "c"), classes=(4, 3, 4))
    module = create_taps_module(backbone="test_resnet", tasks=data.num_classes, mode="progressive", adapter_rank=2,
                        num_stages=3, similarity_epochs=1, similarity_batches=2, lr=0.05)
    logger = TensorBoardLogger(tmp_path, name="p")
    report_cb, warm_up = ResultsReport(), WarmUpBatches()
    taps_trainer(accelerator="cpu", max_epochs=2, logger=logger, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, enable_checkpointing=False,
              callbacks=[TaskSimilarityLogger(), report_cb, warm_up]).fit(module, data)
    model = module.model
    assert [len(model.groups[s]) for s in range(3)] == [1, 2, 3] == model.schedule
    # each stage's similarity: cosines of each task's cross-entropy gradient with respect to that
    # stage's shared adapter, summed over the similarity batches, recomputed here by plain autograd
    # (in float64: the module's fp32 cosines are within the rounding of their sums of n products,
    # (2n + 4) u, plus its fp32 gradients' rounding, ~1e-6 here, allowed 1e-5)
    assert len(warm_up.steps) == 2
    for stage in range(3):
        summed = {}
        for step_model, batch in warm_up.steps:
            step_model = copy.deepcopy(step_model).double()
            shared = [p for name, layer in step_model.lora_layers() if step_model.stage_of[name] == stage
                      for p in (layer.lora_A["0"], layer.lora_B["0"])]
            for task, (x, y) in batch.items():
                grads = torch.autograd.grad(F.cross_entropy(step_model(x.double(), task), y), shared)
                summed[task] = summed.get(task, 0) + torch.cat([g.reshape(-1) for g in grads])
        v = [summed[t] for t in model.tasks]
        expected = torch.tensor([[float(a @ b / (a.norm() * b.norm())) for b in v] for a in v], dtype=torch.float64)
        tolerance = (2 * len(v[0]) + 4) * torch.finfo(torch.float32).eps / 2 + 1e-5
        torch.testing.assert_close(module.mode.similarity[stage].double(), expected, atol=tolerance, rtol=0)
        if stage == 1:  # two groups of three tasks: the most similar pair shares the adapter
            pairs = sorted(float(expected[i, j]) for i in range(3) for j in range(i))
            assert pairs[-1] - pairs[-2] > 2 * tolerance  # no near tie: rounding cannot change the grouping
            i, j = divmod(int((expected - 2 * torch.eye(3, dtype=torch.float64)).argmax()), 3)
            assert sorted(map(sorted, model.groups[1])) == sorted([sorted([model.tasks[i], model.tasks[j]]),
                                                                   [model.tasks[3 - i - j]]])
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    assert {"progressive/similarity_stage0", "progressive/similarity_stage2"} <= set(events.Tags()["images"])
    report = (tmp_path / "p" / "version_0" / "report.md").read_text()
    assert "Adapter sharing" in report and "Gradient cosine similarity, stage 1" in report
    # the multi-task total counts a shared adapter once, not once per task that uses it
    layers = dict(model.lora_layers())
    adapters = sum(len(layers[n].lora_A) * (layers[n].lora_A["0"].numel() + layers[n].lora_B["0"].numel())
                   for n in model.gated_names)
    norms = sum(p.numel() for _, n in model.task_norms() for t in model.tasks for p in n.norms[t].parameters())
    heads = sum(p.numel() for h in model.heads.values() for p in h.parameters())
    base = model.base_param_count
    total = report_cb.rows[-1]
    assert total["params_multiple"] == pytest.approx(1 + (adapters + norms + heads) / base)
    assert total["params_multiple"] < 1 + total["task_params"] / base  # per-task paths overlap in shared stages


def test_progressive_merge_equals_the_adapted_model():
    """merge() folds each task's LoRA path into plain layers, through the same TaskLayer verbs as TAPS."""
    torch.manual_seed(0)
    model = ProgressiveAdapterModel(timm.create_model("resnet18", num_classes=0), {"a": 3, "b": 4},
                                    rank=2, num_stages=2).eval()
    model.assign({0: [["a", "b"]], 1: [["a"], ["b"]]})
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for key in layer.lora_B:
                layer.lora_B[key].normal_(0, 0.05)
    x = torch.randn(2, 3, 32, 32)
    for task in ("a", "b"):
        merged = tl.merge(model, task).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(x), model(x, task), atol=1e-5, rtol=1e-5)
        layer = model.backbone.layer4[1].conv2
        delta = (layer.lora_B[layer.adapter_of[task]] @ layer.lora_A[layer.adapter_of[task]]).view_as(layer.weight)
        torch.testing.assert_close(merged.layer4[1].conv2.weight, layer.base_layer.weight + delta * layer.scaling)
