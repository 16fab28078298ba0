"""A detection bundle served end to end: the in-process daemon on a directory replay of
synthetic frames (landscape, portrait and square, so the letterbox pads both ways), flip TTA
in the one inference call, a real ZeroMQ subscriber, snapshots and Prometheus text."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from runtime.config.station import load_config
from runtime.serving.daemon import Daemon
from runtime.serving.messages import validate
from runtime.tools.viewer import ViewerState

from ._detection import CLASSES, make_detection_bundle, write_blob_images
from ._helpers import Subscriber, station_config

# (frame, expected verdict, class, box in ORIGINAL pixels); every blob edge sits on the 2x
# letterbox grid, so the box comes back exactly.
FRAMES = [
    ({"h": 48, "w": 64, "box": (16, 8, 40, 24)}, "defect", "scratch", [16.0, 8.0, 40.0, 24.0]),
    ({"h": 64, "w": 32, "box": (4, 20, 28, 40), "color": (150, 150, 255)}, "defect", "stain", [4.0, 20.0, 28.0, 40.0]),
    ({"h": 32, "w": 32, "box": None}, "ok", None, None),
    ({"h": 48, "w": 64, "box": (8, 8, 24, 16), "level": 128}, "uncertain", "scratch", [8.0, 8.0, 24.0, 16.0]),
]


def _samples(d: Daemon) -> dict:
    out = {}
    for fam in text_string_to_metric_families(d.metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_detection_bundle_serves_boxes_in_original_pixels(tmp_path: Path) -> None:
    bundle = make_detection_bundle(tmp_path / "bundle")
    write_blob_images(tmp_path / "replay", [f[0] for f in FRAMES])
    spool = tmp_path / "spool"
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 10.0},
        tta={"views": ["original", "hflip", "vflip"]},
        decision={"min_box_area": 16.0},
        snapshots={"enabled": True, "dir": str(spool), "quota_mb": 10.0},
    )
    sub = Subscriber(endpoint)
    d = Daemon(load_config(config), config_path=config)
    try:
        d.start()
        assert d.run() == 0
        sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        samples = _samples(d)
    finally:
        d.shutdown()
        sub.close()
    for _, m in sub.messages:
        validate(m)
    msgs = sub.verdicts()
    assert [m["seq"] for m in msgs] == list(range(len(FRAMES)))
    for m, (_, verdict, cls, box) in zip(msgs, FRAMES):
        assert (m["schema_version"], m["task"], m["tta_views"]) == (2, "detection", 3)
        assert (m["verdict"], m["defect_class"]) == (verdict, cls)
        assert sorted(m["class_scores"]) == sorted(CLASSES)
        assert [x["box"] for x in m["detections"]] == ([box] if box else [])
        assert [x["class"] for x in m["detections"]] == ([cls] if cls else [])
        if verdict == "ok":
            assert m["snapshot"] is None and m["top_class"] == "ok"
            continue
        jpg = Path(m["snapshot"])
        sidecar = json.loads(jpg.with_suffix(".json").read_text())
        assert sidecar["detections"] == m["detections"]
        boxed = cv2.imread(str(jpg.with_name(sidecar["boxes_image"])))
        x1, y1 = int(box[0]), int(box[1])
        assert boxed.shape[:2] == (FRAMES[m["seq"]][0]["h"], FRAMES[m["seq"]][0]["w"])
        assert boxed[y1, x1 + 2, 2] > 150 and boxed[y1, x1 + 2, 0] < 100  # the red outline on the top edge
    assert len(list(spool.glob("*.boxes.jpg"))) == 3

    def metric(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted({"camera": "cam1", **labels}.items()))), 0.0)

    assert metric("defectscope_detections_total", **{"class": "scratch"}) == 2
    assert metric("defectscope_detections_total", **{"class": "stain"}) == 1
    assert metric("defectscope_defects_total", **{"class": "stain"}) == 1
    assert metric("defectscope_detections_per_frame_count") == len(FRAMES)
    assert metric("defectscope_detections_per_frame_sum") == 3
    # What `defectscope watch` shows of this stream.
    state = ViewerState()
    for m in msgs:
        assert state.update(m, 1.0)
    (row,) = state.rows(1.0)
    assert row["box_counts"] == {"scratch": 2, "stain": 1} and row["boxes"] == "1 scratch"
    assert np.isfinite(row["confidence"])
