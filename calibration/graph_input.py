"""uint8-input artifacts: the input normalisation moved into the ONNX graph.

``add_uint8_input`` prepends to any artifact that takes the float (N,C,H,W) tensor of
``runtime.inference.preprocess`` a small subgraph that takes the *resized* uint8 frame
(N,H,W,C) in the camera's channel order (BGR, or one gray channel) and does the cast,
the channel order, /255, mean/std and the NHWC->NCHW layout change as ONNX ops, so ONNX
Runtime, OpenVINO and TensorRT run them on their device. The resize stays on the CPU
(runtime's one implementation: ``Preprocessor.frame_uint8``).

The subgraph uses the Preprocessor's own folded constants (x * scale + offset, float32),
so the float path and the uint8 path compute the same numbers; ``check_uint8_parity``
proves it on held-out frames like every other artifact's parity check.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.fsio import atomic_write
from runtime.inference.preprocess import UINT8_NHWC, InputSpec, Preprocessor, uint8_shape

PREFIX = "u8in_"  # names of the added nodes / initializers (kept clear of the exporter's)


class GraphInputError(RuntimeError):
    """The artifact cannot take a uint8 input; the message says why."""


def add_uint8_input(model: Any, spec: InputSpec) -> Any:
    """A copy of ``model`` (onnx.ModelProto, float input ``spec.name``) whose input is uint8 (N,H,W,C).

    The input keeps the name ``spec.name`` (the manifest's), so the rest of the contract holds.
    Works on FP32 and on quantized (QDQ / QOperator) graphs alike: the new ops run before them.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if [i.name for i in inputs] != [spec.name]:
        raise GraphInputError(f"expected one graph input {spec.name!r}, got {[i.name for i in inputs]}")
    old = inputs[0]
    if old.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise GraphInputError(f"input {spec.name!r} is not float32 (already a uint8-input artifact?)")
    batch = old.type.tensor_type.shape.dim[0]
    inner = PREFIX + "normalised"
    for node in graph.node:  # every consumer of the old input now reads the normalised tensor
        node.input[:] = [inner if n == spec.name else n for n in node.input]
    for out in graph.output:
        if out.name == spec.name:
            raise GraphInputError("the graph returns its input unchanged; nothing to wrap")

    pre = Preprocessor(spec)
    scale, offset = pre.folded()
    nodes = [helper.make_node("Cast", [spec.name], [PREFIX + "f"], to=TensorProto.FLOAT, name=PREFIX + "cast")]
    src = PREFIX + "f"
    if spec.channels == 3 and spec.color_order == "RGB":
        # Camera frames are BGR (OpenCV's order); reverse the channel axis of NHWC.
        nodes.append(helper.make_node("Gather", [src, PREFIX + "rgb"], [PREFIX + "rgbf"], axis=3, name=PREFIX + "rgb"))
        src = PREFIX + "rgbf"
    nodes += [
        helper.make_node("Transpose", [src], [PREFIX + "nchw"], perm=[0, 3, 1, 2], name=PREFIX + "nchw"),
        helper.make_node("Mul", [PREFIX + "nchw", PREFIX + "scale"], [PREFIX + "scaled"], name=PREFIX + "mul"),
        helper.make_node("Add", [PREFIX + "scaled", PREFIX + "offset"], [inner], name=PREFIX + "add"),
    ]
    new_inits = [
        numpy_helper.from_array(scale.reshape(1, spec.channels, 1, 1).astype(np.float32), PREFIX + "scale"),
        numpy_helper.from_array(offset.reshape(1, spec.channels, 1, 1).astype(np.float32), PREFIX + "offset"),
    ]
    if spec.channels == 3 and spec.color_order == "RGB":
        new_inits.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), PREFIX + "rgb"))
    h, w, c = uint8_shape(spec)
    new_input = helper.make_tensor_value_info(spec.name, TensorProto.UINT8, [None, h, w, c])
    new_input.type.tensor_type.shape.dim[0].CopyFrom(batch)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    graph.initializer.extend(new_inits)
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old_nodes)  # topological order: the new ops first
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise GraphInputError(f"onnx.checker rejected the uint8-input graph: {exc}") from None
    return model


def write_uint8_artifact(src: str | os.PathLike[str], dest: str | os.PathLike[str], spec: InputSpec) -> None:
    """Read the float-input ONNX ``src``, write its uint8-input twin to ``dest`` (atomic)."""
    import onnx

    wrapped = add_uint8_input(onnx.load(os.fspath(src)), spec)
    atomic_write(Path(dest), lambda tmp: onnx.save(wrapped, tmp))


@dataclass(frozen=True)
class Uint8ParityReport:
    """The uint8-input artifact vs its float twin on the same frames (float path: runtime's Preprocessor)."""

    n: int
    max_abs_diff: float
    differing_top1: int
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.differing_top1 == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input": UINT8_NHWC, "passed": self.passed}

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"uint8-input parity {verdict}: {self.n} frames, max |output diff| {self.max_abs_diff:.2e} "
            f"(tolerance {self.atol:.0e}), {self.differing_top1} differing top-1"
        )


def check_uint8_parity(
    float_path: str | os.PathLike[str],
    uint8_path: str | os.PathLike[str],
    spec: InputSpec,
    frames: list[np.ndarray],
    *,
    atol: float = 1e-4,
    threads: int = 1,
    top1: bool = True,
) -> Uint8ParityReport:
    """Run both artifacts with ONNX Runtime on ``frames`` (uint8 camera frames, any size).

    Compares every output within ``atol``; ``top1``: also the argmax of the first output's last axis
    (a classifier's logits; detectors compare boxes / scores / labels by ``atol`` only).
    """
    from runtime.inference.ort_session import ort_session

    if not frames:
        raise GraphInputError("uint8 parity needs at least one frame")
    pre = Preprocessor(spec)
    x_float = pre.batch(frames)
    x_u8 = np.stack([pre.frame_uint8(f) for f in frames])
    fs = ort_session(float_path, threads)
    us = ort_session(uint8_path, threads)
    # One frame per call: detectors export a static batch of 1 (their batch is checked by their own parity).
    ref = _concat([fs.run(None, {spec.name: x_float[i : i + 1]}) for i in range(len(frames))])
    got = _concat([us.run(None, {spec.name: x_u8[i : i + 1]}) for i in range(len(frames))])
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in zip(ref, got))
    differing = int(np.sum(np.asarray(ref[0]).argmax(-1) != np.asarray(got[0]).argmax(-1))) if top1 else 0
    return Uint8ParityReport(n=len(frames), max_abs_diff=diff, differing_top1=differing, atol=atol)


def _concat(runs: list[list[Any]]) -> list[np.ndarray]:
    return [np.concatenate([np.asarray(r[i]) for r in runs]) for i in range(len(runs[0]))]


def twin_key(key: str) -> str:
    """Manifest key of a float-input artifact's uint8-input twin (``fp32`` -> ``fp32-u8``)."""
    return f"{key}-u8"


def add_uint8_twins(
    artifacts: dict[str, Any],
    files: dict[str, Path],
    keys: list[str],
    spec: InputSpec,
    frames: list[np.ndarray],
    tmp: Path,
    *,
    atol: float = 1e-4,
    threads: int = 1,
    top1: bool = True,
) -> dict[str, Uint8ParityReport]:
    """For each float-input ONNX artifact in ``keys``: write its uint8-input twin, check parity, and add it
    to ``artifacts`` (key -> runtime Artifact) and ``files`` (bundle file name -> source path).

    Raises GraphInputError naming the artifact when a twin fails parity (the bundle is then not written).
    """
    import dataclasses

    reports: dict[str, Uint8ParityReport] = {}
    for key in keys:
        art = artifacts[key]
        if art.format != "onnx" or art.input == UINT8_NHWC:
            continue
        src = files[art.file]
        name = Path(art.file).name.removesuffix(".onnx") + ".u8.onnx"
        dest = tmp / name
        write_uint8_artifact(src, dest, spec)
        report = check_uint8_parity(src, dest, spec, frames, atol=atol, threads=threads, top1=top1)
        if not report.passed:
            raise GraphInputError(f"artifact {twin_key(key)!r}: {report.summary()}")
        artifacts[twin_key(key)] = dataclasses.replace(art, file=name, input=UINT8_NHWC)
        files[name] = dest
        reports[twin_key(key)] = report
    return reports
