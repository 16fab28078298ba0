"""The DLA of a Jetson for TensorRT engines (``build-engine --dla-core N`` / ``[model] dla_core``).

The DLA runs INT8 and FP16 layers; an engine built for it runs the rest on the GPU (GPU
fallback). :func:`dla_decision` (pure, tested on CPU) says whether the build can use the
asked-for core at all and why not; :func:`configure_dla` sets the builder config the way
NVIDIA's samples do (``default_device_type = DLA``, ``DLA_core``, ``GPU_FALLBACK``) and logs the
layers that stay on the GPU (``can_run_on_DLA``). TensorRT is passed in, never imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def dla_decision(requested: int | None, available: int, precision: str) -> tuple[int | None, str | None]:
    """(DLA core to build for, or None; why the GPU builds it instead, or None). Pure: tested on CPU."""
    if requested is None:
        return None, None
    if available <= 0:
        return None, f"DLA core {requested} asked for, this device has no DLA: building for the GPU"
    if requested >= available:
        return None, (
            f"DLA core {requested} asked for, this device has {available} (0..{available - 1}): building for the GPU"
        )
    if precision not in ("int8", "fp16"):
        return None, f"the DLA runs INT8 and FP16 only, not {precision}: building for the GPU"
    return requested, None


def configure_dla(
    trt: Any, builder: Any, network: Any, config: Any, plan: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """Set the builder config for ``plan.dla_core`` (DLA by default, GPU fallback); the record for the artifact.

    Logs which layers stay on the GPU (``can_run_on_DLA``) or why the whole engine does.
    """
    if plan.dla_core is None:
        return {}
    available = int(getattr(builder, "num_DLA_cores", 0) or 0)
    core, why = dla_decision(plan.dla_core, available, plan.precision)
    record: dict[str, Any] = {"requested": plan.dla_core, "core": core, "available": available}
    if core is None:
        log(f"warning: {why}")
        record["fallback"] = why
        return record
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    on_gpu = [layer.name for layer in layers if not config.can_run_on_DLA(layer)]
    record["gpu_fallback_layers"] = len(on_gpu)
    record["layers"] = len(layers)
    if on_gpu:
        shown = ", ".join(on_gpu[:8]) + (f", ... ({len(on_gpu) - 8} more)" if len(on_gpu) > 8 else "")
        log(f"DLA core {core}: {len(on_gpu)} of {len(layers)} layer(s) cannot run on the DLA, GPU fallback: {shown}")
    else:
        log(f"DLA core {core}: all {len(layers)} layers can run on the DLA")
    return record
