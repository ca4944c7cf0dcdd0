"""save_task / load_task / merge on small and on every supported architecture."""
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import taps_lightning as tl
from helpers import randomize_tasks, tiny_resnet
from taps_lightning.core.layers import TapsLayer
from taps_lightning.core.norms import TaskNorm

# Each task switches off other layers, so that exporting one task with another's gates fails.
OFF = {"a": ("layer1.0.conv2", "layer2.1.conv1", "layer4.0.conv2"),
       "b": ("layer1.0.conv1", "layer3.0.downsample.0", "layer4.1.conv2")}


@pytest.mark.parametrize("task", ["a", "b"])
def test_merge_matches_gated_model_and_is_plain(task):
    model = tiny_resnet({"a": 4, "b": 6}).eval()
    randomize_tasks(model, off=OFF)
    merged = tl.merge(model, task).eval()
    assert type(merged) is type(model.backbone)
    assert not any(isinstance(m, (TapsLayer, TaskNorm, tl.TapsModel)) for m in merged.modules())
    assert merged.fc.out_features == model.num_classes[task]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model.set_task(task)
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    # folding is the sum of the tensors where this task's gate is on, the base where it is off,
    # whatever the other task's gate on that layer
    merged_layers = dict(merged.named_modules())
    for name, layer in model.taps_layers():
        base = layer.base_layer.weight
        expected = base if name in OFF[task] else base + layer.taps_delta[task]
        torch.testing.assert_close(merged_layers[name].weight, expected, msg=name)


@pytest.mark.parametrize("task", ["a", "b"])
def test_save_load_roundtrip_and_file_contents(task, tmp_path):
    model = tiny_resnet({"a": 4, "b": 6}).eval()
    randomize_tasks(model, off=OFF)
    path = tl.save_task(model, task, tmp_path / f"{task}.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    deltas = {k[len("delta."):] for k in keys if k.startswith("delta.")}
    assert deltas == set(model.gated_names) - set(OFF[task])  # this task's active deltas, no inactive one
    stored = load_file(str(path))
    for name, layer in model.taps_layers():  # this task's tensors, not another task's
        assert stored[f"score.{name}"].item() == layer.taps_score[task].item()
        if name in deltas:
            assert torch.equal(stored[f"delta.{name}"], layer.taps_delta[task].detach())
    assert meta["backbone"] == "resnet18" and float(meta["threshold"]) == 0.1
    assert meta["num_classes"] == str(model.num_classes[task]) and meta["active_layers"] == str(len(deltas))

    fresh = tiny_resnet({"c": 4}).eval()  # same seed: same shared base
    assert tl.load_task(fresh, path) == task
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_task(task); fresh.set_task(task)
        torch.testing.assert_close(fresh(x), model(x))
    assert [n for n, on in tl.gate_states(fresh, task).items() if not on] == [
        n for n in fresh.layer_order() if n in OFF[task]]
    # loading again replaces the task
    tl.load_task(fresh, path)
    assert fresh.tasks == ["c", task]


def test_load_rejects_bad_files(tmp_path):
    model = tiny_resnet({"a": 4})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tl.load_task(model, tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(tl.TaskFileError, match="junk.safetensors.*not a readable"):
        tl.load_task(model, junk)

    other = tl.TapsModel(timm.create_model("resnet34", num_classes=0), {"a": 4})
    path = tl.save_task(other, "a", tmp_path / "r34.safetensors")
    with pytest.raises(tl.TaskFileError, match="r34.safetensors: made for backbone 'resnet34'.*this model is 'resnet18'"):
        tl.load_task(model, path)

    torch.manual_seed(123)  # same architecture, other shared weights (as after joint training)
    other_base = tl.TapsModel(timm.create_model("resnet18", num_classes=0), {"a": 4})
    path = tl.save_task(other_base, "a", tmp_path / "joint.safetensors")
    with pytest.raises(tl.TaskFileError, match="different shared weights"):
        tl.load_task(model, path, task="c")
    assert "c" not in model.tasks
    tl.load_task(model, path, task="c", strict_base=False)
    assert "c" in model.tasks


@pytest.mark.parametrize(
    "arch,size",
    [("resnet18", 32), ("resnet50", 32), ("densenet121", 32), ("vit_small_patch16_224", 224), ("convnext_atto", 32)],
)
def test_api_on_architectures(arch, size, tmp_path):
    torch.manual_seed(0)
    model = tl.TapsModel(timm.create_model(arch, pretrained=False, num_classes=0), {"flowers": 5, "cars": 3})
    model.add_task("sketch", 4)
    model.remove_task("flowers")
    names = tuple(model.gated_names)
    randomize_tasks(model, scale=0.01, off={"cars": names[::3], "sketch": names[1::3]})
    model.eval().set_task("cars")
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(tl.merge(model, "cars").eval()(x), y, atol=1e-4, rtol=1e-4)
    path = tl.save_task(model, "cars", tmp_path / "cars.safetensors")
    torch.manual_seed(0)
    fresh = tl.TapsModel(timm.create_model(arch, pretrained=False, num_classes=0))
    tl.load_task(fresh, path)
    fresh.eval().set_task("cars")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y)
    counts = tl.count_params(model, "cars")
    assert 0 < counts["active_layers"] < counts["gated_layers"] == len(model.gated_names)
    if arch.startswith("vit"):
        kinds = {n.rsplit(".", 1)[-1] for n in model.gated_names}
        assert {"qkv", "proj", "fc1", "fc2"} <= kinds


def test_class_names_are_stored_and_read_back(tmp_path):
    model = tiny_resnet({"a": 3, "b": 5})
    path = tl.save_task(model, "a", tmp_path / "a.safetensors", class_names=["cat", "dog", "emu"])
    meta = tl.task_metadata(path)
    assert meta["class_names"] == ["cat", "dog", "emu"] and meta["task"] == "a" and meta["num_classes"] == "3"
    assert tl.task_metadata(tl.save_task(model, "b", tmp_path / "b.safetensors"))["class_names"] is None
    with pytest.raises(ValueError, match="task 'b': 2 class names for 5 classes"):
        tl.save_task(model, "b", tmp_path / "c.safetensors", class_names=["x", "y"])
    assert not (tmp_path / "c.safetensors").exists()
    fresh = tiny_resnet({"z": 2})
    assert tl.load_task(fresh, path) == "a" and fresh.num_classes["a"] == 3
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tl.task_metadata(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(tl.TaskFileError, match="junk.safetensors.*not a readable"):
        tl.task_metadata(tmp_path / "junk.safetensors")
