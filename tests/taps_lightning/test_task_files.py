"""Task files that are wrong in any way are refused, naming the file, and leave the model untouched."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import taps_lightning as tl
from helpers import randomize_tasks, tiny_resnet

OFF = ("layer1.0.conv1", "layer4.1.conv2")


def _saved(tmp_path, task="b"):
    model = tiny_resnet({"a": 4, "b": 6}).eval()
    randomize_tasks(model, off=OFF)
    path = tl.save_task(model, task, tmp_path / f"{task}.safetensors")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    return model, path, tensors, meta


def _rewrite(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)
    return path


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_broadcastable_but_wrong_shapes_are_refused(tmp_path):
    model, path, tensors, meta = _saved(tmp_path)
    name = "layer1.0.conv2"  # [64, 64, 3, 3]; [64, 1, 1, 1] would broadcast in copy_
    tensors[f"delta.{name}"] = tensors[f"delta.{name}"][:, :1, :1, :1].contiguous()
    bad = _rewrite(tmp_path / "broadcast.safetensors", tensors, meta)
    fresh = tiny_resnet({"a": 4})
    with pytest.raises(tl.TaskFileError, match=r"broadcast.safetensors: wrong tensor shapes: delta.layer1.0.conv2 "
                                               r"\(64, 1, 1, 1\) \(expected \(64, 64, 3, 3\)\)"):
        tl.load_task(fresh, bad)
    assert fresh.tasks == ["a"]


def test_a_score_must_be_one_element(tmp_path):
    _, path, tensors, meta = _saved(tmp_path)
    tensors["score.conv1"] = torch.tensor([0.2, 0.2])
    bad = _rewrite(tmp_path / "two_scores.safetensors", tensors, meta)
    with pytest.raises(tl.TaskFileError, match=r"two_scores.safetensors: wrong tensor shapes: score.conv1 \(2,\)"):
        tl.load_task(tiny_resnet({"a": 4}), bad)


@pytest.mark.parametrize("key", ["delta.layer2.0.conv1", "score.layer3.1.conv1", "norm.bn1.running_var", "head.weight"])
def test_non_finite_values_are_refused_on_load(tmp_path, key):
    _, path, tensors, meta = _saved(tmp_path)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan") if "score" not in key else float("inf")
    bad = _rewrite(tmp_path / "nan.safetensors", tensors, meta)
    with pytest.raises(tl.TaskFileError, match=rf"nan.safetensors: non-finite values \(NaN/inf\) in {key}"):
        tl.load_task(tiny_resnet({"a": 4}), bad)


def test_non_finite_task_is_neither_saved_nor_merged(tmp_path):
    model = tiny_resnet({"a": 4, "b": 6})
    randomize_tasks(model, off=OFF)
    with torch.no_grad():
        model.backbone.layer2[0].conv1.taps_delta["b"][0, 0, 0, 0] = float("nan")
        model.heads["a"].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"save_task\('b'\).*non-finite values \(NaN/inf\) in delta.layer2.0.conv1"):
        tl.save_task(model, "b", tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(ValueError, match=r"merge\('b'\).*delta.layer2.0.conv1"):
        tl.merge(model, "b")
    with pytest.raises(ValueError, match=r"merge\('a'\).*head.bias"):
        tl.merge(model, "a")
    # a NaN delta behind a closed gate is never used, so it neither blocks saving nor merging
    with torch.no_grad():
        model.backbone.layer2[0].conv1.taps_score["b"].fill_(0.0)
    tl.save_task(model, "b", tmp_path / "b.safetensors")
    tl.merge(model, "b")


def test_failed_load_leaves_an_existing_task_exactly_as_it_was(tmp_path):
    model, path, tensors, meta = _saved(tmp_path)
    model.set_task("b")
    before = _state(model)
    tensors["head.weight"] = tensors["head.weight"][:, :10].contiguous()  # damaged at the very end
    bad = _rewrite(tmp_path / "late_error.safetensors", tensors, meta)
    with pytest.raises(tl.TaskFileError, match="late_error.safetensors: wrong tensor shapes: head.weight"):
        tl.load_task(model, bad)
    assert model.tasks == ["a", "b"] and model.active_task == "b"
    _assert_same_state(model, before)
    # and a good load over an active task keeps it active
    tl.load_task(model, path)
    assert model.active_task == "b"


def test_an_active_layer_without_its_delta_is_refused(tmp_path):
    _, path, tensors, meta = _saved(tmp_path)
    del tensors["delta.layer3.0.conv2"]
    bad = _rewrite(tmp_path / "no_delta.safetensors", tensors, meta)
    with pytest.raises(tl.TaskFileError, match="no_delta.safetensors: layer layer3.0.conv2 is active.*missing"):
        tl.load_task(tiny_resnet({"a": 4}), bad)


@pytest.mark.parametrize("key,value,message", [
    ("num_classes", None, "metadata key 'num_classes' is missing"),
    ("layout_signature", None, "metadata key 'layout_signature' is missing"),
    ("num_classes", "six", r"metadata num_classes='six' is malformed"),
    ("num_classes", "0", r"metadata num_classes='0' is malformed"),
    ("threshold", "tau", r"metadata threshold='tau' is malformed"),
    ("class_names", "[not json", r"metadata class_names='\[not json' is malformed"),
    ("class_names", '["one", "two"]', r"metadata class_names is malformed \(a JSON list of 6 names expected\)"),
])
def test_missing_or_malformed_metadata_names_file_and_key(tmp_path, key, value, message):
    _, path, tensors, meta = _saved(tmp_path)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    bad = _rewrite(tmp_path / "meta.safetensors", tensors, meta)
    with pytest.raises(tl.TaskFileError, match=rf"meta.safetensors: {message}"):
        tl.load_task(tiny_resnet({"a": 4}), bad)


def test_weights_file_that_is_not_tensors_is_refused_without_running_it(tmp_path):
    backbone = tl.create_backbone("resnet18")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04this is not a torch file")
    with pytest.raises(ValueError, match=r"junk.pth: cannot read the weights file .*expected a state dict of tensors"):
        tl.load_weights(backbone, junk)
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pth"
    torch.save({"x": _RunsCode(str(marker))}, evil)
    with pytest.raises(ValueError, match="evil.pth: cannot read the weights file") as info:
        tl.load_weights(backbone, evil)
    assert "weights_only=False" not in str(info.value)  # never suggest the unsafe way
    assert not marker.exists()


class _RunsCode:
    """Pickles to a call of ``open(path, "w")``: unpickling it with weights_only=False creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
