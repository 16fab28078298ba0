"""Station config types: the frozen dataclasses of one station's TOML and their fixed choices.

The parsing and validation (``load_config``, ``from_dict``) live in runtime.config.station, which
re-exports everything here; import from there.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.serving.device_health import DeviceHealthConfig
from runtime.serving.preview import PreviewConfig

BACKENDS = ("auto", "tensorrt", "onnxruntime-cuda", "openvino", "onnxruntime-cpu")
SOURCE_KINDS = ("auto", "directory", "video", "v4l2", "rtsp", "http", "gstreamer")
ON_FULL = ("drop_oldest", "block")
# gstreamer sources: PyGObject (gi + appsink) or OpenCV's CAP_GSTREAMER; auto = PyGObject if importable.
GST_READERS = ("auto", "pygobject", "opencv")
ROTATIONS = (0, 90, 180, 270)
FORMATS = ("json", "msgpack")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Camera and station ids become ZeroMQ topic parts ("<station>.<camera>.<verdict>") and
# metric label values: no dots, no leading underscore (reserved for "<station>._status").
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Square inputs only for the 90-degree views (the rest of the dihedral group of the square):
# rot90 / rot270 turn counter-clockwise / clockwise, transpose mirrors about the main diagonal,
# transverse about the other one; rot180 = hflip + vflip.
VIEW_RE = re.compile(r"^(original|hflip|vflip|rot90|rot180|rot270|transpose|transverse|scale:(\d+(\.\d+)?))$")


@dataclass(frozen=True)
class CameraConfig:
    """One camera (or replay source) and how its frames are captured."""

    id: str
    source: str  # directory / video path, V4L2 index ("0"), rtsp:// or http:// URL, GStreamer pipeline
    kind: str = "auto"  # resolved to one of SOURCE_KINDS[1:] on load
    fps: float | None = None  # cap in frames/s; None = as fast as the source delivers
    loop: bool = False  # directory / video replay: start over at the end
    roi: tuple[int, int, int, int] | None = None  # (x, y, w, h) in pixels, after rotation
    rotate: int = 0  # degrees clockwise
    queue_size: int = 4  # frames buffered between capture and inference
    on_full: str = "drop_oldest"  # replay sources default to "block" (every frame inferred)
    reconnect_initial_s: float = 0.5
    # Longest wait between reopen attempts: a camera that comes back is judged again within this
    # (plus read_timeout_s); the jitter spreads a fleet's retries.
    reconnect_max_s: float = 2.0
    read_timeout_s: float = 5.0  # a live source silent this long is treated as disconnected
    # Directory replays: decode every image once into memory (MB budget of decoded pixels), so a
    # replay measures the station and not PNG decoding; 0 = decode while replaying.
    preload_mb: float = 0.0
    gst_reader: str = "auto"  # gstreamer sources only: one of GST_READERS (runtime/sources/gstreamer.py)
    # Largest frame accepted, width x height: files are checked from their header before decoding
    # (decompression bombs), live frames after capture; beyond it frames_dropped_total{reason="too_large"}.
    # 40 MP = 8000x5000: its worst decode (16-bit RGBA, 320 MB) times the decode-ahead stays far
    # below the daemon unit's MemoryMax (6 GiB).
    max_pixels: int = 40_000_000

    @property
    def finite(self) -> bool:
        """A replay that ends (directory / video file without loop)."""
        return self.kind in ("directory", "video") and not self.loop


# ---- [model.openvino] (the OpenVINO backend; threads come from model.threads) ----
OV_HINTS = ("latency", "throughput")
OV_PRECISIONS = ("f32", "bf16")  # CPU inference precision of the float parts; bf16 changes numbers


@dataclass(frozen=True)
class OpenVINOConfig:
    cache_dir: Path | None = None  # compiled-model cache (restarts load instead of recompiling); None = off
    hint: str = "latency"  # OpenVINO PERFORMANCE_HINT
    precision: str = "f32"  # INFERENCE_PRECISION_HINT; a bundle's accuracy record gates "openvino:<precision>"
    infer_requests: int = 1  # >1: a batch is split over this many async infer requests run in parallel


@dataclass(frozen=True)
class ModelConfig:
    bundle: Path
    artifact: str | None = None  # None: the manifest's default_artifact (auto may pick a TensorRT engine)
    backend: str = "auto"
    threads: int = 1  # ONNX Runtime intra-op / OpenVINO inference threads
    device_id: int = 0  # CUDA device for onnxruntime-cuda / tensorrt
    dla_core: int | None = (
        None  # Jetson: run a DLA-built TensorRT engine on this core (None: the core it was built for)
    )
    warmup_runs: int = 2
    openvino: OpenVINOConfig = OpenVINOConfig()
    min_frame_side: int | None = None  # pixels; None: a quarter of the model input's shorter side


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = 8  # frames per inference call (x TTA views = tensors)
    max_wait_ms: float = 5.0  # how long the first frame of a batch may wait for company
    # Capture threads write prepared frames into slots of one preallocated arena (pinned memory for
    # TensorRT) and consecutive slots go to the engine as one view: no per-frame allocation, no
    # stacking copy. Off by default until bench_runtime --stages has measured it on the station.
    zero_copy: bool = False


TTA_MODES = ("always", "uncertain")


@dataclass(frozen=True)
class TTAConfig:
    views: tuple[str, ...] = ("original",)
    mode: str = "always"  # "always": every view of every frame; "uncertain": more views only near a threshold
    band: float = 0.2  # uncertain mode: first-view score within this of a threshold -> all views

    @property
    def enabled(self) -> bool:
        return self.views != ("original",)


DEFAULT_THRESHOLD = 0.5  # a classifier's default; a detector's is its bundle's output.score_threshold


@dataclass(frozen=True)
class DecisionConfig:
    default_threshold: float | None = None  # None: DEFAULT_THRESHOLD (detector: the bundle's score_threshold)
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per defect class
    uncertain_band: float = 0.1  # half-width around each threshold that is judged "uncertain"
    good_classes: tuple[str, ...] | None = None  # None: the manifest's good_classes
    min_box_area: float = 0.0  # detectors: boxes smaller than this (original pixels^2) are not counted


@dataclass(frozen=True)
class CurveConfig:
    server_secret_key: Path  # zmq.auth certificate file holding the server's secret key
    # Directory of the client public certificates allowed in (ZAP). Without it CURVE only
    # encrypts: any freshly generated key connects, so None needs allow_any_client = True.
    authorized_clients: Path | None = None
    allow_any_client: bool = False


def curve_allow_list_error(curve: CurveConfig) -> str | None:
    """Why this CURVE setup is refused (exactly one of the allow-list and allow_any_client), or None."""
    if curve.authorized_clients is not None and curve.allow_any_client:
        return "set either authorized_clients or allow_any_client = true, not both"
    if curve.authorized_clients is None and not curve.allow_any_client:
        return (
            "missing: CURVE without an allow-list lets any client key in (encryption, not "
            "authentication); name a directory of client public keys, or set "
            "allow_any_client = true to accept any client on purpose"
        )
    return None


@dataclass(frozen=True)
class PublisherConfig:
    bind: tuple[str, ...] = ("tcp://127.0.0.1:5555",)
    format: str = "json"
    sndhwm: int = 1000  # messages queued per subscriber before that subscriber's messages are dropped
    sndbuf: int = 0  # kernel send buffer bytes; 0 = OS default
    wait_for_subscribers: int = 0  # hold capture until this many subscriptions arrived (replays, benchmarks)
    wait_timeout_s: float = 30.0
    status_interval_s: float = 1.0  # "<station>._status" heartbeat; 0 = off
    curve: CurveConfig | None = None
    # Largest message a subscriber may send (its (un)subscriptions, topic prefixes), bytes; a peer
    # that sends more is disconnected by ZeroMQ before the message is buffered.
    max_inbound_bytes: int = 1024
    # Subscriptions applied per peer (IP address; IPC: process) and over all peers, by count and by
    # bytes of topics; a peer beyond either is disconnected (runtime.serving.subscriptions). A console needs
    # one subscription per station; libzmq spends ~48 bytes of memory per topic byte.
    max_subscriptions_per_peer: int = 64
    max_subscription_bytes_per_peer: int = 8192
    max_subscriptions: int = 1024
    max_subscription_bytes: int = 65536
    # A dropped peer's address is refused (ZAP) for this long, seconds: a reconnecting flood costs a
    # handshake, not an allowance. Subscribers sharing its address wait as long.
    drop_ban_s: float = 10.0


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9108  # 0 = any free port (tests)
    ready_max_frame_age_s: float = 5.0
    # A client that has not sent its whole request within this (or stalls a write of the answer) is cut off, s.
    http_timeout_s: float = 5.0
    http_max_connections: int = 8  # served at once (threads); more are closed at once, unanswered


@dataclass(frozen=True)
class SnapshotConfig:
    enabled: bool = False
    dir: Path = Path("/var/lib/defectscope/snapshots")
    quota_mb: float = 1024.0
    verdicts: tuple[str, ...] = ("defect", "uncertain")
    jpeg_quality: int = 90
    queue_size: int = 64


@dataclass(frozen=True)
class DaemonConfig:
    pid_file: Path | None = None
    drain_timeout_s: float = 10.0
    stall_timeout_s: float = 10.0  # frames waiting this long with none inferred = stalled (no WATCHDOG=1)
    exit_when_sources_end: bool = True  # all cameras finite and finished -> drain and exit 0
    log_level: str = "info"
    # Python's GIL switch interval, ms. When an inference call returns, the inference thread waits
    # for the GIL up to this long while capture/output threads run Python; CPython's 5 ms default
    # costs a 30 ms batch ~10-15% of throughput with several cameras.
    switch_interval_ms: float = 0.5


@dataclass(frozen=True)
class StationConfig:
    station: str
    cameras: tuple[CameraConfig, ...]
    model: ModelConfig
    batching: BatchingConfig = BatchingConfig()
    tta: TTAConfig = TTAConfig()
    decision: DecisionConfig = DecisionConfig()
    publisher: PublisherConfig = PublisherConfig()
    metrics: MetricsConfig = MetricsConfig()
    snapshots: SnapshotConfig = SnapshotConfig()
    daemon: DaemonConfig = DaemonConfig()
    preview: PreviewConfig = PreviewConfig()
    device_health: DeviceHealthConfig = DeviceHealthConfig()
    source: str = "(in memory)"

    def to_dict(self) -> dict[str, Any]:
        """Resolved config as plain JSON-able data (logged at start, printed by ``serve --check``)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
