"""Local backbone weights (``--model.weights``): by name, by order with every shape checked, SHA-256 pinned."""
import hashlib

import pytest
import timm
import torch
from safetensors.torch import save_file

from taps_lightning.models.factory import create_backbone, load_weights
from taps_lightning.training.compose import create_taps_module


def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}


def _assert_state_equal(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_local_weights_load_by_name_and_by_order(tmp_path):
    state = _trained_state()
    by_name = tmp_path / "w.safetensors"
    save_file(state, str(by_name))
    torch.manual_seed(0)  # other random initial weights
    model = timm.create_model("test_resnet", num_classes=0)
    assert load_weights(model, by_name) == "by name"
    _assert_state_equal(model, state)

    # another library's names, the same tensors in the same order, plus a classifier the model lacks
    renamed = {f"features.{i}": v for i, v in enumerate(state.values())}
    renamed.update({"classifier.weight": torch.zeros(10, 8), "classifier.bias": torch.zeros(10)})
    torch.save(renamed, tmp_path / "other.pth")
    model = timm.create_model("test_resnet", num_classes=0)
    assert load_weights(model, tmp_path / "other.pth") == "by order"
    _assert_state_equal(model, state)


def test_local_weights_of_another_shape_are_refused(tmp_path):
    state = _trained_state()
    first = next(iter(state))
    swapped = {f"t{i}": v for i, v in enumerate(state.values())}
    swapped["t0"] = torch.zeros(*state[first].shape[:-1], state[first].shape[-1] + 1)
    torch.save(swapped, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad.pth: cannot load into .*mapping by order fails \(" + first):
        create_backbone("test_resnet", weights=tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        create_backbone("test_resnet", weights=tmp_path / "missing.pth")


def test_weights_sha256_pins_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_trained_state(), str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    module = create_taps_module(backbone="test_resnet", tasks={"a": 2}, weights=str(path), weights_sha256=digest)
    assert torch.equal(module.model.backbone.conv1[0].base_layer.weight, _trained_state()["conv1.0.weight"])
    with pytest.raises(ValueError, match=r"w.safetensors: SHA-256 differs from the expected 0{64}"):
        create_taps_module(backbone="test_resnet", tasks={"a": 2}, weights=str(path), weights_sha256="0" * 64)
