"""Post-training static INT8 quantization with ONNX Runtime (QDQ format).

Two targets share one set of calibration ranges:

- ``cpu``: uint8 asymmetric activations, int8 symmetric per-channel weights (U8S8).
  ONNX Runtime folds ReLU/ReLU6 into the activation ranges and runs fused integer
  kernels; on x86 this is the fast layout (S8S8 with symmetric activations keeps
  every Clip and measured slower than FP32 on this project's reference CPU).
- ``tensorrt``: int8 *symmetric* activations (zero point 0), per-channel symmetric
  weights kept in float behind Q->DQ pairs, float biases: the Q/DQ form TensorRT's
  explicit quantization imports.

Ranges are computed once (``calibration_cache_path``) and reused for every
re-quantization of the float-fallback search.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.fsio import atomic_write

METHODS = ("minmax", "entropy", "percentile")
TARGETS = ("cpu", "tensorrt")
# Ops whose weights carry most of the compute (and the quantization error).
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that pass a tensor through unchanged in value layout (walked over to find the classifier / stem).
PASS_THROUGH = ("Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose", "Pad", "Cast", "Softmax")


class QuantizationError(RuntimeError):
    """Quantization could not run; the message says which step and why."""


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize. ``percentile`` applies to the percentile method (percent of |x| kept)."""

    method: str = "entropy"
    target: str = "cpu"
    per_channel: bool = True
    reduce_range: bool = False
    percentile: float = 99.999
    batch_size: int = 16  # images per calibration inference

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"calibration method: expected one of {METHODS}, got {self.method!r}")
        if self.target not in TARGETS:
            raise QuantizationError(f"quantization target: expected one of {TARGETS}, got {self.target!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise QuantizationError(f"percentile: expected (0, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise QuantizationError(f"calibration batch size must be >= 1, got {self.batch_size}")

    @property
    def activation_symmetric(self) -> bool:
        return self.target == "tensorrt"

    @property
    def activation_type(self) -> str:
        return "int8" if self.target == "tensorrt" else "uint8"

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": "qdq",
            "method": self.method,
            "target": self.target,
            "per_channel": self.per_channel,
            "weight_type": "int8",
            "activation_type": self.activation_type,
            "activation_symmetric": self.activation_symmetric,
            "reduce_range": self.reduce_range,
        }
        if self.method == "percentile":
            out["percentile"] = self.percentile
        return out


class ArrayReader:
    """ONNX Runtime CalibrationDataReader over an in-memory (N,C,H,W) tensor, in batches.

    Supports ``set_range`` / ``len`` (in batches) so quantize_static can merge
    statistics batch by batch instead of holding every activation in RAM.
    """

    def __init__(self, x: np.ndarray, input_name: str, batch_size: int, on_batch: Callable[[int], None] | None = None):
        self.x, self.input_name, self.batch_size, self.on_batch = x, input_name, batch_size, on_batch
        self.n_batches = (len(x) + batch_size - 1) // batch_size
        self.set_range(0, self.n_batches)

    def __len__(self) -> int:
        return self.n_batches

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, self.n_batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        b = self.x[self._next * self.batch_size : (self._next + 1) * self.batch_size]
        self._next += 1
        if self.on_batch is not None:
            self.on_batch(len(b))
        return {self.input_name: np.ascontiguousarray(b, dtype=np.float32)}

    def rewind(self) -> None:
        self.set_range(0, self.n_batches)


@contextlib.contextmanager
def _quiet() -> Any:
    """ORT's calibrators print progress lines and log warnings about pre-processing; keep the CLI readable."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def prepare_float_model(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """ONNX Runtime's recommended pre-processing: shape inference + graph optimisation (fusions)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    try:
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception as exc:
        raise QuantizationError(f"{src}: quantization pre-processing failed: {type(exc).__name__}: {exc}") from None
    return dst


def input_name_of(model_path: str | os.PathLike[str]) -> str:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def quantize_model(
    float_model: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    config: QuantConfig,
    ranges_cache: str | os.PathLike[str],
    x: np.ndarray | None = None,
    *,
    nodes_to_exclude: Iterable[str] = (),
    nodes_to_quantize: Iterable[str] | None = None,
    progress: bool = False,
) -> Path:
    """Quantize ``float_model`` (pre-processed) to a QDQ model at ``dest``.

    The first call (no ``ranges_cache`` file yet) calibrates on ``x`` (N,C,H,W)
    and writes the ranges there; later calls reuse them, so excluding nodes or
    switching target costs only the graph rewrite.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.method]
    cache = Path(ranges_cache)
    reader = None
    extra: dict[str, Any] = {
        "ActivationSymmetric": config.activation_symmetric,
        "WeightSymmetric": True,
        "CalibPercentile": config.percentile,
    }
    if config.target == "tensorrt":
        # The Q/DQ form TensorRT's ONNX parser expects (as from QAT toolkits): float weights
        # behind a Q->DQ pair (TensorRT quantizes them itself), float biases (no int32
        # DequantizeLinear, which TensorRT lacks), one Q/DQ pair per consumer.
        extra.update({"AddQDQPairToWeight": True, "QuantizeBias": False, "DedicatedQDQPair": True})
    bar = None
    if not cache.is_file():
        if x is None or len(x) == 0:
            raise QuantizationError("calibration needs images: the calibration tensor is empty")
        on_batch = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(x), desc=f"calibrating ({config.method})", unit="img", leave=False, disable=None)
            on_batch = bar.update
        reader = ArrayReader(x, input_name_of(float_model), config.batch_size, on_batch)
        # Merge statistics after every batch: RAM stays at one batch of activations, and
        # a short last batch never meets the others in one array (ORT stacks them).
        extra["CalibStridedMinMax"] = 1
    dest = Path(dest)

    def write(tmp: str) -> None:
        with _quiet():
            quantize_static(
                str(float_model),
                tmp,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=QuantType.QInt8 if config.activation_type == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(nodes_to_exclude),
                nodes_to_quantize=list(nodes_to_quantize) if nodes_to_quantize is not None else None,
                calibrate_method=method,
                extra_options=extra,
                calibration_cache_path=str(cache),
            )

    try:
        atomic_write(dest, write)
    except QuantizationError:
        raise
    except Exception as exc:
        raise QuantizationError(f"{float_model}: quantize_static failed: {type(exc).__name__}: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    return dest


# -- graph inspection ------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeInfo:
    name: str
    op_type: str
    index: int  # position in the (topologically sorted) graph


def compute_nodes(model_path: str | os.PathLike[str]) -> list[NodeInfo]:
    """Named Conv / Gemm / MatMul nodes in graph order (the candidates to keep in float)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [
        NodeInfo(n.name, n.op_type, i) for i, n in enumerate(model.graph.node) if n.op_type in COMPUTE_OPS and n.name
    ]


def stem_and_classifier(model_path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """(first compute node fed by the graph input, compute node producing the graph output).

    Pass-through ops (Flatten, Reshape, Pad, ...) between them and the graph I/O are walked over.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name for i in model.graph.initializer}
    graph_in = next(i.name for i in model.graph.input if i.name not in inits)

    stem = None
    frontier = [graph_in]
    seen: set[str] = set()
    while frontier and stem is None:
        tensor = frontier.pop(0)
        for n in consumers.get(tensor, []):
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.op_type in COMPUTE_OPS:
                stem = n.name
                break
            if n.op_type in PASS_THROUGH:
                frontier.extend(n.output)

    classifier = None
    tensor = model.graph.output[0].name
    while tensor in producers:
        n = producers[tensor]
        if n.op_type in COMPUTE_OPS:
            classifier = n.name
            break
        if n.op_type not in PASS_THROUGH:
            break
        tensor = n.input[0]
    return stem, classifier


def layer_sensitivity(
    float_model: str | os.PathLike[str],
    config: QuantConfig,
    ranges_cache: str | os.PathLike[str],
    x: np.ndarray,
    nodes: Sequence[NodeInfo],
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Per-layer error: quantize one node at a time, measure its logits error on ``x``.

    Score = mean squared logit error / variance of the float logits (noise-to-signal);
    higher means the node hurts more when quantized. ``x`` can be small (16-64 images).
    """
    from calibration.evaluate import ort_session, predict_logits

    ref = predict_logits(ort_session(float_model, threads), x)
    scale = float(np.var(ref)) or 1.0
    scores: dict[str, float] = {}
    iterator: Iterable[NodeInfo] = nodes
    if progress:
        from tqdm import tqdm

        iterator = tqdm(nodes, desc="per-layer sensitivity", unit="layer", leave=False, disable=None)
    with tempfile.TemporaryDirectory(prefix="defectscope-sens-") as tmp:
        for node in iterator:
            path = Path(tmp) / "one.onnx"
            quantize_model(float_model, path, config, ranges_cache, nodes_to_quantize=[node.name])
            got = predict_logits(ort_session(path, threads), x)
            scores[node.name] = float(np.mean((got - ref) ** 2) / scale)
    return scores


def fallback_order(float_model: str | os.PathLike[str], sensitivity: dict[str, float]) -> list[str]:
    """Candidates to keep in float, best first: stem conv, classifier, then by sensitivity (highest first)."""
    stem, classifier = stem_and_classifier(float_model)
    order = [n for n in (stem, classifier) if n]
    rest = sorted((n for n in sensitivity if n not in order), key=lambda n: (-sensitivity[n], n))
    return order + rest
