"""DefectScope calibration side: trained checkpoint -> verified, self-describing model bundle.

- ``export``: PyTorch -> ONNX (opset 17, dynamic batch, ``input``/``logits``), checker,
  optional onnxslim, parity against PyTorch on held-out images (``defectscope export``).
- ``calibset``: stratified, seeded calibration set preprocessed by ``runtime.inference.preprocess``.
- ``quantize``: ONNX Runtime static QDQ quantization (per-channel weights; minmax /
  entropy / percentile) and per-layer sensitivity.
- ``gate`` / ``fallback``: FP32 vs INT8 accuracy gate and the search for float nodes.
- ``engine`` / ``calibrator``: TensorRT engine builds (``defectscope build-engine``);
  TensorRT and pycuda are imported lazily, only there.

Imports flow training -> calibration -> runtime, never back.
"""
