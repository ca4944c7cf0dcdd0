"""``taps_lightning.core.inject``: every Conv/Linear of a backbone wrapped and every norm made per task
in place, excluded modules left plain, a freshly injected model computing what the original did,
and the classifier found, removed and put back."""
import copy

import pytest
import timm
import torch
from torch import nn

import taps_lightning as tl
from helpers import seeded_timm_model as _create
from taps_lightning.core.inject import Classifier, restore_classifier


@pytest.mark.parametrize("name,kwargs,expected", [
    ("mobilenetv3_small_050", {}, tl.core.inject.Classifier("classifier", 1024, False)),
    ("resnetv2_18", {}, tl.core.inject.Classifier("head.fc", 512, True)),
    ("levit_128s", {"img_size": 64}, tl.core.inject.Classifier(("head", "head_dist"), 384, False)),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, tl.core.inject.Classifier(("head", "head_dist"), 192, False)),
])
def test_classifier_found_with_and_without_timm_head(name, kwargs, expected):
    """``create_backbone`` builds timm models with ``num_classes=0``: nothing left to look at, yet
    the head kind, its place(s) and the feature width must come out as from the full model."""
    assert tl.strip_classifier(_create(name, kwargs)) == expected
    headless = timm.create_model(name, num_classes=0, **kwargs)
    torch.manual_seed(1)
    assert tl.strip_classifier(headless) == expected
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3))  # the probe leaves the random stream alone


def test_unsupported_timm_classifier_is_refused():
    class WideHead(nn.Module):  # a timm-style model whose classifier is a 3x3 convolution
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 3)

        def get_classifier(self):
            return self.fc

        def reset_classifier(self, num_classes):
            self.fc = nn.Conv2d(8, num_classes, 3) if num_classes else nn.Identity()

    with pytest.raises(ValueError, match="WideHead: its classifier at fc is Conv2d.*Linear or 1x1 Conv2d classifier only"):
        tl.strip_classifier(WideHead())


class _Net(nn.Module):
    """What ``inject_taps`` meets: convolutions, linears, three kinds of norm, layers that are
    neither, and siblings whose names share a prefix (``block``, ``block2``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
        self.block2 = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.mlp(self.block2(x + self.block(x)))


def _randomize_norms(net: nn.Module) -> None:
    """Affine parameters and running statistics away from their initial 1/0, so that every norm matters."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def test_every_conv_and_linear_is_wrapped_and_every_norm_made_per_task_in_place():
    net = _Net()
    originals = dict(net.named_modules())
    gated, norms = tl.inject_taps(net, tl.TapsConfig())
    assert gated == ["stem.0", "block.0", "block2.0", "mlp.0", "mlp.3"]
    assert norms == ["stem.1", "block.1", "mlp.1"]
    for name in gated:  # the wrapper holds the very module it replaced
        layer = net.get_submodule(name)
        assert isinstance(layer, tl.TapsLayer) and layer.base_layer is originals[name], name
    for name in norms:
        norm = net.get_submodule(name)
        assert isinstance(norm, tl.TaskNorm) and norm.base_norm is originals[name], name
    for name in ("stem.2", "block2.1", "block2.2", "mlp.2"):  # neither: untouched
        assert net.get_submodule(name) is originals[name], name


def test_every_conv_of_a_timm_resnet_is_wrapped():
    reference = timm.create_model("test_resnet", num_classes=0)  # another instance, never injected
    convs = [n for n, m in reference.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    batchnorms = [n for n, m in reference.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 15 and len(batchnorms) == 15 and "layer2.0.downsample.1" in convs
    gated, norms = tl.inject_taps(timm.create_model("test_resnet", num_classes=0))
    assert gated == convs and norms == batchnorms


def test_excluded_modules_and_their_children_stay_plain_and_nothing_else():
    net = _Net()
    originals = dict(net.named_modules())
    gated, norms = tl.inject_taps(net, tl.TapsConfig(), exclude=["block", "mlp.3"])
    assert gated == ["stem.0", "block2.0", "mlp.0"]  # block2 is not under block
    assert norms == ["stem.1", "mlp.1"]
    for name in ("block.0", "block.1", "mlp.3"):
        assert net.get_submodule(name) is originals[name], name
    assert isinstance(net.get_submodule("block2.0"), tl.TapsLayer)


@pytest.mark.parametrize("build, size", [(_Net, 8), (lambda: timm.create_model("test_resnet", num_classes=0), 32)],
                         ids=["custom", "test_resnet"])
def test_a_freshly_injected_model_computes_what_the_original_did(build, size):
    """With no task active (the shared layers), and with a new task active (zero deltas, every
    layer on, norm copies of the templates), in eval and in training mode."""
    torch.manual_seed(0)
    original = build()
    _randomize_norms(original)
    net = copy.deepcopy(original)
    tl.inject_taps(net, tl.TapsConfig())
    wrappers = [m for m in net.modules() if isinstance(m, tl.TaskLayer)]
    for m in wrappers:
        m.add_task("t")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for training in (False, True):  # training mode: batch statistics, running ones updated alike
            for task in (None, "t"):
                for m in wrappers:
                    m.set_task(task)
                torch.testing.assert_close(net.train(training)(x), original.train(training)(x),
                                           msg=lambda m: f"training={training}, task={task}: {m}")


def test_a_wrapped_backbone_and_one_without_a_layer_to_gate_are_refused():
    net = _Net()
    tl.inject_taps(net)
    with pytest.raises(ValueError, match="^stem.0 is already wrapped by TAPS; wrap an unmodified backbone$"):
        tl.inject_taps(net)
    with pytest.raises(ValueError, match="^Sequential has no Conv/Linear layer to gate$"):
        tl.inject_taps(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()))


class _Classified(nn.Module):
    """Not a timm model: its classifier is found by name, the last Linear under ``head``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(4, 7))

    def forward(self, x):
        return self.head(self.body(x))


def test_the_head_goes_back_where_the_classifier_was():
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = x @ head.weight.T + head.bias  # the head by hand
    model = _Classified()
    classifier = tl.strip_classifier(model)
    assert classifier == Classifier("head.1", 4, False) and isinstance(model.head[1], nn.Identity)
    assert restore_classifier(model, classifier, head) is model
    assert isinstance(model.head[1], nn.Linear) and model.head[1] is not head  # a copy in place of the classifier
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)

    conv_model = nn.Sequential()
    conv_model.fc = nn.Identity()
    restore_classifier(conv_model, Classifier("fc", 4, conv=True), head)  # as BiT's 1x1 convolution
    assert type(conv_model.fc) is nn.Conv2d and conv_model.fc.kernel_size == (1, 1)
    with torch.no_grad():
        torch.testing.assert_close(conv_model(x[:, :, None, None])[:, :, 0, 0], expected)

    two = nn.Module()
    two.head, two.head_dist = nn.Identity(), nn.Identity()
    restore_classifier(two, Classifier(("head", "head_dist"), 4), head)  # LeViT, distilled DeiT
    assert two.head is not two.head_dist
    with torch.no_grad():
        torch.testing.assert_close(two.head(x), expected)
        torch.testing.assert_close(two.head_dist(x), expected)

    features = nn.Flatten()
    wrapped = restore_classifier(features, Classifier(None, 4), head)  # a feature extractor
    assert type(wrapped) is nn.Sequential and wrapped[0] is features
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), expected)
