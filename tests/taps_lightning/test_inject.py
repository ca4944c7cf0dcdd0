"""``taps_lightning.inject``: every Conv/Linear of a backbone wrapped and every norm made per task
in place, excluded modules left plain, a freshly injected model computing what the original did,
and the classifier found, removed and put back."""
import pytest
import timm
import torch
from torch import nn

import taps_lightning as tl
from helpers import seeded_timm_model as _create


@pytest.mark.parametrize("name,kwargs,expected", [
    ("mobilenetv3_small_050", {}, tl.inject.Classifier("classifier", 1024, False)),
    ("resnetv2_18", {}, tl.inject.Classifier("head.fc", 512, True)),
    ("levit_128s", {"img_size": 64}, tl.inject.Classifier(("head", "head_dist"), 384, False)),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, tl.inject.Classifier(("head", "head_dist"), 192, False)),
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
