"""EfficientNet-Lite0: weights file layout, TF 'SAME' padding, and ImageNet classification of
real photographs (scikit-image's offline sample images)."""
import math

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from ldm.modules.losses.efficientnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    Conv2dSame,
    EfficientNetLite0,
    efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)

# ImageNet class ids.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup


@pytest.fixture(scope="module")
def net():
    return load_efficientnet_lite0()


def photo(name: str, size: int) -> torch.Tensor:
    """scikit-image sample photo -> (1, 3, size, size) RGB in [0, 1], centre-cropped."""
    img = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255
    h, w = img.shape[-2:]
    s = min(h, w)
    img = img[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def lukemelas_keys() -> set[str]:
    """Key names lukemelas' EfficientNet gives B0-shaped stages without SE, written out here."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"_conv_stem.weight", "_conv_head.weight", "_fc.weight", "_fc.bias"}
    keys |= {f"_bn0.{b}" for b in bn} | {f"_bn1.{b}" for b in bn}
    for i in range(1 + 2 + 2 + 3 + 3 + 4 + 1):
        convs = ["_depthwise_conv", "_project_conv"] + ([] if i == 0 else ["_expand_conv"])
        bns = ["_bn1", "_bn2"] + ([] if i == 0 else ["_bn0"])
        keys |= {f"_blocks.{i}.{c}.weight" for c in convs}
        keys |= {f"_blocks.{i}.{n}.{b}" for n in bns for b in bn}
    return keys


def test_state_dict_matches_weights_file():
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    ours = EfficientNetLite0().state_dict()
    assert set(state) == lukemelas_keys()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in state.items()
    }
    headless = EfficientNetLite0(include_top=False).state_dict()
    assert set(headless) == {k for k in state if not k.startswith(("_conv_head", "_bn1", "_fc"))}


@pytest.mark.parametrize(("size", "kernel", "stride", "pad"), [
    (8, 3, 2, (0, 1)),  # total (4-1)*2 + 3 - 8 = 1: the odd pixel goes bottom/right
    (8, 5, 2, (1, 2)),  # total 3
    (7, 3, 2, (1, 1)),  # total 2
    (8, 5, 1, (2, 2)),  # stride 1: symmetric
])
def test_same_padding_matches_tf(size, kernel, stride, pad):
    conv = Conv2dSame(2, 3, kernel, stride=stride)
    x = torch.randn(1, 2, size, size)
    ref = F.conv2d(F.pad(x, [pad[0], pad[1], pad[0], pad[1]]), conv.weight, stride=stride)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / stride)
    torch.testing.assert_close(out, ref)


def test_feature_stages(net):
    feats = net.features(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 32, 32), (2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4), (2, 320, 2, 2)
    ]


@pytest.mark.parametrize(("mean", "std"), [(LITE_MEAN, LITE_STD), (IMAGENET_MEAN, IMAGENET_STD)],
                         ids=["lite_norm", "imagenet_norm"])
def test_classifies_photographs(net, mean, std):
    x = torch.cat([photo("chelsea", 224), photo("coffee", 224)])
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        probs = net(x).softmax(dim=-1)
    top = probs.argmax(dim=-1).tolist()
    assert top[0] in CAT_CLASSES, top
    assert top[1] in COFFEE_CLASSES, top
    # Confident, and the whole cat family dominates: not a lucky argmax of a broken net.
    assert probs[0, sorted(CAT_CLASSES)].sum() > 0.7
    assert probs[1, sorted(COFFEE_CLASSES)].sum() > 0.7


def test_random_weights_do_not_classify():
    """The check above can fail: an untrained net of the same shape gets the cat wrong."""
    x = (photo("chelsea", 224) - torch.tensor(LITE_MEAN)[:, None, None]) / torch.tensor(
        LITE_STD)[:, None, None]
    with torch.no_grad():
        probs = EfficientNetLite0().eval()(x).softmax(dim=-1)
    assert probs[0, sorted(CAT_CLASSES)].sum() < 0.1
