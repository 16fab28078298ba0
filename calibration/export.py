"""PyTorch -> ONNX export with checks, optional simplification and a parity check.

The graph takes the *preprocessed* tensor ``input`` (N,C,H,W) float32 and returns
``logits`` (N,K); preprocessing stays outside the graph (``runtime.inference.preprocess``,
described by the manifest's ``input``), so the daemon, calibration and evaluation
all feed the model the same way.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.fsio import atomic_write
from runtime.inference.preprocess import InputSpec

OPSET = 17
OUTPUT_NAME = "logits"


class ExportError(RuntimeError):
    """Export or parity failure; the message says which check failed and by how much."""


@dataclass(frozen=True)
class ExportInfo:
    opset: int
    exporter: str
    simplified: bool
    nodes: int
    nodes_before_simplify: int
    simplify_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _graph_io(model: Any) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
    def dims(vi: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    inits = {i.name for i in model.graph.initializer}
    inputs = [(i.name, dims(i)) for i in model.graph.input if i.name not in inits]
    outputs = [(o.name, dims(o)) for o in model.graph.output]
    return inputs, outputs


def check_graph(model: Any, spec: InputSpec, num_classes: int, output_name: str = OUTPUT_NAME) -> None:
    """onnx.checker plus the contract: one input ``spec.name`` (batch,C,H,W) dynamic batch, one ``logits`` (batch,K)."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from None
    inputs, outputs = _graph_io(model)
    if [n for n, _ in inputs] != [spec.name]:
        raise ExportError(f"exported graph inputs {[n for n, _ in inputs]}, expected [{spec.name!r}]")
    dims = inputs[0][1]
    if len(dims) != 4 or not isinstance(dims[0], str) or list(dims[1:]) != list(spec.shape):
        raise ExportError(
            f"exported input shape {dims}, expected (batch,{','.join(map(str, spec.shape))}) "
            "with a symbolic (dynamic) batch dimension"
        )
    if [n for n, _ in outputs] != [output_name]:
        raise ExportError(f"exported graph outputs {[n for n, _ in outputs]}, expected [{output_name!r}]")
    odims = outputs[0][1]
    if len(odims) != 2 or not isinstance(odims[0], str) or odims[1] != num_classes:
        raise ExportError(f"exported output shape {odims}, expected (batch, {num_classes})")


def export_onnx(
    model: Any,
    spec: InputSpec,
    dest: str | os.PathLike[str],
    num_classes: int,
    *,
    opset: int = OPSET,
    simplify: bool = True,
    output_name: str = OUTPUT_NAME,
) -> ExportInfo:
    """Export ``model`` (a torch classifier taking preprocessed (N,C,H,W)) to ``dest``; atomic write.

    Uses the TorchScript-based exporter (stable for CNNs, needs no onnxscript), a
    symbolic batch axis, onnx.checker (full check) before and after onnxslim, and
    the contract's I/O names and shapes.
    """
    import onnx
    import torch

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # Batch 2 so tracing cannot specialise anything to a batch of one.
    dummy = torch.zeros(2, *spec.shape, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="defectscope-export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter; failures still raise
            torch.onnx.export(
                model,
                (dummy,),
                str(raw),
                dynamo=False,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[spec.name],
                output_names=[output_name],
                dynamic_axes={spec.name: {0: "batch"}, output_name: {0: "batch"}},
            )
        graph = onnx.load(str(raw))
        check_graph(graph, spec, num_classes, output_name)
        before = len(graph.graph.node)
        simplified, error = False, None
        if simplify:
            try:
                import onnxslim

                slim = onnxslim.slim(graph)
                check_graph(slim, spec, num_classes, output_name)
                graph, simplified = slim, True
            except Exception as exc:  # keep the checked, unsimplified graph; say why
                error = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"onnxslim failed, keeping the unsimplified graph: {error}", stacklevel=2)
        graph.producer_name = "defectscope"
        atomic_write(dest, lambda tmp: onnx.save(graph, tmp))
    return ExportInfo(
        opset=opset,
        exporter="torchscript",
        simplified=simplified,
        nodes=len(graph.graph.node),
        nodes_before_simplify=before,
        simplify_error=error,
    )


@dataclass(frozen=True)
class ParityReport:
    """ONNX Runtime vs PyTorch logits on the same preprocessed images."""

    n: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float
    min_agreement: float
    batch_sizes: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_agreement >= self.min_agreement

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["batch_sizes"] = list(self.batch_sizes)
        out["passed"] = self.passed
        return out

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"parity {verdict}: {self.n} held-out images, max |logit diff| {self.max_abs_diff:.2e} "
            f"(tolerance {self.atol:.0e}), mean {self.mean_abs_diff:.2e}, top-1 agreement "
            f"{self.top1_agreement:.2%} (required {self.min_agreement:.2%}), batch sizes {list(self.batch_sizes)}"
        )


def torch_logits(model: Any, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N,K) logits of a torch model in eval mode on preprocessed (N,C,H,W) float32."""
    import torch

    model = model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))).float().numpy())
    return np.concatenate(outs) if outs else np.empty((0, 0), np.float32)


def check_parity(
    model: Any,
    onnx_path: str | os.PathLike[str],
    x: np.ndarray,
    *,
    atol: float = 1e-3,
    min_agreement: float = 0.99,
    threads: int | None = None,
    batch_size: int = 16,
) -> ParityReport:
    """Compare ONNX Runtime and PyTorch logits on ``x``; runs batch 1 and ``batch_size`` (dynamic batch check).

    Returns the report; callers enforce ``report.passed``.
    """
    from calibration.evaluate import ort_session, predict_logits

    if len(x) == 0:
        raise ExportError("parity check needs at least one held-out image")
    ref = torch_logits(model, x, batch_size)
    sess = ort_session(onnx_path, threads)
    got_batched = predict_logits(sess, x, batch_size)
    k = min(len(x), 4)
    got_single = predict_logits(sess, x[:k], 1)
    diff = np.abs(got_batched - ref)
    diff_single = np.abs(got_single - ref[:k])
    agreement = float(np.mean(got_batched.argmax(1) == ref.argmax(1)))
    return ParityReport(
        n=int(len(x)),
        max_abs_diff=float(max(diff.max(), diff_single.max())),
        mean_abs_diff=float(diff.mean()),
        top1_agreement=agreement,
        atol=float(atol),
        min_agreement=float(min_agreement),
        batch_sizes=(1, int(min(batch_size, len(x)))),
    )
