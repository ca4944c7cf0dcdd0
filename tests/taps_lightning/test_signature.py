"""``taps_lightning.core.signature``: what ties a task file to a model. The layout signature covers the
names and shapes of the gated layers and task norms (not their values); the base fingerprint covers
the values of the shared weights (not what a task owns)."""
import copy
from collections import OrderedDict

import torch
from torch import nn

import taps_lightning as tl
from helpers import randomize_tasks
from taps_lightning.core.signature import base_fingerprint, layout_signature


def _tiny(seed: int = 0, conv="conv", kernel: int = 3, norm="bn", norm_affine: bool = True, tasks=None,
          exclude=("shared",)) -> tl.TapsModel:
    """conv 3->4 (``kernel``) -> BatchNorm -> conv 4->6 1x1 -> GroupNorm -> an excluded (shared,
    ungated) linear 6->5; the first conv's and first norm's names and the GroupNorm's affine weights
    can be changed."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(OrderedDict([
        (conv, nn.Conv2d(3, 4, kernel)), (norm, nn.BatchNorm2d(4)), ("act", nn.ReLU()),
        ("proj", nn.Conv2d(4, 6, 1, bias=False)), ("gn", nn.GroupNorm(2, 6, affine=norm_affine)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("shared", nn.Linear(6, 5))]))
    return tl.TapsModel(backbone, tasks or {"a": 3, "b": 2}, num_features=5, exclude=exclude)


# -- layout ------------------------------------------------------------------------------------------------
def test_the_layout_signature_is_the_same_whatever_the_weights_and_tasks():
    model, other = _tiny(seed=0), _tiny(seed=1, tasks={"c": 7})
    assert not torch.equal(model.backbone.conv.base_layer.weight, other.backbone.conv.base_layer.weight)
    randomize_tasks(other, off=("proj",))
    with torch.no_grad():
        for p in other.backbone.bn.base_norm.parameters():
            p.add_(1.0)
    signature = layout_signature(model)
    assert len(signature) == 16 and int(signature, 16) >= 0  # 16 hexadecimal characters
    assert layout_signature(other) == signature
    other(torch.randn(2, 3, 8, 8), "c")  # recording the forward order changes nothing either
    assert layout_signature(other) == signature


def test_the_layout_signature_changes_with_a_gated_layers_shape_or_name():
    signature = layout_signature(_tiny())
    assert layout_signature(_tiny(kernel=5)) != signature  # same names, one weight 4x3x5x5 instead of 4x3x3x3
    assert layout_signature(_tiny(conv="first")) != signature  # same shapes in the same order, one name changed
    assert layout_signature(_tiny(exclude=("shared", "proj"))) != signature  # one layer less is gated


def test_the_layout_signature_changes_with_a_task_norms_shape_or_name():
    signature = layout_signature(_tiny())
    assert layout_signature(_tiny(norm_affine=False)) != signature  # a GroupNorm without weight and bias
    assert layout_signature(_tiny(norm="norm")) != signature  # same shapes, one norm renamed


# -- shared weights ------------------------------------------------------------------------------------------
#: The tiny model's shared weights: the gated layers' base weights and biases and the ungated layer.
SHARED = ["conv.base_layer.weight", "conv.base_layer.bias", "proj.base_layer.weight", "shared.weight", "shared.bias"]


def test_the_base_fingerprint_changes_when_one_element_of_any_shared_weight_moves_by_one_ulp():
    model = _tiny()
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    assert [names[id(p)] for p in model.shared_parameters()] == SHARED
    fingerprint = base_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0  # 16 hexadecimal characters
    for name in SHARED:
        changed = copy.deepcopy(model)
        with torch.no_grad():
            flat = changed.backbone.get_parameter(name).view(-1)
            flat[-1] = torch.nextafter(flat[-1], torch.tensor(float("inf")))  # the smallest change there is
        assert base_fingerprint(changed) != fingerprint, name
    assert base_fingerprint(model) == fingerprint


def test_the_base_fingerprint_is_the_same_for_the_same_shared_weights():
    assert base_fingerprint(_tiny(seed=0)) == base_fingerprint(_tiny(seed=0, tasks={"c": 9}))
    assert base_fingerprint(_tiny(seed=0)) != base_fingerprint(_tiny(seed=1))


def test_the_base_fingerprint_ignores_what_tasks_own():
    model = _tiny()
    fingerprint = base_fingerprint(model)
    randomize_tasks(model, off=("proj",))  # deltas, scores, task norms and their statistics
    with torch.no_grad():
        for head in model.heads.values():
            head.weight.add_(1.0)
        for _, norm in model.task_norms():  # the norm templates: only copied when a task is added
            for p in norm.base_norm.parameters():
                p.add_(1.0)
    model.add_task("c", 4)
    model.remove_task("a")
    assert base_fingerprint(model) == fingerprint
