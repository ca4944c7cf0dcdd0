"""TapsModel: task switching, freezing, sparsity loss, gate order and parameter counts."""
import math

import pytest
import timm
import torch
from torch import nn

import taps_lightning as tl
from helpers import assert_rounding_close, explicit_task_network, randomize_tasks, tiny_resnet


@pytest.mark.parametrize("training", [False, True])
def test_switching_tasks_switches_deltas_gates_and_norms(training):
    model = tiny_resnet({"a": 4, "b": 4}).train(training)
    randomize_tasks(model, off={"a": ("layer1.0.conv1", "layer3.1.conv2"), "b": ("layer2.0.conv2",)})
    with torch.no_grad():  # one head for both: only the backbone's task-specific parts can tell them apart
        model.heads["b"].load_state_dict(model.heads["a"].state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = {t: explicit_task_network(model, t)[0].train(training)(x) for t in ("a", "b")}
    assert not torch.allclose(expected["a"], expected["b"], atol=1e-3)
    for task in ("a", "b", "a", "b"):  # eval: the cached merged weight must follow the switch too
        model.set_task(task)
        with torch.set_grad_enabled(training):
            torch.testing.assert_close(model(x), expected[task], msg=lambda m: f"after set_task({task!r}): {m}")


def test_no_task_is_the_plain_backbone():
    torch.manual_seed(3)
    plain = timm.create_model("resnet18", num_classes=0).eval()
    torch.manual_seed(3)
    model = tl.TapsModel(timm.create_model("resnet18", num_classes=0), {"a": 2}).eval()
    model.set_task(None)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), plain(x))


def test_add_and_remove_task():
    model = tiny_resnet({"a": 3})
    model.add_task("sketch", 250)
    assert model.tasks == ["a", "sketch"] and model.num_classes["sketch"] == 250
    model.set_task("sketch")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 250)
    model.remove_task("a")
    assert model.tasks == ["sketch"]
    assert all("a" not in layer.taps_delta for _, layer in model.taps_layers())
    with pytest.raises(KeyError, match="unknown task 'a'.*sketch"):
        model.set_task("a")
    with pytest.raises(ValueError, match="exists already"):
        model.add_task("sketch", 3)
    with pytest.raises(ValueError, match="letters, digits"):
        model.add_task("bad.name", 3)


def test_incremental_freezes_base_and_joint_trains_it():
    inc = tiny_resnet(freeze_base=True)
    joint = tiny_resnet(freeze_base=False)
    conv = inc.backbone.conv1
    assert not conv.base_layer.weight.requires_grad and conv.taps_delta["a"].requires_grad
    assert joint.backbone.conv1.base_layer.weight.requires_grad
    # norms are task-specific in both modes, and the pre-trained template never trains
    for model in (inc, joint):
        assert model.backbone.bn1.norms["a"].weight.requires_grad
        assert not model.backbone.bn1.base_norm.weight.requires_grad


def _independent_gated_names(arch: str) -> list[str]:
    net = timm.create_model(arch, num_classes=0)
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_sparsity_loss_value_and_layer_count():
    model = tiny_resnet({"a": 3})
    names = _independent_gated_names("resnet18")
    assert len(names) == 20  # 1 stem + 16 block convs + 3 downsample convs; no fc (num_classes=0)
    assert sorted(model.gated_names) == sorted(names)
    values = torch.linspace(-0.5, 0.5, len(names))
    with torch.no_grad():
        for (name, layer), v in zip(model.taps_layers(), values):
            layer.taps_score["a"].fill_(float(v))
    loss = tl.sparsity_loss(model, "a")
    exact = math.fsum(abs(float(v)) for v in values) / 20  # the fp32 values, summed exactly
    assert_rounding_close(loss, torch.tensor(exact), exact, terms=21)  # 20 positive terms and a division
    loss.backward()
    grads = torch.stack([layer.taps_score["a"].grad for _, layer in model.taps_layers()])
    torch.testing.assert_close(grads, torch.sign(values) / 20)


def test_exclude_keeps_modules_shared_and_ungated():
    torch.manual_seed(0)
    model = tl.TapsModel(timm.create_model("resnet18", num_classes=0), {"a": 3}, exclude=["conv1", "layer4"])
    reference = dict(timm.create_model("resnet18", num_classes=0).named_modules())
    kept = [n for n in _independent_gated_names("resnet18") if n != "conv1" and not n.startswith("layer4.")]
    assert sorted(model.gated_names) == sorted(kept) and len(kept) == 20 - 1 - 5
    assert "bn1" in model.norm_names and not any(n.startswith("layer4.") for n in model.norm_names)
    for name in ("conv1", "layer4.0.conv1", "layer4.1.bn2", "layer4.0.downsample.0"):
        assert type(model.backbone.get_submodule(name)) is type(reference[name])  # the plain module, unwrapped
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.backbone.layer4.parameters())
    assert all(id(p) not in shared for p in model.task_parameters("a"))


def test_gate_states_follow_forward_order():
    model = tiny_resnet({"a": 3})
    model(torch.randn(2, 3, 32, 32))
    order = list(tl.gate_states(model, "a"))
    # in timm's ResNet the stem runs first and a block's downsample runs after its convs
    assert order[0] == "conv1"
    assert order.index("layer2.0.downsample.0") > order.index("layer2.0.conv2")
    assert order.index("layer2.0.downsample.0") < order.index("layer2.1.conv1")
    with torch.no_grad():
        model.backbone.get_submodule("layer3.1.conv2").taps_score["a"].fill_(0.0)
    states = tl.gate_states(model, "a")
    assert states["layer3.1.conv2"] is False and sum(states.values()) == 19


def test_count_params_matches_hand_count():
    model = tiny_resnet({"a": 7})
    on = {"conv1", "layer1.0.conv2", "layer2.0.downsample.0", "layer4.1.conv1"}
    with torch.no_grad():
        for name, layer in model.taps_layers():
            layer.taps_score["a"].fill_(0.5 if name in on else -0.5)
    # independent arithmetic on an untouched resnet18
    ref = dict(timm.create_model("resnet18", num_classes=0).named_modules())
    delta = sum(ref[n].weight.numel() for n in on)
    assert delta == 3 * 64 * 49 + 64 * 64 * 9 + 128 * 64 + 512 * 512 * 9
    norms = sum(2 * m.num_features for m in ref.values() if isinstance(m, nn.BatchNorm2d))
    head = 512 * 7 + 7
    base = sum(p.numel() for p in timm.create_model("resnet18", num_classes=0).parameters())
    counts = tl.count_params(model, "a")
    assert counts["active_layers"] == 4 and counts["gated_layers"] == 20
    assert counts["delta_params"] == delta and counts["norm_params"] == norms and counts["head_params"] == head
    assert counts["task_params"] == delta + norms + head
    assert counts["base_params"] == base == 11_176_512
    assert counts["fraction"] == pytest.approx((delta + norms + head) / base)
    assert tl.total_params_multiple(model) == pytest.approx(1 + (delta + norms + head) / base)


def test_scores_start_active():
    model = tiny_resnet({"a": 3}, score_init=0.15, threshold=0.1)
    assert all(tl.gate_states(model, "a").values())
    assert tl.count_params(model, "a")["active_layers"] == 20


def test_forward_without_task_is_a_clear_error():
    backbone = timm.create_model("resnet18", num_classes=0)
    model = tl.TapsModel(backbone)
    with pytest.raises(RuntimeError, match="no active task"):
        model(torch.randn(1, 3, 32, 32))


def test_torchvision_backbone_is_supported():
    import torchvision

    model = tl.TapsModel(torchvision.models.mobilenet_v2(weights=None), {"a": 4})
    assert model.classifier.path == "classifier.1" and model.num_features == 1280
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
