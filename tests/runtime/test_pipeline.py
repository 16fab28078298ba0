"""The daemon pipeline in-process, on real components: replay cameras, ONNX Runtime, ZeroMQ
subscribers and HTTP scrapes on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.config.station import load_config
from runtime.serving.daemon import Daemon
from runtime.serving.messages import validate

from ._helpers import (
    Subscriber,
    brightness,
    http_get,
    make_bundle,
    make_images,
    metric,
    scrape,
    station_config,
)

PATTERN = ["ok", "defect", "uncertain", "ok", "ok", "defect"]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Build + start an in-process daemon from a station config; always shut down at the end."""
    started: list[Daemon] = []

    def start(config: Path) -> Daemon:
        d = Daemon(load_config(config), config_path=config)
        started.append(d)
        d.start()
        return d

    yield start
    for d in started:
        d.shutdown()


def run_in_thread(d: Daemon) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    t = threading.Thread(target=lambda: code.append(d.run()), daemon=True)
    t.start()
    return t, code


def test_subscriber_receives_every_replayed_frame_schema_valid(tmp_path: Path, bundle: Path, start_daemon) -> None:
    verdicts = PATTERN * 3
    make_images(tmp_path / "replay", verdicts)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        publisher={"wait_for_subscribers": 1, "wait_timeout_s": 10.0},
    )
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.run() == 0  # a finite replay: drains and returns when it has ended
        sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        msgs = sub.verdicts()
        for _, m in sub.messages:
            validate(m)
        assert [m["seq"] for m in msgs] == list(range(len(verdicts)))
        assert [m["verdict"] for m in msgs] == verdicts
        assert [m["source"] for m in msgs] == [f"frame_{i:05d}.png" for i in range(len(verdicts))]
        topics = [t for t, m in sub.messages if m["type"] == "verdict"]
        assert topics == [f"st1.cam1.{v}" for v in verdicts]
        for m in msgs:
            assert m["model"] == {
                "name": "tiny",
                "version": "1.0.0",
                "precision": "fp32",
                "artifact": "fp32",
                "backend": "onnxruntime-cpu",
            }
            assert abs(sum(m["probabilities"].values()) - 1.0) < 1e-3
            assert m["published_at"] >= m["captured_at"]
            lat = m["latency_ms"]
            assert lat["total"] >= lat["inference"] >= 0 and lat["preprocess"] >= 0
            assert (m["defect_class"] == "defect") == (m["verdict"] != "ok")
        final = [m for m in sub.statuses() if m["state"] == "stopped"][-1]
        assert final["cameras"]["cam1"]["captured"] == final["cameras"]["cam1"]["published"] == len(verdicts)
        assert final["cameras"]["cam1"]["dropped"] == 0
    finally:
        sub.close()


def test_tta_views_run_in_one_call_and_probabilities_are_averaged(tmp_path: Path, bundle: Path, start_daemon) -> None:
    import onnxruntime as ort

    from runtime.bundle.load import load_bundle
    from runtime.inference.decision import softmax
    from runtime.inference.preprocess import Preprocessor, read_image

    # Bright centre, dark border: the zoomed view sees a brighter crop, so the views disagree.
    replay = tmp_path / "replay"
    replay.mkdir()
    import cv2

    for i, (inner, outer) in enumerate([(200, 30), (150, 90), (60, 20)]):
        img = np.full((48, 48), outer, np.uint8)
        img[12:36, 8:40] = inner
        cv2.imwrite(str(replay / f"f{i}.png"), img)
    views = ["original", "hflip", "vflip", "scale:1.5"]
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(replay)}],
        publisher={"wait_for_subscribers": 1},
        tta={"views": views},
        batching={"max_batch": 1, "max_wait_ms": 0.0},
    )
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == 3, 10, what="3 verdicts")
        samples = d.metrics.registry.get_sample_value("defectscope_inference_latency_seconds_count")
        assert samples == 3  # one backend call per frame for all 4 views (max_batch = 1 frame)
        b = load_bundle(bundle)
        pre = Preprocessor(b.manifest.input)
        sess = ort.InferenceSession(str(b.artifact_path()), providers=["CPUExecutionProvider"])
        for m in sub.verdicts():
            img = read_image(replay / m["source"])
            base = pre(img)
            tensors = np.stack([base, base[:, :, ::-1], base[:, ::-1, :], pre(img, resize_size=48)])
            per_view = softmax(sess.run(None, {"input": tensors})[0])
            expected = per_view.mean(axis=0)
            assert m["tta_views"] == 4
            got = np.array([m["probabilities"]["ok"], m["probabilities"]["defect"]])
            np.testing.assert_allclose(got, expected, atol=2e-5)
            assert np.ptp(per_view[:, 1]) > 0.01  # the views really differ
    finally:
        sub.close()


def test_adaptive_tta_spends_extra_views_only_near_a_threshold(tmp_path: Path, bundle: Path, start_daemon) -> None:
    import cv2
    import onnxruntime as ort

    from runtime.bundle.load import load_bundle
    from runtime.inference.decision import softmax
    from runtime.inference.preprocess import Preprocessor, read_image

    replay = tmp_path / "replay"
    replay.mkdir()
    # Uniform frames far from the threshold, and centre/border frames whose views disagree near it.
    frames = [(40, 40), (215, 215), (200, 30), (150, 90), (128, 128), (60, 20), (30, 30), (170, 100)]
    for i, (inner, outer) in enumerate(frames):
        img = np.full((48, 48), outer, np.uint8)
        img[12:36, 8:40] = inner
        cv2.imwrite(str(replay / f"f{i}.png"), img)
    views, band = ["original", "hflip", "vflip", "scale:1.5"], 0.2
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(replay)}],
        publisher={"wait_for_subscribers": 1},
        tta={"views": views, "mode": "uncertain", "band": band},
        batching={"max_batch": 4, "max_wait_ms": 50.0},
    )
    b = load_bundle(bundle)
    pre = Preprocessor(b.manifest.input)
    sess = ort.InferenceSession(str(b.artifact_path()), providers=["CPUExecutionProvider"])
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == len(frames), 10, what="all verdicts")
        near_count = 0
        for m in sub.verdicts():
            validate(m)
            img = read_image(replay / m["source"])
            base = pre(img)
            per_view = softmax(
                sess.run(
                    None, {"input": np.stack([base, base[:, :, ::-1], base[:, ::-1, :], pre(img, resize_size=48)])}
                )[0]
            )
            near = abs(per_view[0, 1] - 0.5) < band  # threshold 0.5 (the test bundle's default)
            near_count += near
            expected = per_view.mean(axis=0) if near else per_view[0]
            assert m["tta_views"] == (4 if near else 1), (m["source"], per_view[0])
            got = np.array([m["probabilities"]["ok"], m["probabilities"]["defect"]])
            np.testing.assert_allclose(got, expected, atol=2e-5)
        assert 0 < near_count < len(frames)  # both paths were exercised
        expanded = d.metrics.registry.get_sample_value("defectscope_tta_expanded_frames_total", {"camera": "cam1"})
        assert expanded == near_count
    finally:
        sub.close()


def test_stuck_subscriber_does_not_stall_the_pipeline(tmp_path: Path, bundle: Path, start_daemon) -> None:
    n = 300
    make_images(tmp_path / "replay", (PATTERN * 50)[:n], size=(32, 32))
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay"), "fps": 200.0}],
        # The HWM is per peer: 40 messages (200 ms at this rate) of slack keep the reading subscriber
        # lossless on a loaded machine, and are still far fewer than the n / 2 the stuck one may get.
        publisher={"wait_for_subscribers": 2, "sndhwm": 40, "sndbuf": 4096, "status_interval_s": 0.0},
    )
    # Never reads: tiny receive queue and kernel buffer, so its pipe fills after a few messages.
    stuck = Subscriber(endpoint, rcvhwm=1, rcvbuf=1024)
    good = Subscriber(endpoint)
    stop = threading.Event()
    pump = threading.Thread(target=lambda: [good.pump(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    try:
        d = start_daemon(config)
        pump.start()
        assert d.run() == 0
        assert d.counts["cam1"] == {"captured": n, "published": n, "dropped": 0, "decode_errors": 0}
        deadline = time.monotonic() + 10
        while len(good.verdicts()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        pump.join(5)
        assert [m["seq"] for m in good.verdicts()] == list(range(n))  # the reader lost nothing
        stuck.pump(0.5)
        while stuck.pump(0.2):
            pass
        # The stuck subscriber's messages were dropped at its high-water mark instead of blocking.
        assert len(stuck.verdicts()) < n // 2
    finally:
        stop.set()
        stuck.close()
        good.close()


def test_metrics_and_health_over_http(tmp_path: Path, bundle: Path, start_daemon) -> None:
    make_images(tmp_path / "replay", PATTERN)
    config, endpoint = station_config(
        tmp_path, bundle, [{"id": "cam1", "source": str(tmp_path / "replay"), "loop": True, "fps": 50.0}]
    )
    d = start_daemon(config)
    base = f"http://127.0.0.1:{d.http.port}"
    t, _ = run_in_thread(d)
    deadline = time.monotonic() + 10
    while (code := http_get(base + "/readyz")[0]) != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert code == 200
    while (first := scrape(base + "/metrics")) and metric(
        first, "defectscope_frames_inferred_total", camera="cam1"
    ) == 0:
        assert time.monotonic() < deadline, "no frame inferred"
        time.sleep(0.05)
    time.sleep(0.5)
    second = scrape(base + "/metrics")
    for name in ("defectscope_frames_captured_total", "defectscope_frames_inferred_total"):
        assert metric(second, name, camera="cam1") > metric(first, name, camera="cam1") > 0
    verdicts = sum(
        metric(second, "defectscope_verdicts_total", camera="cam1", verdict=v) for v in ("ok", "defect", "uncertain")
    )
    assert verdicts == pytest.approx(metric(second, "defectscope_frames_inferred_total", camera="cam1"), abs=2)
    assert metric(second, "defectscope_defects_total", camera="cam1", **{"class": "defect"}) > 0
    assert metric(second, "defectscope_camera_up", camera="cam1") == 1
    assert (
        metric(
            second,
            "defectscope_model_info",
            name="tiny",
            version="1.0.0",
            precision="fp32",
            inference_precision="f32",
            backend="onnxruntime-cpu",
        )
        == 1
    )
    assert metric(second, "defectscope_inference_latency_seconds_count") > 0
    assert metric(second, "defectscope_end_to_end_latency_seconds_count", camera="cam1") > 0
    assert metric(second, "defectscope_last_frame_timestamp_seconds", camera="cam1") > time.time() - 60
    assert ("defectscope_queue_depth", (("camera", "cam1"),)) in second
    assert metric(second, "defectscope_publish_errors_total") == 0
    assert metric(second, "process_start_time_seconds") > 0
    status, body = http_get(base + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True
    assert {k: ready["model"][k] for k in ("name", "version", "precision", "artifact", "backend")} == {
        "name": "tiny",
        "version": "1.0.0",
        "precision": "fp32",
        "artifact": "fp32",
        "backend": "onnxruntime-cpu",
    }
    assert ready["model"]["inference_precision"] == "f32"
    assert ready["model"]["selection"]["backend"] == "onnxruntime-cpu"  # why this backend serves
    assert ready["model"]["backend_reason"].startswith("onnxruntime-cpu")
    assert ready["cameras"]["cam1"]["up"] is True and ready["cameras"]["cam1"]["last_frame_age_s"] < 3
    assert http_get(base + "/healthz")[0] == 200
    assert http_get(base + "/nope")[0] == 404
    d.request_stop()
    t.join(20)
    assert not t.is_alive()


def test_snapshots_of_defect_and_uncertain_frames(tmp_path: Path, bundle: Path, start_daemon) -> None:
    make_images(tmp_path / "replay", PATTERN)
    spool = tmp_path / "spool"
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        publisher={"wait_for_subscribers": 1},
        snapshots={"enabled": True, "dir": str(spool), "quota_mb": 10.0},
    )
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == len(PATTERN), 10, what="verdicts")
        for m in sub.verdicts():
            if m["verdict"] == "ok":
                assert m["snapshot"] is None
                continue
            jpg = Path(m["snapshot"])
            assert jpg.parent == spool and jpg.is_file()
            sidecar = json.loads(jpg.with_suffix(".json").read_text())
            assert sidecar["seq"] == m["seq"] and sidecar["verdict"] == m["verdict"]
            assert sidecar["probabilities"] == m["probabilities"]
            import cv2

            img = cv2.imread(str(jpg), cv2.IMREAD_GRAYSCALE)
            assert abs(float(img.mean()) - brightness(m["verdict"])) < 10
        assert len(list(spool.glob("*.jpg"))) == sum(v != "ok" for v in PATTERN)
    finally:
        sub.close()


def test_snapshot_spool_quota_removes_oldest_first(tmp_path: Path) -> None:
    from runtime.config.station import SnapshotConfig
    from runtime.serving.snapshots import SnapshotSpool

    results: list[str] = []
    cfg = SnapshotConfig(enabled=True, dir=tmp_path / "spool", quota_mb=0.02, queue_size=64)  # ~20 KB
    spool = SnapshotSpool(cfg, results.append)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        img = rng.integers(0, 255, (64, 64), dtype=np.uint8)  # noise: ~4-5 KB as JPEG
        p = spool.path_for("st", "cam", i, "defect", 1_700_000_000.0 + i)
        assert spool.submit(p, img, {"seq": i})
        paths.append(p)
    spool.close()
    assert results.count("saved") == 12
    remaining = sorted(tmp_path.joinpath("spool").glob("*.jpg"))
    assert 0 < len(remaining) < 12
    assert remaining == paths[-len(remaining) :]  # the newest survive
    total = sum(f.stat().st_size for f in tmp_path.joinpath("spool").iterdir())
    assert total <= cfg.quota_mb * 1024 * 1024
    for p in remaining:
        assert json.loads(p.with_suffix(".json").read_text())["seq"] == paths.index(p)
    # A restarted spool sees the existing files and keeps enforcing the quota.
    again = SnapshotSpool(cfg)
    assert again.total == total
    again.close()


def test_msgpack_format(tmp_path: Path, bundle: Path, start_daemon) -> None:
    pytest.importorskip("msgpack")
    make_images(tmp_path / "replay", PATTERN[:3])
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        publisher={"wait_for_subscribers": 1, "format": "msgpack"},
    )
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == 3, 10, what="verdicts")
        for m in sub.verdicts():
            validate(m)
        assert [m["verdict"] for m in sub.verdicts()] == PATTERN[:3]
    finally:
        sub.close()


def test_readiness_reports_not_ready_before_frames(tmp_path: Path, bundle: Path) -> None:
    make_images(tmp_path / "replay", PATTERN[:2])
    config, _ = station_config(tmp_path, bundle, [{"id": "cam1", "source": str(tmp_path / "replay")}])
    d = Daemon(load_config(config))
    ready, body = d.readiness()
    assert ready is False and body["model"] is None
    assert body["cameras"] == {"cam1": {"up": False, "last_frame_age_s": None}}
    assert body["last_reload"] == {"result": None, "error": None, "version": None, "at": None}


def _bad_files(directory: Path) -> None:
    good = directory / "frame_00000.png"
    (directory / "frame_00001_truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (directory / "frame_00002_empty.png").write_bytes(b"")
    (directory / "frame_00003_text.png").write_bytes(b"this is not an image\n" * 10)


def test_decode_errors_are_counted_in_metrics_and_status_and_logged_once(
    tmp_path: Path, bundle: Path, start_daemon, caplog
) -> None:
    """Fault: truncated, zero-byte and non-image files in a looping replay. Before the fix they
    were skipped silently in the metrics and logged once per file per loop."""
    import logging

    replay = tmp_path / "replay"
    make_images(replay, ["ok"])
    _bad_files(replay)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(replay), "loop": True, "fps": 100.0}],
        publisher={"status_interval_s": 0.1, "wait_for_subscribers": 1},
    )
    sub = Subscriber(endpoint)
    caplog.set_level(logging.WARNING, logger="defectscope.sources")
    try:
        d = start_daemon(config)
        t, _ = run_in_thread(d)
        base = f"http://127.0.0.1:{d.http.port}"
        deadline = time.monotonic() + 15
        while (
            metric(scrape(base + "/metrics"), "defectscope_frames_dropped_total", camera="cam1", reason="decode_error")
            < 9
        ):  # three passes over the three bad files
            assert time.monotonic() < deadline, "decode errors not counted"
            sub.pump(0.1)
        sub.until(
            lambda s: any(m["cameras"]["cam1"].get("decode_errors", 0) >= 9 for m in s.statuses()),
            10,
            what="decode errors in the status heartbeat",
        )
        d.request_stop()
        t.join(20)
        status = [m for m in sub.statuses() if m["cameras"]["cam1"].get("decode_errors", 0) >= 9][-1]
        validate(status)
        assert status["cameras"]["cam1"]["dropped"] >= status["cameras"]["cam1"]["decode_errors"]
        assert len(sub.verdicts()) >= 3 and {m["source"] for m in sub.verdicts()} == {"frame_00000.png"}
        skips = [r for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(skips) == 1, [r.getMessage() for r in skips]  # once per source, rate-limited
    finally:
        sub.close()


def test_frames_below_the_minimum_side_are_rejected_not_judged(tmp_path: Path, bundle: Path, start_daemon) -> None:
    """Fault: a 1x1 image got a verdict. The tiny model's input is 32 px: the default minimum is 8."""
    import cv2

    replay = tmp_path / "replay"
    replay.mkdir()
    for i, side in enumerate([1, 4, 7, 8, 40]):
        cv2.imwrite(str(replay / f"f{i}_{side}px.png"), np.full((side, side), 215, np.uint8))
    config, endpoint = station_config(
        tmp_path, bundle, [{"id": "cam1", "source": str(replay)}], publisher={"wait_for_subscribers": 1}
    )
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.model.min_frame_side == 8
        assert d.run() == 0
        sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        assert [m["source"] for m in sub.verdicts()] == ["f3_8px.png", "f4_40px.png"]
        too_small = d.metrics.registry.get_sample_value(
            "defectscope_frames_dropped_total", {"camera": "cam1", "reason": "too_small"}
        )
        assert too_small == 3
    finally:
        sub.close()


def test_min_frame_side_is_configurable(tmp_path: Path, bundle: Path) -> None:
    from runtime.inference.model import load_model

    replay = tmp_path / "replay"
    make_images(replay, ["ok"])
    config, _ = station_config(tmp_path, bundle, [{"id": "cam1", "source": str(replay)}], model={"min_frame_side": 2})
    model = load_model(load_config(config))
    try:
        assert model.min_frame_side == 2
    finally:
        model.close()


def test_an_idle_engine_takes_a_frame_without_waiting_for_a_batch(tmp_path: Path, bundle: Path, start_daemon) -> None:
    """Low load (a trigger-driven line): a frame must not wait max_wait_ms for company while the
    engine is idle. Before, each frame here waited the whole 300 ms."""
    make_images(tmp_path / "replay", ["ok"] * 6)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay"), "fps": 5.0}],
        publisher={"wait_for_subscribers": 1},
        batching={"max_batch": 8, "max_wait_ms": 300.0},
    )
    sub = Subscriber(endpoint)
    try:
        d = start_daemon(config)
        assert d.run() == 0
        sub.until(lambda s: len(s.verdicts()) == 6, 10, what="6 verdicts")
        queued = sorted(m["latency_ms"]["queue"] for m in sub.verdicts())
        assert queued[len(queued) // 2] < 50.0 and queued[-1] < 150.0, queued
    finally:
        sub.close()


def test_preview_frames_on_their_own_topic(tmp_path: Path, bundle: Path, start_daemon) -> None:
    """[preview] on: the daemon publishes rate-capped JPEGs that verdict subscribers never see."""
    from runtime.serving.preview import decode_preview

    make_images(tmp_path / "replay", PATTERN * 2)
    config, endpoint = station_config(
        tmp_path,
        bundle,
        [{"id": "cam1", "source": str(tmp_path / "replay")}],
        publisher={"wait_for_subscribers": 2, "wait_timeout_s": 10.0},
        preview={"enabled": True, "max_fps": 30.0, "max_width": 32},
    )
    verdict_sub, preview_sub = Subscriber(endpoint, topic="st1."), Subscriber(endpoint, topic="_preview.")
    try:
        d = start_daemon(config)
        assert d.run() == 0
        verdict_sub.until(lambda s: any(m["state"] == "stopped" for m in s.statuses()), 10, what="final status")
        preview_sub.until(lambda s: len(s.messages) >= 1, 10, what="a preview")
        assert all(m["type"] != "preview" for _, m in verdict_sub.messages)
        topic, msg = preview_sub.messages[0]
        assert topic == "_preview.st1.cam1"
        import cv2

        image = cv2.imdecode(np.frombuffer(decode_preview(msg), np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[1] <= 32 and msg["camera"] == "cam1"
    finally:
        verdict_sub.close()
        preview_sub.close()
