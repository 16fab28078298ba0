"""A detector's run-directory checkpoint: ``best.safetensors`` + ``model.json`` with ``"task": "detection"``.

``model.json`` (detection card): ``task``, ``format``, ``detector`` (``DetectorSpec.to_dict()``,
which holds the class names), ``classes``, ``data`` (``DetectionSpec.to_dict()``),
``weights_sha256`` (of ``best.safetensors``, checked before loading), ``config_hash``,
``metrics``, ``parent`` (the run it was extended from, if any).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from runtime.fsio import atomic_write_json, sha256_file
from training.checkpoint import BEST, MODEL_CARD, CheckpointError, save_safetensors
from training.detection.model import DetectorSpec, build_detector, spec_of

TASK = "detection"
CARD_FORMAT = 1


@dataclass(frozen=True)
class DetCard:
    detector: DetectorSpec
    data: Mapping[str, Any]
    weights_sha256: str = ""
    config_hash: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    parent: str | None = None
    plan: Mapping[str, Any] | None = None  # --plan auto: fingerprint, choices, reasons (training.plan)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.detector.classes

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": TASK,
            "format": CARD_FORMAT,
            "classes": list(self.classes),
            "detector": self.detector.to_dict(),
            "data": dict(self.data),
            "weights_sha256": self.weights_sha256,
            "config_hash": self.config_hash,
            "metrics": dict(self.metrics),
            "parent": self.parent,
            **({"plan": dict(self.plan)} if self.plan else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = MODEL_CARD) -> DetCard:
        if d.get("task") != TASK:
            raise CheckpointError(f"{where}: task is {d.get('task')!r}, expected {TASK!r}")
        if d.get("format") != CARD_FORMAT:
            raise CheckpointError(f"{where}: format {d.get('format')!r} is not {CARD_FORMAT}")
        try:
            spec = DetectorSpec.from_dict(d["detector"])
            return cls(
                spec,
                dict(d.get("data") or {}),
                str(d.get("weights_sha256", "")),
                str(d.get("config_hash", "")),
                dict(d.get("metrics") or {}),
                d.get("parent"),
                d.get("plan"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: not a valid detection card ({exc})") from None


def save_detector(run_dir: str | Path, model: torch.nn.Module, card: DetCard, filename: str = BEST) -> DetCard:
    """Weights then card (the card's checksum names the weights it describes); returns the written card."""
    run_dir = Path(run_dir)
    spec = spec_of(model)
    heads: Any = model.roi_heads
    classes = list(heads.box_predictor.classes)
    if list(spec.classes) != classes:  # the predictor grew: the spec follows it
        spec = replace(spec, classes=tuple(classes))
        model.detector_spec = spec  # type: ignore[assignment]  # nn.Module attributes type as Tensor | Module
    path = save_safetensors(run_dir / filename, model.state_dict(), metadata={"task": TASK})
    card = replace(card, detector=spec, weights_sha256=sha256_file(path))
    atomic_write_json(run_dir / MODEL_CARD, card.to_dict())
    return card


def load_detector(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, DetCard]:
    """``(detector in eval mode, DetCard)`` from a run directory or ``best.safetensors`` with ``model.json`` beside it."""
    from safetensors.torch import load_file

    p = Path(path)
    weights, card_path = (p / BEST, p / MODEL_CARD) if p.is_dir() else (p, p.parent / MODEL_CARD)
    for f in (weights, card_path):
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (a detection run holds {BEST} and {MODEL_CARD})")
    try:
        raw = json.loads(card_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{card_path}: invalid JSON ({exc})") from None
    card = DetCard.from_dict(raw, where=str(card_path))
    if card.weights_sha256 and weights.name == BEST and sha256_file(weights) != card.weights_sha256:
        raise CheckpointError(f"{weights}: sha256 differs from {card_path}'s weights_sha256 (file changed or corrupt)")
    # The trunk's pretrained file is not needed: every weight comes from the checkpoint.
    model = build_detector(card.detector, pretrained=False)
    model.detector_spec = card.detector
    try:
        model.load_state_dict(load_file(str(weights), device=str(device)), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match {card_path} ({exc})") from None
    return model.to(device).eval(), card


__all__ = ["CARD_FORMAT", "TASK", "DetCard", "load_detector", "save_detector"]
