"""Task files: every metadata field validated in one place, every tensor's dtype checked (#31 §7)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import taps_lightning as tl
from helpers import tiny_resnet


def _saved(tmp_path):
    model = tiny_resnet({"a": 4, "b": 6}).eval()
    path = tl.save_task(model, "b", tmp_path / "b.safetensors")
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


@pytest.mark.parametrize("key,value", [("num_classes", "abc"), ("gated_layers", "x"), ("active_layers", "-1"),
                                       ("threshold", "nan"), ("layer_order", "{}"), ("class_names", "[1, 2]")])
def test_bad_metadata_is_refused_naming_file_and_key_when_read(tmp_path, key, value):
    """task_metadata (what --tasks_from reads first) validates too: no `invalid literal for int()` later."""
    tensors, meta = _saved(tmp_path)
    meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(tl.TaskFileError, match=rf"bad.safetensors: metadata {key}=.* is malformed"):
        tl.task_metadata(bad)
    with pytest.raises(tl.TaskFileError, match=rf"bad.safetensors: metadata {key}=.* is malformed"):
        tl.load_task(tiny_resnet({"a": 4}), bad)


@pytest.mark.parametrize("kind,dtype", [("score.", torch.int8), ("delta.", torch.int32), ("norm.", torch.int64),
                                        ("head.weight", torch.float16), ("num_batches_tracked", torch.float32)])
def test_a_tensor_of_another_dtype_is_refused(tmp_path, kind, dtype):
    """int8 scores would load as 0 (every layer off): any tensor whose dtype is not the model's is refused."""
    tensors, meta = _saved(tmp_path)
    key = next(k for k in tensors if (k.startswith(kind) or k.endswith(kind)) and tensors[k].dtype != dtype)
    tensors[key] = tensors[key].to(dtype)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    model = tiny_resnet({"a": 4})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tl.TaskFileError, match=rf"bad.safetensors: wrong tensor dtypes: {key} "):
        tl.load_task(model, bad)
    assert model.tasks == ["a"] and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_a_task_trained_in_any_precision_is_stored_as_float32_and_loads(tmp_path, dtype):
    model = tiny_resnet({"a": 4}).to(dtype)
    path = tl.save_task(model, "a", tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes <= {torch.float32, torch.int64}
    fresh = tiny_resnet({"z": 2})
    assert tl.load_task(fresh, path) == "a"
    torch.testing.assert_close(fresh.heads["a"].weight, model.heads["a"].weight.float())
    on_same = tiny_resnet({"z": 2}).to(dtype)  # and onto a model of that precision
    assert tl.load_task(on_same, path, strict_base=False) == "a"


@pytest.mark.parametrize("name", ["last.ckpt", "weights.pth", "task.safetensors"])
def test_a_torch_file_given_as_a_task_file_points_to_ckpt_path(tmp_path, name):
    """A checkpoint passed where a task file goes (``--tasks_from last.ckpt``) is named as one, whatever
    its suffix, and the message says where it belongs; a file that is neither says it is unreadable."""
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    for read in (tl.task_metadata, lambda p: tl.load_task(tiny_resnet({"a": 4}), p)):
        with pytest.raises(tl.TaskFileError, match=rf"{name}: a torch file .* not a .safetensors task file; .*--ckpt_path"):
            read(path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(tl.TaskFileError, match=r"junk.safetensors: not a readable .safetensors task file .*save_task"):
        tl.task_metadata(junk)
