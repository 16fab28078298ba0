"""What EWC keeps between runs: the Fisher diagonal and anchor parameters of one model, the tasks
folded into them, and the ``fisher.safetensors`` file (save, load, the checks that it belongs
to the model). ``training.ewc`` estimates, folds and applies it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from runtime.fsio import atomic_write

DEFAULT_GAMMA = 1.0  # online-EWC decay of the old Fisher (1: no decay)
FISHER_FILE = "fisher.safetensors"
FORMAT = "defectscope-ewc"
FORMAT_VERSION = 1


class EWCError(ValueError):
    """A Fisher/anchor file that does not belong to the model, or is malformed."""


# ----------------------------------------------------------------------------- helpers


def params_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``name, shape, float32 bytes`` in sorted name order.

    Identifies the exact weights an anchor set belongs to; float32 so a half-precision
    copy of the same checkpoint still hashes differently only if values differ.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def model_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every floating-point parameter (the anchor set)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}


@dataclass(frozen=True)
class TaskRecord:
    """One task folded into the Fisher: a name and how its Fisher was estimated."""

    name: str
    n_samples: int
    labels: str = "sampled"
    draws: int = 1
    classes: tuple[str, ...] = ()


@dataclass
class EWCState:
    """Fisher diagonal + anchor parameters of one model, and what they belong to.

    ``fisher`` and ``anchors`` map parameter names to tensors of the parameter's shape;
    ``anchor_sha256`` is ``params_sha256(anchors)``; ``tasks`` lists the tasks folded in
    (online EWC, oldest first); ``gamma`` is the decay used when folding.
    """

    fisher: dict[str, torch.Tensor]
    anchors: dict[str, torch.Tensor]
    backbone: str
    classes: tuple[str, ...]
    tasks: tuple[TaskRecord, ...]
    gamma: float = DEFAULT_GAMMA
    anchor_sha256: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def __post_init__(self) -> None:
        if set(self.fisher) != set(self.anchors):
            raise EWCError("Fisher and anchors name different parameters")
        for n, f in self.fisher.items():
            if f.shape != self.anchors[n].shape:
                raise EWCError(
                    f"Fisher/anchor shape mismatch for {n!r}: {tuple(f.shape)} vs {tuple(self.anchors[n].shape)}"
                )
        if not self.anchor_sha256:
            self.anchor_sha256 = params_sha256(self.anchors)

    # -- construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        fisher: Mapping[str, torch.Tensor],
        *,
        backbone: str,
        classes: Sequence[str],
        task: TaskRecord,
        gamma: float = DEFAULT_GAMMA,
    ) -> EWCState:
        """Anchor at the model's current parameters with the given (first-task) Fisher."""
        anchors = model_params(model)
        missing = set(anchors) - set(fisher)
        if missing:
            raise EWCError(f"Fisher lacks parameters {sorted(missing)[:5]}")
        return cls(
            fisher={n: fisher[n].detach().to("cpu", torch.float32).clone() for n in anchors},
            anchors={n: a.to("cpu", torch.float32) for n, a in anchors.items()},
            backbone=backbone,
            classes=tuple(classes),
            tasks=(task,),
            gamma=gamma,
        )

    # -- file I/O
    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "backbone": self.backbone,
            "classes": json.dumps(list(self.classes)),
            "params": json.dumps({n: list(t.shape) for n, t in sorted(self.anchors.items())}),
            "anchor_sha256": self.anchor_sha256,
            "tasks": json.dumps([asdict(t) for t in self.tasks]),
            "gamma": repr(float(self.gamma)),
            "created": self.created,
            "torch": torch.__version__,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``fisher.<name>`` and ``anchor.<name>`` tensors + metadata atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            path = path / FISHER_FILE
        tensors = {f"fisher.{n}": t.contiguous() for n, t in self.fisher.items()}
        tensors.update({f"anchor.{n}": t.contiguous() for n, t in self.anchors.items()})
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EWCState:
        """Read a Fisher/anchor file; a malformed or tampered one raises ``EWCError``."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / FISHER_FILE
        if not path.is_file():
            raise EWCError(
                f"{path}: no Fisher/anchor file (compute it with `defectscope extend --from RUN --finalize`)"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise EWCError(f"{path}: not a readable safetensors file ({exc})") from None
        if meta.get("format") != FORMAT:
            raise EWCError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise EWCError(
                f"{path}: metadata 'format_version' is {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            )
        try:
            shapes = json.loads(meta["params"])
            tasks = tuple(
                TaskRecord(**{**t, "classes": tuple(t.get("classes", ()))}) for t in json.loads(meta["tasks"])
            )
            classes = tuple(json.loads(meta["classes"]))
            gamma = float(meta["gamma"])
            backbone = meta["backbone"]
            stored_hash = meta["anchor_sha256"]
        except (KeyError, ValueError, TypeError) as exc:
            raise EWCError(f"{path}: metadata key {exc} missing or malformed") from None
        fisher = {k[len("fisher.") :]: v for k, v in tensors.items() if k.startswith("fisher.")}
        anchors = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
        if set(fisher) != set(shapes) or set(anchors) != set(shapes):
            raise EWCError(f"{path}: tensors do not match the parameter list in its metadata 'params'")
        for n, shp in shapes.items():
            if list(anchors[n].shape) != shp or list(fisher[n].shape) != shp:
                raise EWCError(f"{path}: tensor {n!r} has shape {list(anchors[n].shape)}, metadata 'params' says {shp}")
        actual = params_sha256(anchors)
        if actual != stored_hash:
            raise EWCError(
                f"{path}: anchor tensors hash to {actual[:12]}, metadata 'anchor_sha256' says {stored_hash[:12]}: the file is corrupt or was edited"
            )
        # positional: fisher, anchors, backbone, classes, tasks, gamma, anchor_sha256, created
        return cls(fisher, anchors, backbone, classes, tasks, gamma, stored_hash, meta.get("created", ""))

    # -- checks
    def check_model(self, model: nn.Module, *, backbone: str | None = None, source: str = "the Fisher file") -> None:
        """Refuse a model these anchors were not computed for (architecture or weights).

        Compares backbone name, parameter names and shapes, and the SHA-256 of the
        model's parameters with the anchors'; the message says which one differs.
        """
        if backbone is not None and backbone != self.backbone:
            raise EWCError(f"{source} was computed for backbone {self.backbone!r}, but the model is {backbone!r}")
        params = model_params(model)
        missing = sorted(set(self.anchors) - set(params))
        extra = sorted(set(params) - set(self.anchors))
        if missing or extra:
            raise EWCError(
                f"{source} does not fit this model: parameters only in the file {missing[:4]}"
                f"{'...' if len(missing) > 4 else ''}, only in the model {extra[:4]}{'...' if len(extra) > 4 else ''}"
            )
        for n, a in self.anchors.items():
            if params[n].shape != a.shape:
                raise EWCError(
                    f"{source} does not fit this model: {n!r} is {tuple(a.shape)} in the file, {tuple(params[n].shape)} in the model"
                )
        got = params_sha256(params)
        if got != self.anchor_sha256:
            raise EWCError(
                f"{source} belongs to different weights of this architecture (anchor sha256 "
                f"{self.anchor_sha256[:12]}, model sha256 {got[:12]}): the checkpoint changed after its "
                "Fisher was computed; recompute it with `defectscope extend --from RUN --finalize`"
            )

    def to(self, device: torch.device | str) -> EWCState:
        self.fisher = {n: t.to(device) for n, t in self.fisher.items()}
        self.anchors = {n: t.to(device) for n, t in self.anchors.items()}
        return self
