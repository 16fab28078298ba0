"""bench_runtime's command line, its TTA settings and the images it replays."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# TTA settings by name: (views, mode). "3a": adaptive, extra views only for frames whose first-view
# score is within TTA_BAND of the threshold.
TTA_VIEWS = {"1": ["original"], "3": ["original", "hflip", "vflip"], "3a": ["original", "hflip", "vflip"]}
TTA_MODE = {"1": "always", "3": "always", "3a": "uncertain"}
TTA_BAND = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench_engines import DEFAULT_ENGINES

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--bundle", required=True, help="model bundle directory (int8 + fp32 artifacts)")
    p.add_argument("--images", help="replay these images instead of the ELPV held-out split")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (smoke runs)")
    p.add_argument("--artifacts", default="int8,fp32", help="bundle artifact keys to compare (default int8,fp32)")
    p.add_argument(
        "--tta",
        default="1,3,3a",
        help="TTA settings: 1 (off), 3 (original+hflip+vflip on every frame), 3a (the same views, "
        f"adaptive: extra views only within {TTA_BAND} of the threshold)",
    )
    p.add_argument("--cameras", default="1,4", help="camera counts (each replays the whole set)")
    p.add_argument(
        "--total-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads every bare engine gets: the machine's budget (default: all cores)",
    )
    p.add_argument("--threads", type=int, help="the daemon's engine threads (default: --total-threads)")
    p.add_argument(
        "--engines",
        default=DEFAULT_ENGINES,
        help=f"bare engines for the headline (default {DEFAULT_ENGINES}; '' = none)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="frames per inference call (daemon and bare)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "onnxruntime-cpu", "onnxruntime-cuda", "openvino", "tensorrt"),
        help="the daemon's [model] backend (default auto)",
    )
    p.add_argument("--ov-precision", default="f32", choices=("f32", "bf16"), help="daemon [model.openvino] precision")
    p.add_argument("--ov-hint", default="latency", choices=("latency", "throughput"))
    p.add_argument(
        "--ov-requests",
        type=int,
        default=1,
        help="daemon [model.openvino] infer_requests (>1: a batch split over parallel async requests)",
    )
    p.add_argument(
        "--preload",
        action="store_true",
        help="cameras decode the replay once into memory ([[cameras]] preload_mb): the daemon is "
        "measured without PNG decoding, which a live camera does not do",
    )
    p.add_argument(
        "--accuracy",
        metavar="JSON",
        help="bench_openvino_accuracy.py output: the headline also compares with the fastest engine "
        "that met its accuracy target",
    )
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is reported")
    p.add_argument(
        "--stages",
        action="store_true",
        help="also print the per-stage CPU-time table per frame, with the stacking copy and with zero_copy",
    )
    p.add_argument(
        "--zero-copy", action="store_true", help="daemon [batching] zero_copy = true (frames prepared into one arena)"
    )
    p.add_argument(
        "--low-load",
        type=float,
        default=0.0,
        metavar="FPS",
        help="also run one camera paced at FPS (e.g. 20) and report capture->publish p50/p99",
    )
    p.add_argument("--low-load-s", type=float, default=15.0, help="low-load run length in seconds (default 15)")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="soak mode for SECONDS")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime.json"))
    args = p.parse_args(argv)
    args.threads = args.threads or args.total_threads
    args.tta = [x.strip() for x in args.tta.split(",") if x.strip()]
    args.cameras = [int(x) for x in args.cameras.split(",")]
    if any(t not in TTA_VIEWS for t in args.tta):
        p.error(f"--tta: choose from {sorted(TTA_VIEWS)}")
    if args.repeat < 1:
        p.error("--repeat: expected >= 1")
    args.preload_mb = 0.0
    return args


def heldout_images(args: argparse.Namespace) -> list[Path]:
    if args.images:
        from runtime.sources.readers import list_images

        paths = list_images(args.images)
    else:
        from training.classification.data import resolve_splits  # numpy-only module: no torch import

        splits = resolve_splits({"source": "elpv", "verify": False, "seed": 0, "test_fraction": 0.25})
        paths = [Path(s.path) for s in splits.test]
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise SystemExit("no images to replay")
    return paths


def replay_dir(paths: list[Path], tmp: Path) -> Path:
    """A directory of symlinks in replay order (a directory camera replays sorted names)."""
    d = tmp / "replay"
    d.mkdir(exist_ok=True)
    for i, p in enumerate(paths):
        link = d / f"{i:06d}{p.suffix.lower()}"
        if not link.exists():
            link.symlink_to(p.resolve())
    return d
