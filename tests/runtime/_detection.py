"""A tiny detector for the runtime tests: an ONNX graph that boxes the bright blob of a frame.

On the (N,3,H,W) [0,1] RGB model input: pixels whose channel mean exceeds 0.3 form the blob;
its bounding box (pixel edges, model-input pixels) is the first detection, with score = the
brightest pixel's channel mean and label 2 ("stain") when the blob is redder than blue, else
1 ("scratch"). Row 2 is padding (score 0, label 0 = background), as the real export pads.
No blob: every row is padding. Boxes follow the content, so flips, the letterbox and its
mapping back to original pixels can be checked without hard-coding outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

SIZE = 32  # model input side
CLASSES = ["ok", "scratch", "stain"]
D = 2  # detections per image


def tiny_detector_onnx(path: Path, d: int = D, size: int = SIZE) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = "N"
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, size, size])
    outs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [n, d, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [n, d]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, [n, d]),
    ]
    consts = {
        "thr": np.array(0.3, np.float32),
        "one_i": np.array([[1]], np.int64),
        "ax1": np.array([1], np.int64),
        "r0": np.array([0], np.int64),
        "r1": np.array([1], np.int64),
        "r2": np.array([2], np.int64),
        "r3": np.array([3], np.int64),
        "pad_b": np.zeros((1, d - 1, 4), np.float32),
        "pad_s": np.zeros((1, d - 1), np.float32),
        "pad_l": np.zeros((1, d - 1), np.int64),
    }
    mk = helper.make_node
    nodes = [
        mk("ReduceMean", ["input"], ["m"], axes=[1], keepdims=0),  # (N,H,W)
        mk("Greater", ["m", "thr"], ["mask_b"]),
        mk("Cast", ["mask_b"], ["mask"], to=TensorProto.FLOAT),
        mk("ReduceMax", ["mask"], ["cols"], axes=[1], keepdims=0),  # (N,W)
        mk("ReduceMax", ["mask"], ["rows"], axes=[2], keepdims=0),  # (N,H)
        mk("ArgMax", ["cols"], ["x0"], axis=1, keepdims=1),
        mk("ArgMax", ["cols"], ["x1m"], axis=1, keepdims=1, select_last_index=1),
        mk("ArgMax", ["rows"], ["y0"], axis=1, keepdims=1),
        mk("ArgMax", ["rows"], ["y1m"], axis=1, keepdims=1, select_last_index=1),
        mk("Add", ["x1m", "one_i"], ["x1"]),  # pixel edges: last + 1
        mk("Add", ["y1m", "one_i"], ["y1"]),
        mk("Concat", ["x0", "y0", "x1", "y1"], ["box_i"], axis=1),  # (N,4)
        mk("Cast", ["box_i"], ["box_f"], to=TensorProto.FLOAT),
        mk("ReduceMax", ["cols"], ["any"], axes=[1], keepdims=1),  # (N,1) 1: a blob
        mk("Mul", ["box_f", "any"], ["box"]),
        mk("Unsqueeze", ["box", "ax1"], ["box3"]),  # (N,1,4)
        mk("ReduceMax", ["m"], ["peak"], axes=[1, 2], keepdims=0),  # (N,)
        mk("Unsqueeze", ["peak", "ax1"], ["peak2"]),
        mk("Mul", ["peak2", "any"], ["score"]),  # (N,1)
        mk("Slice", ["input", "r0", "r1", "ax1"], ["red"]),
        mk("Slice", ["input", "r2", "r3", "ax1"], ["blue"]),
        mk("ReduceMax", ["red"], ["red_max"], axes=[1, 2, 3], keepdims=0),
        mk("ReduceMax", ["blue"], ["blue_max"], axes=[1, 2, 3], keepdims=0),
        mk("Greater", ["red_max", "blue_max"], ["is_red"]),
        mk("Cast", ["is_red"], ["is_red_i"], to=TensorProto.INT64),
        mk("Unsqueeze", ["is_red_i", "ax1"], ["is_red2"]),
        mk("Add", ["is_red2", "one_i"], ["lab1"]),
        mk("Cast", ["any"], ["any_i"], to=TensorProto.INT64),
        mk("Mul", ["lab1", "any_i"], ["label"]),  # (N,1) 0 without a blob
        # Padding rows, batch-sized: zeros broadcast against the detection row.
        mk("Mul", ["box3", "pad_b"], ["box_pad"]),
        mk("Mul", ["score", "pad_s"], ["score_pad"]),
        mk("Mul", ["label", "pad_l"], ["label_pad"]),
        mk("Concat", ["box3", "box_pad"], ["boxes"], axis=1),
        mk("Concat", ["score", "score_pad"], ["scores"], axis=1),
        mk("Concat", ["label", "label_pad"], ["labels"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_detector", [inp], outs, initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="defectscope-tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def detection_manifest_dict(version: str = "1.0.0", d: int = D, **output: Any) -> dict[str, Any]:
    """As training/detection/export.py writes it (classes = [good, *defects], mean 0 / std 1)."""
    return {
        "schema_version": 1,
        "model": {
            "name": "tinydet",
            "version": version,
            "task": "detection",
            "architecture": "tiny_blob",
            "created": "2024-01-01T00:00:00Z",
        },
        "classes": list(CLASSES),
        "good_classes": ["ok"],
        "input": {
            "name": "input",
            "height": SIZE,
            "width": SIZE,
            "resize_size": SIZE,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "color_order": "RGB",
            "resize_policy": "letterbox",
            "pad_value": 0,
            "interpolation": "bilinear",
        },
        "output": {
            "kind": "detections",
            "names": ["boxes", "scores", "labels"],
            "box_format": "xyxy",
            "score_threshold": 0.5,
            "max_detections": d,
            **output,
        },
        "artifacts": {"fp32": {"file": "model.onnx", "format": "onnx", "precision": "fp32"}},
        "default_artifact": "fp32",
        "files": {},
    }


def make_detection_bundle(dest: Path, version: str = "1.0.0", d: int = D, **output: Any) -> Path:
    from runtime.bundle.manifest import Manifest
    from runtime.bundle.write import write_bundle

    src = tiny_detector_onnx(dest.parent / f".src-{dest.name}" / "model.onnx", d)
    write_bundle(dest, Manifest.from_dict(detection_manifest_dict(version, d, **output)), {"model.onnx": src})
    return dest


def blob_image(
    h: int, w: int, box: tuple[int, int, int, int] | None, level: int = 230, color: tuple[int, int, int] | None = None
) -> np.ndarray:
    """uint8 BGR (h,w,3) dark frame with a bright rectangle ``box`` = (x1, y1, x2, y2) pixel edges."""
    img = np.full((h, w, 3), 20, np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        img[y1:y2, x1:x2] = color if color is not None else (level, level, level)
    return img


def write_blob_images(directory: Path, specs: list[dict[str, Any]]) -> list[Path]:
    """PNG replay frames named in order; each spec: h, w, box, and optionally level / color."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(specs):
        p = directory / f"frame_{i:05d}.png"
        cv2.imwrite(str(p), blob_image(s["h"], s["w"], s.get("box"), s.get("level", 230), s.get("color")))
        paths.append(p)
    return paths
