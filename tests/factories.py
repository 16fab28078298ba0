"""Tiny models and bundles made in tests (no torch needed)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that is free now and was not handed out before in this process.

    The kernel may give the port it just released to the next ``bind(0)``, so two calls in a
    row (a daemon's metrics and publisher ports) could return the same port.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def make_tiny_onnx(
    path: Path,
    num_classes: int = 2,
    size: int = 32,
    input_name: str = "input",
    output_name: str = "logits",
    seed: int = 0,
) -> Path:
    """A brightness classifier: GlobalAveragePool → Flatten → Gemm, input (N,3,size,size).

    Class 0 ("ok") wins on dark images and the last class on bright ones, so verdicts
    are predictable from synthetic frames.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    # logits_k = w_k * mean(channels) + b_k with w increasing in k: brightness picks the class.
    w = np.repeat(np.linspace(-4.0, 4.0, num_classes)[:, None], 3, axis=1).astype(np.float32)
    w += rng.normal(0, 0.01, w.shape).astype(np.float32)
    b = np.zeros(num_classes, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", [input_name], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "B"], [output_name], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", num_classes])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def tiny_manifest(
    num_classes: int = 2,
    size: int = 32,
    name: str = "tiny",
    version: str = "1.0.0",
    classes: tuple[str, ...] | None = None,
):
    from runtime.bundle.manifest import Artifact, Manifest, ModelInfo, OutputSpec
    from runtime.inference.preprocess import InputSpec

    classes = classes or (("ok", "defect") if num_classes == 2 else tuple(f"c{i}" for i in range(num_classes)))
    return Manifest(
        model=ModelInfo(name=name, version=version, task="classification", architecture="tiny"),
        classes=classes,
        good_classes=(classes[0],),
        input=InputSpec(height=size, width=size, resize_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        output=OutputSpec(kind="logits", names=("logits",)),
        artifacts={"fp32": Artifact(file="model.onnx", format="onnx", precision="fp32")},
        default_artifact="fp32",
    )


def make_tiny_bundle(dest: Path, num_classes: int = 2, size: int = 32, version: str = "1.0.0", name: str = "tiny"):
    """Write a valid tiny bundle at ``dest`` and return the loaded Bundle."""
    from runtime.bundle.write import write_bundle

    onnx_path = make_tiny_onnx(dest.parent / f".{dest.name}-src" / "model.onnx", num_classes, size)
    return write_bundle(dest, tiny_manifest(num_classes, size, name, version), {"model.onnx": onnx_path})
