"""Tests of `abkd.cifar.models`, the CIFAR-100 model zoo: output and feature shapes of every model, parameter counts
and state-dict layouts equal to those of the reference implementations (RepDistiller `models/`, identical in
mdistiller `mdistiller/models/cifar/`), other class counts, gradients, and the registry's errors."""
import hashlib

import pytest
import torch

from abkd.cifar import models as M

# Parameters of the reference models at num_classes=100 (RepDistiller's model_dict entries; mdistiller's agree).
REFERENCE_PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "ResNet50": 23_705_252, "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528,
}
# Width of the pooled features fed to the classifier.
FEATURE_DIM = {
    **dict.fromkeys(["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"], 64),
    "resnet8x4": 256, "resnet32x4": 256, "wrn_16_1": 64, "wrn_16_2": 128, "wrn_40_1": 64, "wrn_40_2": 128,
    **dict.fromkeys(["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"], 512),
    "ResNet50": 2048, "MobileNetV2": 1280, "ShuffleV1": 960, "ShuffleV2": 1024,
}
# State dict of the reference models at num_classes=100: number of entries and the first 16 hex digits of the
# sha256 of the sorted "name:shape" lines (`layout` below), so that the reference checkpoints load.
REFERENCE_LAYOUT = {
    "resnet8": (56, "166d31a811b31c5f"), "resnet14": (92, "8525efa6fc491f19"), "resnet20": (128, "6db44f39e3bff21f"),
    "resnet32": (200, "325ee6108709f7b5"), "resnet44": (272, "f1263f7b0ed71e1a"),
    "resnet56": (344, "3977b81559d8630f"), "resnet110": (668, "7f8e5ac1814e480a"),
    "resnet8x4": (62, "5d5871b403f3a649"), "resnet32x4": (206, "610ad29043c56b33"),
    "wrn_16_1": (82, "f6cf46040022f13d"), "wrn_16_2": (83, "bdbc50a2b3205f84"), "wrn_40_1": (226, "deef22602ae7584b"),
    "wrn_40_2": (227, "bf5731c8e8e2b95f"),
    "vgg8": (37, "d9f8d7533423754e"), "vgg11": (58, "6592bd1869a5938f"), "vgg13": (72, "7bec65f1ca17a0bf"),
    "vgg16": (93, "b420ddff7e4306ec"), "vgg19": (114, "2d318270df30c723"),
    "ResNet50": (320, "d4a9e0738c8f8385"), "MobileNetV2": (320, "10e9036e17013c38"),
    "ShuffleV1": (296, "eb3bcbc847930cce"), "ShuffleV2": (338, "b7e2c3e764687767"),
}
NAMES = list(REFERENCE_PARAMS)


def layout(model: torch.nn.Module) -> str:
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_names():
    assert M.MODEL_NAMES == tuple(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_model(name, x):
    torch.manual_seed(0)
    model = M.create_model(name).eval()
    assert M.count_parameters(model) == sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMS[name]
    assert (len(model.state_dict()), layout(model)) == REFERENCE_LAYOUT[name]
    with torch.no_grad():
        logits = model(x)
        logits2, feats = model(x, return_features=True)
    assert logits.shape == (2, 100) and feats.shape == (2, FEATURE_DIM[name]) and model.feature_dim == FEATURE_DIM[name]
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(model.head(feats), logits)


@pytest.mark.parametrize("name", NAMES)
def test_other_num_classes(name, x):
    model = M.create_model(name, num_classes=10).eval()
    assert M.count_parameters(model) == REFERENCE_PARAMS[name] - 90 * (FEATURE_DIM[name] + 1)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    assert logits.shape == (2, 10) and feats.shape == (2, FEATURE_DIM[name])


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_every_parameter_gets_a_gradient(name, x):
    torch.manual_seed(0)
    model = M.create_model(name).train()
    logits, feats = model(x, return_features=True)
    (logits.logsumexp(-1).sum() + feats.square().mean()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_state_dict_round_trip(x):
    a, b = M.create_model("resnet8x4").eval(), M.create_model("resnet8x4").eval()
    b.load_state_dict(a.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_initialization():
    vgg, wrn = M.create_model("vgg8"), M.create_model("wrn_16_2")
    assert vgg.classifier.bias.abs().sum() == 0 and 0.005 < vgg.classifier.weight.std() < 0.015
    assert wrn.fc.bias.abs().sum() == 0
    conv = wrn.block3.layer[0].conv1  # 3x3 conv to 128 channels: He-normal, std sqrt(2 / (9 * 128))
    assert abs(conv.weight.std().item() / (2 / 1152) ** 0.5 - 1) < 0.05


def test_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet18'.*resnet8, resnet14.*ShuffleV2"):
        M.create_model("resnet18")
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("Resnet8")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_classes must be at least 1"):
            M.create_model("resnet8", num_classes=bad)
    for bad in (2.0, "10", True):
        with pytest.raises(TypeError, match="num_classes must be an integer"):
            M.create_model("resnet8", num_classes=bad)
    with pytest.raises(ValueError, match="6n\\+2"):
        M.ResNet(10)
    with pytest.raises(ValueError, match="6n\\+4"):
        M.WideResNet(20, 1)


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", NAMES)
def test_grayscale_stem_and_other_sizes(name):
    "in_channels=1 changes only the stem (its weight loses 2 of 3 input channels); MIN_INPUT_SIZE to 32 pixels run."
    torch.manual_seed(0)
    gray, rgb = M.create_model(name, num_classes=7, in_channels=1).eval(), M.create_model(name, num_classes=7)
    assert first_conv(gray).in_channels == 1 and first_conv(rgb).in_channels == 3
    assert M.count_parameters(rgb) - M.count_parameters(gray) == first_conv(rgb).weight.numel() * 2 // 3
    rgb_keys = {k: v.shape for k, v in rgb.state_dict().items()}
    changed = [k for k, v in gray.state_dict().items() if rgb_keys[k] != v.shape]
    assert changed == [next(k for k in rgb_keys if k.endswith("weight"))]
    with torch.no_grad():
        for size in (M.MIN_INPUT_SIZE, 28, M.INPUT_SIZE):
            logits, feats = gray(torch.randn(2, 1, size, size), return_features=True)
            assert logits.shape == (2, 7) and feats.shape == (2, FEATURE_DIM[name]) and torch.isfinite(logits).all()


def test_vgg_refuses_inputs_below_the_minimum():
    "Below MIN_INPUT_SIZE the third max-pool has nothing to pool (the reason for the constant)."
    with pytest.raises(RuntimeError):
        with torch.no_grad(): M.create_model("vgg8").eval()(torch.randn(1, 3, M.MIN_INPUT_SIZE // 2, M.MIN_INPUT_SIZE // 2))


def test_in_channels_errors():
    with pytest.raises(ValueError, match="in_channels must be at least 1"):
        M.create_model("resnet8", in_channels=0)
    with pytest.raises(TypeError, match="in_channels must be an integer"):
        M.create_model("resnet8", in_channels=1.0)
