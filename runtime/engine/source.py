"""Which ONNX artifact of a bundle a TensorRT engine is built from (``runtime.engine.plan.plan_build``)."""

from __future__ import annotations

from typing import Any

from runtime.inference.preprocess import FLOAT_NCHW, UINT8_NHWC

TRT_INT8_ARTIFACT = "int8-trt"


class BuildError(RuntimeError):
    """A build that cannot go ahead or failed; the message says why and what to do."""


def _onnx_artifacts(manifest: Any, kind: str = FLOAT_NCHW) -> dict[str, Any]:
    return {k: a for k, a in manifest.artifacts.items() if a.format == "onnx" and a.input == kind}


def _uint8_twin(manifest: Any, key: str) -> tuple[str, Any]:
    """The uint8-input twin of ONNX artifact ``key`` (``export --uint8-input`` / calibrate made it)."""
    twin = f"{key}-u8"
    art = manifest.artifacts.get(twin)
    if art is None or art.format != "onnx" or art.input != UINT8_NHWC:
        raise BuildError(
            f"--input uint8 builds from the uint8-input twin {twin!r} of {key!r}, which the bundle does not have "
            f"(artifacts: {sorted(manifest.artifacts)}); export with --uint8-input (then calibrate) on the workstation"
        )
    return twin, art


def _find_fp32(manifest: Any) -> tuple[str, Any]:
    arts = _onnx_artifacts(manifest)
    if "fp32" in arts and arts["fp32"].precision == "fp32":
        return "fp32", arts["fp32"]
    for key, art in arts.items():
        if art.precision == "fp32":
            return key, art
    raise BuildError(
        f"bundle {manifest.model.name} has no FP32 ONNX artifact to build from "
        f"(artifacts: {sorted(manifest.artifacts)})"
    )


def _find_symmetric_qdq(manifest: Any, bundle_hint: str) -> tuple[str, Any]:
    arts = _onnx_artifacts(manifest)
    ranked = sorted(arts.items(), key=lambda kv: kv[0] != TRT_INT8_ARTIFACT)
    for key, art in ranked:
        q = dict(art.quantization or {})
        if art.precision == "int8" and q.get("activation_symmetric") and q.get("format", "qdq") == "qdq":
            return key, art
    have = [k for k, a in arts.items() if a.precision == "int8"]
    why = (
        f"its INT8 artifact(s) {have} use asymmetric (uint8) activations, which TensorRT cannot import"
        if have
        else "it has no INT8 artifact"
    )
    raise BuildError(
        f"explicit INT8 needs a QDQ model with symmetric int8 activations, and {why}. On the workstation run:\n"
        f"    defectscope calibrate {bundle_hint} --target tensorrt\n"
        "then copy the bundle to the device again (or use --int8-mode implicit on TensorRT 8.x)"
    )
