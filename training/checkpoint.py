"""Run-directory files: model card, best weights (safetensors), resume state; all written atomically.

Layout (docs/contracts.md): ``model.json`` (ModelCard), ``best.safetensors``,
``last.pt`` (resume state, loadable with ``weights_only=True``), ``config.json``,
``metrics.json``, ``report.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.fsio import atomic_write, atomic_write_json
from runtime.inference.preprocess import InputSpec

from .config_io import refuse_unknown

MODEL_CARD = "model.json"
BEST = "best.safetensors"
LAST = "last.pt"


class CheckpointError(ValueError):
    """A run directory / checkpoint that cannot be loaded; the message names the file and key."""


# -- atomic writes: runtime.fsio (atomic_write_json / atomic_write_text re-exported for callers) --
def save_safetensors(
    path: str | Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Atomic safetensors write of a state dict (tensors made contiguous, on CPU)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(path: str | Path, obj: Any) -> Path:
    """Atomic ``torch.save`` (only tensors / plain containers, so ``weights_only=True`` loads it)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# -- model card ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCard:
    """``model.json``: what a trained model is and how to feed it."""

    backbone: str
    num_classes: int
    classes: tuple[str, ...]
    good_classes: tuple[str, ...]
    input: InputSpec
    weights: str = "imagenet"  # "imagenet" | "none" | "<path>" the training started from
    data: dict = field(default_factory=dict)  # DataSpec.to_dict(): rebuilds the same splits
    dataset_fingerprint: str = ""
    config_hash: str = ""
    metrics: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "good_classes", tuple(self.good_classes))
        if len(self.classes) != self.num_classes:
            raise CheckpointError(f"model.json: num_classes={self.num_classes} but {len(self.classes)} classes listed")
        bad = [c for c in self.good_classes if c not in self.classes]
        if bad:
            raise CheckpointError(f"model.json: good_classes {bad} are not among classes {list(self.classes)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = MODEL_CARD) -> ModelCard:
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{where}: expected a JSON object")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("backbone", "num_classes", "classes", "input") if k not in d]
        if missing:
            raise CheckpointError(f"{where}: missing key(s) {missing}")
        refuse_unknown(d, known, where, CheckpointError)
        d = dict(d)
        d.setdefault("good_classes", [])
        try:
            if not isinstance(d["input"], InputSpec):
                d["input"] = InputSpec.from_dict(d["input"], where=f"{where}: input")
            return cls(**d)
        except CheckpointError:
            raise
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"], out["good_classes"] = list(self.classes), list(self.good_classes)
        out["input"] = self.input.to_dict()
        return out


def read_card(path: str | Path) -> ModelCard:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no model card (model.json) found") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    return ModelCard.from_dict(data, where=str(path))


def write_card(run_dir: str | Path, card: ModelCard) -> Path:
    return atomic_write_json(Path(run_dir) / MODEL_CARD, card.to_dict())


def save_model(run_dir: str | Path, model: torch.nn.Module, card: ModelCard, filename: str = BEST) -> Path:
    """Write ``<run_dir>/<filename>`` (safetensors) and ``model.json``; returns the weights path."""
    run_dir = Path(run_dir)
    path = save_safetensors(
        run_dir / filename,
        model.state_dict(),
        metadata={"backbone": card.backbone, "num_classes": str(card.num_classes)},
    )
    write_card(run_dir, card)
    return path


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(weights file, model.json) from a run directory or a weights file."""
    path = Path(path)
    if path.is_dir():
        weights, card = path / BEST, path / MODEL_CARD
    else:
        weights, card = path, path.parent / MODEL_CARD
    if not weights.is_file():
        raise CheckpointError(
            f"{weights}: no such checkpoint file (expected a run directory holding {BEST}, or a .safetensors file)"
        )
    if not card.is_file():
        raise CheckpointError(f"{card}: missing; a checkpoint needs its model card beside it")
    return weights, card


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """``(model in eval mode, ModelCard)`` from a run directory or ``.safetensors`` + ``model.json``."""
    from .backbones import build_model

    weights, card_path = _resolve(path)
    card = read_card(card_path)
    model = build_model(card.backbone, card.num_classes, weights="none", input_spec=card.input)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights), device=str(device))
    else:
        obj = torch.load(str(weights), map_location=device, weights_only=True)
        state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{weights}: weights do not match model.json (backbone {card.backbone}, {card.num_classes} classes): {exc}"
        ) from None
    return model.to(device).eval(), card


# -- resume state --------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys, dtype=np.int64)  # legacy=True: the (str, uint32 array, int, int, float) tuple
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``last.pt``; ``state`` holds tensors / plain containers only."""
    return torch_save(Path(run_dir) / LAST, state)


def load_resume(run_dir: str | Path) -> dict[str, Any] | None:
    """``last.pt`` of a run directory (``weights_only=True``), or None when absent."""
    path = Path(run_dir) / LAST
    if not path.is_file():
        return None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load resume state ({type(exc).__name__}: {exc})") from None
