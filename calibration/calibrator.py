"""TensorRT 8.x implicit INT8 calibration: batches, the calibration cache, the entropy calibrator.

TensorRT 10+ builds INT8 engines from the QDQ ONNX (explicit quantization) and
needs none of this. On TensorRT 8.x (JetPack 5) the builder calibrates the FP32
ONNX itself through an ``IInt8EntropyCalibrator2`` that feeds the *same*
preprocessed calibration tensors ``defectscope calibrate`` used, and caches the
result in a calibration cache file so later builds skip calibration.

Everything but :func:`make_entropy_calibrator` is plain numpy / file handling,
testable without a GPU; TensorRT and pycuda are imported inside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engine.meta import version_tuple
from runtime.fsio import atomic_write_bytes

ALGORITHM = "EntropyCalibration2"
_HEADER = re.compile(rb"^TRT-(\d+)-([A-Za-z0-9_]+)\s*$")


class CalibrationCacheError(ValueError):
    """A calibration cache that cannot be used; the message says why."""


class BatchStream:
    """Fixed-size (B,C,H,W) float32 batches over a calibration tensor, for TensorRT's calibrator.

    TensorRT needs every batch at the calibration profile's shape, so the last
    batch is completed by wrapping around to the first images: every image is
    seen at least once and at most ``B-1`` are seen twice.
    """

    def __init__(self, x: np.ndarray, batch_size: int) -> None:
        if x.ndim != 4 or len(x) == 0:
            raise ValueError(f"calibration tensor must be non-empty (N,C,H,W), got shape {x.shape}")
        if batch_size < 1:
            raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
        self.x = x
        self.batch_size = int(batch_size)
        self.n_batches = -(-len(x) // self.batch_size)
        self._i = 0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, *self.x.shape[1:])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def reset(self) -> None:
        self._i = 0

    def next_batch(self) -> np.ndarray | None:
        """The next contiguous float32 batch, or None when all images were served."""
        if self._i >= self.n_batches:
            return None
        start = self._i * self.batch_size
        idx = np.arange(start, start + self.batch_size) % len(self.x)
        self._i += 1
        return np.ascontiguousarray(self.x[idx], dtype=np.float32)

    def __iter__(self):
        self.reset()
        while (b := self.next_batch()) is not None:
            yield b


def trt_version_codes(version: str) -> set[int]:
    """Integer version codes TensorRT writes into cache headers (8.x: M*1000+m*100+p; 10.x: M*10000+m*100+p)."""
    v = (list(version_tuple(version)) + [0, 0, 0])[:3]
    return {v[0] * 1000 + v[1] * 100 + v[2], v[0] * 10000 + v[1] * 100 + v[2]}


def parse_cache_header(data: bytes) -> tuple[int, str]:
    """(version code, algorithm) from a TensorRT calibration cache's first line."""
    first = data.split(b"\n", 1)[0]
    m = _HEADER.match(first)
    if not m:
        raise CalibrationCacheError(f"not a TensorRT calibration cache (first line {first[:40]!r})")
    return int(m.group(1)), m.group(2).decode()


def cache_usable(data: bytes, tensorrt_version: str, algorithm: str = ALGORITHM) -> tuple[bool, str]:
    """Whether TensorRT ``tensorrt_version`` can reuse this cache, and why not."""
    try:
        code, algo = parse_cache_header(data)
    except CalibrationCacheError as exc:
        return False, str(exc)
    if algo != algorithm:
        return False, f"cache was written by {algo}, this build calibrates with {algorithm}"
    if code not in trt_version_codes(tensorrt_version):
        return False, f"cache was written by TensorRT version code {code}, this is TensorRT {tensorrt_version}"
    if len(data.split(b"\n")) < 2:
        return False, "cache holds no tensor scales"
    return True, "ok"


@dataclass
class CacheFile:
    """Read / write a calibration cache next to the bundle; unusable caches are ignored with a reason."""

    path: Path
    tensorrt_version: str
    algorithm: str = ALGORITHM
    log: Callable[[str], None] = print
    read_from: Path | None = None  # e.g. the copy shipped inside the bundle

    def read(self) -> bytes | None:
        for candidate in [p for p in (self.path, self.read_from) if p is not None]:
            if not candidate.is_file():
                continue
            data = candidate.read_bytes()
            ok, why = cache_usable(data, self.tensorrt_version, self.algorithm)
            if ok:
                self.log(f"using calibration cache {candidate}")
                return data
            self.log(f"ignoring calibration cache {candidate}: {why}")
        return None

    def write(self, data: bytes) -> Path:
        """Atomic write (runtime.fsio) so a crash never leaves a truncated cache."""
        atomic_write_bytes(self.path, bytes(data))
        self.log(f"wrote calibration cache {self.path}")
        return self.path


def make_entropy_calibrator(stream: BatchStream | None, cache: CacheFile) -> Any:
    """A ``tensorrt.IInt8EntropyCalibrator2`` feeding ``stream`` through pycuda, with ``cache``.

    With ``stream=None`` only a valid cache can calibrate (TensorRT fails the build otherwise).
    """
    import pycuda.autoinit  # noqa: F401  (creates the CUDA context the copies need)
    import pycuda.driver as cuda
    import tensorrt as trt

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.stream = stream
            self.cache = cache
            self.device = cuda.mem_alloc(stream.nbytes) if stream is not None else None
            self.served = 0

        def get_batch_size(self) -> int:
            # Explicit-batch networks calibrate at the calibration profile's shape (B,C,H,W).
            return stream.batch_size if stream is not None else 1

        def get_batch(self, names: list[str], *args: Any) -> list[int] | None:
            if self.stream is None:
                return None
            batch = self.stream.next_batch()
            if batch is None:
                return None
            cuda.memcpy_htod(self.device, batch)
            self.served += 1
            return [int(self.device)]  # type: ignore[arg-type]  # a pycuda DeviceAllocation

        def read_calibration_cache(self, *args: Any) -> bytes | None:
            return self.cache.read()

        def write_calibration_cache(self, data: Any) -> None:
            self.cache.write(bytes(data))

    return EntropyCalibrator()
