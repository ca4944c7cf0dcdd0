"""TAPS on many timm families, each checked against the untouched timm model (random init, small
inputs, nothing downloaded). The README's list of tested families is this list."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import taps_lightning as tl
from helpers import randomize_tasks
from helpers import seeded_timm_model as _create
from taps_lightning.core.layers import GATED_TYPES, TapsLayer
from taps_lightning.core.norms import TaskNorm

slow = pytest.mark.slow

#: (timm name, create_model kwargs, input side). Sizes and depths are cut down so each runs in ~1 s.
FAMILIES = [
    ("resnet18", {}, 32),
    ("test_byobnet", {}, 32),
    pytest.param("densenet121", {}, 32, marks=slow),
    ("mobilenetv3_small_050", {}, 32),  # features are the 1024-wide head_hidden_size, not num_features (288)
    ("test_efficientnet", {}, 32),
    ("tf_efficientnet_b0", {}, 32),  # Conv2dSame (own forward)
    ("regnetx_002", {}, 32),
    ("convnext_atto", {}, 32),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32),  # two heads on two tokens
    ("beit_base_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}, 32),
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "depths": (1, 1, 1, 1), "embed_dim": 32,
                                      "num_heads": (1, 2, 4, 8), "window_size": 2}, 64),
    ("test_nfnet", {}, 32),  # ScaledStdConv2d (own forward)
    ("mobilevit_xxs", {}, 64),
    ("test_coatnet", {"img_size": 64}, 64),
    ("test_maxvit", {"img_size": 64}, 64),
    ("ghostnet_050", {}, 32),
    pytest.param("repvgg_a0", {}, 32, marks=slow),
    ("resnetv2_18", {}, 32),  # 1x1 conv classifier
    pytest.param("resnetv2_50x1_bit", {}, 32, marks=slow),  # BiT: StdConv2d, GroupNorm, 1x1 conv classifier
    ("dla46_c", {}, 32),  # 1x1 conv classifier
    ("levit_128s", {"img_size": 64}, 64),  # two NormLinear heads (BatchNorm1d + Linear)
]


def _ids(param):
    return param.values[0] if hasattr(param, "values") else param[0]


def _classifier_names(plain: nn.Module) -> tuple[str, ...]:
    """The classifier layer(s) as timm's pretrained_cfg names them (LeViT: ``head.linear``...)."""
    names = plain.pretrained_cfg["classifier"]
    return (names,) if isinstance(names, str) else tuple(names)


@pytest.mark.parametrize("name,kwargs,size", FAMILIES, ids=[_ids(p) for p in FAMILIES])
def test_family(name, kwargs, size, tmp_path):
    plain = _create(name, kwargs).eval()
    model = tl.TapsModel(_create(name, kwargs), {"a": 3, "b": 4}, backbone_name=name).eval()
    x = torch.randn(2, 3, size, size)

    # every Conv/Linear but the classifier is gated; nothing else
    clf = _classifier_names(plain)
    expected = {n for n, m in plain.named_modules()
                if isinstance(m, GATED_TYPES) and not any(n == c or n.startswith(c + ".") for c in clf)}
    assert set(model.gated_names) == expected
    wrapped = {id(m.base_layer) for m in model.backbone.modules() if isinstance(m, TapsLayer)}
    assert all(id(m) in wrapped for m in model.backbone.modules() if isinstance(m, GATED_TYPES))

    # zero deltas (every layer active): exactly the untouched model's pre-logits features
    with torch.no_grad():
        features = plain.forward_head(plain.forward_features(x), pre_logits=True)
        assert torch.equal(model.forward_features(x), features)
    assert torch.equal(model.forward_features(x).detach(), features)  # the gated path built for training

    # random deltas, a third of the gates off: gated == merged == saved and reloaded
    off = tuple(model.gated_names[::3])
    randomize_tasks(model, scale=0.02, off=off)
    with torch.no_grad():
        logits = model(x, "b")
        merged = tl.merge(model, "b").eval()
        assert not any(isinstance(m, (TapsLayer, TaskNorm)) for m in merged.modules())
        torch.testing.assert_close(merged(x), logits, atol=1e-4, rtol=1e-4)
        if not name.startswith("levit"):  # LeViT's own head is BatchNorm1d + Linear; merge puts a Linear there
            timm_model = _create(name, kwargs, num_classes=4).eval()  # the merged model is this timm model
            timm_model.load_state_dict(merged.state_dict())
            torch.testing.assert_close(timm_model(x), logits, atol=1e-4, rtol=1e-4)
    fresh = tl.TapsModel(_create(name, kwargs), {"a": 3}, backbone_name=name).eval()
    tl.load_task(fresh, tl.save_task(model, "b", tmp_path / "b.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, "b"), logits)

    # one training step: finite loss, score gradients, no gradient into switched-off deltas
    model.train().set_task("b")
    loss = F.cross_entropy(model(x), torch.tensor([1, 3])) + 0.5 * tl.sparsity_loss(model, "b")
    loss.backward()
    assert torch.isfinite(loss)
    layers = dict(model.taps_layers())
    for n, layer in layers.items():
        score_grad, delta_grad = layer.taps_score["b"].grad, layer.taps_delta["b"].grad
        assert score_grad is not None and torch.isfinite(score_grad), n
        assert delta_grad is not None and torch.isfinite(delta_grad).all(), n
        if n in off:
            assert not delta_grad.any(), n
        assert layer.taps_delta["a"].grad is None and layer.base_layer.weight.grad is None
    assert any(layers[n].taps_delta["b"].grad.any() for n in layers if n not in off)
    penalty_only = torch.tensor(0.5 / len(layers))  # d(lam/L sum|s|)/ds for s > 0: the task loss adds the rest
    assert any(layer.taps_score["b"].grad != penalty_only for layer in layers.values())


def test_feature_extractor_needs_num_features():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="cannot find the classifier of Sequential.*num_features=N"):
        tl.TapsModel(features, {"a": 2})
    model = tl.TapsModel(features, {"a": 2}, num_features=8).eval()
    assert model.classifier.path is None and model.gated_names == ["0"]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(tl.merge(model, "a")(x), model(x, "a"))
    with pytest.raises(ValueError, match="num_features=16, but the backbone's classifier took 512"):
        tl.TapsModel(timm.create_model("resnet18"), {"a": 2}, num_features=16)
