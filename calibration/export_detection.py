"""Faster R-CNN -> ONNX (opset 17, fixed input size) with onnx.checker and a parity check on ONNX Runtime.

Graph contract (detection bundles, docs/contracts.md): one input ``input`` of fixed shape
``(B,3,H,W)`` float32 RGB in [0, 1] (already letterboxed by ``runtime.inference.boxes.fit``; the
model normalises inside), each image handed to torchvision as one CHW tensor; outputs
``boxes`` (B,D,4) float32 xyxy in model-input pixels, ``scores`` (B,D) float32, ``labels``
(B,D) int64 with 0 = background (so the manifest's classes are ``[good, *defects]``). Each
image's detections are padded to ``D = detections_per_img`` with score 0 / label 0 rows,
which the station's postprocessor drops by score.

Exporter: the TorchScript one (``dynamo=False``). The dynamo exporter fails on the
batched NMS (``GuardOnDataDependentSymNode`` in torchvision/ops/boxes.py; issue 16).
For INT8 later: ``onnxruntime.quantization.shape_inference.quant_pre_process(src, dst,
skip_symbolic_shape=True)`` (symbolic shape inference fails on this graph), see
:func:`quant_preprocess`.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAMES = ("boxes", "scores", "labels")


class DetectionExportError(RuntimeError):
    """Export or parity failure; the message says which check failed and by how much."""


@dataclass(frozen=True)
class DetectionExportInfo:
    opset: int
    exporter: str
    batch: int
    height: int
    width: int
    max_detections: int
    nodes: int
    input: dict[str, Any]  # how a frame becomes the input (runtime.inference.boxes.fit + [0,1] scaling)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wrapper(model: Any, max_detections: int) -> Any:
    import torch

    class FixedOutputs(torch.nn.Module):
        """(B,3,H,W) -> padded (B,D,4), (B,D), (B,D) so every output has a fixed shape."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            d = max_detections
            dets = self.model([x[i] for i in range(x.shape[0])])
            boxes = [torch.cat([o["boxes"], x.new_zeros(d, 4)])[:d] for o in dets]
            scores = [torch.cat([o["scores"], x.new_zeros(d)])[:d] for o in dets]
            labels = [torch.cat([o["labels"], torch.zeros(d, dtype=torch.int64)])[:d] for o in dets]
            n = len(dets)
            # Constant reshapes: the slices above are D long, but shape inference cannot prove it.
            return (
                torch.stack(boxes).reshape(n, d, 4),
                torch.stack(scores).reshape(n, d),
                torch.stack(labels).reshape(n, d),
            )

    return FixedOutputs().eval()


def _dims(vi: Any) -> list[Any]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def check_detection_graph(graph: Any, batch: int, height: int, width: int, max_detections: int) -> None:
    """onnx.checker (full) plus the contract's names and fixed shapes."""
    import onnx

    try:
        onnx.checker.check_model(graph, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise DetectionExportError(f"onnx.checker rejected the exported graph: {exc}") from None
    inits = {i.name for i in graph.graph.initializer}
    inputs = [(i.name, _dims(i)) for i in graph.graph.input if i.name not in inits]
    if inputs != [(INPUT_NAME, [batch, 3, height, width])]:
        raise DetectionExportError(
            f"exported inputs {inputs}, expected [({INPUT_NAME!r}, [{batch}, 3, {height}, {width}])]"
        )
    outputs = [(o.name, _dims(o)) for o in graph.graph.output]
    want = [
        ("boxes", [batch, max_detections, 4]),
        ("scores", [batch, max_detections]),
        ("labels", [batch, max_detections]),
    ]
    if outputs != want:
        raise DetectionExportError(f"exported outputs {outputs}, expected {want}")


def export_detector(
    model: Any, dest: str | os.PathLike[str], *, batch: int = 1, opset: int = OPSET
) -> DetectionExportInfo:
    """Export a ``training.detection.model.build_detector`` model to ``dest`` (atomic write)."""
    import onnx
    import torch

    spec = getattr(model, "detector_spec", None)
    if spec is None:
        raise DetectionExportError("model has no detector_spec (build it with training.detection.model.build_detector)")
    h, w = spec.image_size
    d = int(model.roi_heads.detections_per_img)
    wrapper = _wrapper(model.eval(), d)
    # A textured dummy: tracing follows real data through the RPN and NMS.
    dummy = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="defectscope-export-det-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes are expected here
            torch.onnx.export(
                wrapper,
                (dummy,),
                str(raw),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
            )
        graph = onnx.load(str(raw))
        check_detection_graph(graph, batch, h, w, d)
        graph.producer_name = "defectscope"
        from runtime.fsio import atomic_write_bytes

        atomic_write_bytes(dest, graph.SerializeToString())
    inp = {
        "height": h,
        "width": w,
        "resize_policy": "letterbox",
        "pad_value": 0,
        "color_order": "RGB",
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "box_format": "xyxy",
        "label_offset": 1,
    }
    return DetectionExportInfo(opset, "torchscript", batch, h, w, d, len(graph.graph.node), inp)


def parity(
    model: Any,
    onnx_path: str | os.PathLike[str],
    images: Sequence[np.ndarray],
    *,
    score_threshold: float = 0.3,
    min_iou: float = 0.98,
    score_tol: float = 1e-3,
) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime on (3,H,W) [0,1] images: every detection above ``score_threshold``
    matched (same label, IoU >= ``min_iou``, score within ``score_tol``) and the same count.
    Returns the measured worst cases; raises DetectionExportError naming the image and the check."""
    import torch

    from runtime.inference.boxes import box_iou
    from runtime.inference.ort_session import ort_session

    sess = ort_session(onnx_path)
    batch = sess.get_inputs()[0].shape[0]
    worst = {"images": len(images), "detections": 0, "min_iou": 1.0, "max_score_diff": 0.0, "max_box_diff_px": 0.0}
    for start in range(0, len(images), batch):
        chunk = [np.asarray(im, np.float32) for im in images[start : start + batch]]
        x = np.stack(chunk + [np.zeros_like(chunk[0])] * (batch - len(chunk)))
        ob, os_, ol = sess.run(list(OUTPUT_NAMES), {sess.get_inputs()[0].name: x})
        with torch.no_grad():
            ref = model.eval()([torch.from_numpy(c) for c in chunk])
        for i, r in enumerate(ref):
            where = f"image {start + i}"
            tb, ts, tl = r["boxes"].numpy(), r["scores"].numpy(), r["labels"].numpy()
            keep_t, keep_o = ts >= score_threshold, os_[i] >= score_threshold
            if keep_t.sum() != keep_o.sum():
                raise DetectionExportError(
                    f"{where}: {int(keep_t.sum())} detections >= {score_threshold} in PyTorch, "
                    f"{int(keep_o.sum())} in ONNX Runtime"
                )
            tb, ts, tl = tb[keep_t], ts[keep_t], tl[keep_t]
            eb, es, el = ob[i][keep_o], os_[i][keep_o], ol[i][keep_o]
            iou = box_iou(tb, eb) * (tl[:, None] == el[None, :])
            for j in range(len(tb)):
                k = int(np.argmax(iou[j])) if iou.shape[1] else -1
                if k < 0 or iou[j, k] < min_iou:
                    raise DetectionExportError(
                        f"{where}: PyTorch box {tb[j].round(2).tolist()} (label {tl[j]}) has no "
                        f"ONNX match at IoU >= {min_iou} (best {iou[j].max(initial=0):.4f})"
                    )
                diff = abs(float(ts[j]) - float(es[k]))
                if diff > score_tol:
                    raise DetectionExportError(f"{where}: score {ts[j]:.5f} vs ONNX {es[k]:.5f} (> {score_tol})")
                worst["min_iou"] = min(worst["min_iou"], float(iou[j, k]))
                worst["max_score_diff"] = max(worst["max_score_diff"], diff)
                worst["max_box_diff_px"] = max(worst["max_box_diff_px"], float(np.abs(tb[j] - eb[k]).max()))
                worst["detections"] += 1
    return worst


def quant_preprocess(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """ONNX Runtime's pre-quantization pass (shape inference + optimisation) for the later INT8 step.

    ``skip_symbolic_shape=True``: the symbolic shape inference cannot handle the NMS /
    RoiAlign subgraph (measured in issue 16); ONNX's own shape inference still runs.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


__all__ = [
    "DetectionExportError",
    "DetectionExportInfo",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAMES",
    "check_detection_graph",
    "export_detector",
    "parity",
    "quant_preprocess",
]
