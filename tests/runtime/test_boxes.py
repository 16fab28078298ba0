"""runtime.inference.boxes: letterbox/stretch geometry both ways, flip-TTA merge (hand-checked), part verdict on boxes."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.inference.boxes import BoxError, BoxPolicy, box_iou, fit, geometry, unflip_boxes, weighted_box_fusion


def _bright_box(img: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(img > 127)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_letterbox_pads_centred_and_boxes_follow_pixels():
    img = np.zeros((100, 200), np.uint8)
    img[20:40, 50:90] = 255  # box [50,20,90,40]
    out, g = fit(img, 64, 64, "letterbox")
    assert out.shape == (64, 64)
    assert (g.scale_x, g.scale_y) == (0.32, 0.32) and (g.pad_x, g.pad_y) == (0.0, 16.0)
    assert out[:16].max() == 0 and out[48:].max() == 0  # pads top and bottom
    model_box = g.to_model([[50, 20, 90, 40]])[0]
    np.testing.assert_allclose(model_box, [16, 22.4, 28.8, 28.8], atol=1e-5)
    # The box of the bright pixels in the model image agrees to within a resampled pixel.
    np.testing.assert_allclose(_bright_box(out), model_box, atol=1.0)
    np.testing.assert_allclose(g.to_original(model_box[None])[0], [50, 20, 90, 40], atol=1e-4)


def test_letterbox_portrait_and_stretch_roundtrip():
    g = geometry(300, 150, 320, 320, "letterbox")
    assert g.pad_x == 80.0 and g.pad_y == 0.0 and g.scale_x == pytest.approx(320 / 300)
    s = geometry(300, 150, 320, 320, "stretch")
    assert (s.scale_x, s.scale_y, s.pad_x) == (320 / 150, 320 / 300, 0.0)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 140, (20, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 10, (20, 2))], 1).astype(np.float32)
    for geo in (g, s):
        np.testing.assert_allclose(geo.to_original(geo.to_model(boxes)), boxes, atol=1e-3)


def test_to_original_clips_boxes_reaching_into_the_pad():
    g = geometry(100, 200, 64, 64)
    out = g.to_original([[-5, 10, 70, 60]])[0]
    assert out.tolist() == [0, 0, 200, 100]


def test_color_letterbox_and_bad_policy():
    img = np.full((10, 20, 3), 200, np.uint8)
    out, g = fit(img, 16, 16, pad_value=114)
    assert out.shape == (16, 16, 3) and out[0, 0].tolist() == [114] * 3 and out[8, 8].tolist() == [200] * 3
    with pytest.raises(BoxError, match="resize_policy"):
        geometry(10, 10, 5, 5, "shorter_side_center_crop")


def test_unflip_returns_the_box_of_the_unflipped_image():
    img = np.zeros((30, 50), np.uint8)
    img[5:12, 3:20] = 255
    for view, flipped in (("hflip", img[:, ::-1]), ("vflip", img[::-1]), ("rot180", img[::-1, ::-1])):
        back = unflip_boxes([_bright_box(flipped)], 50, 30, view)[0]
        assert back.tolist() == [3, 5, 20, 12], view
    with pytest.raises(BoxError, match="tta.views"):
        unflip_boxes([[0, 0, 1, 1]], 5, 5, "rot90")


def test_iou_by_hand():
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(50 / 150)
    assert box_iou([[0, 0, 10, 10]], [[20, 20, 30, 30]])[0, 0] == 0.0


def test_wbf_hand_checked():
    # View 1 and 2 see the same defect shifted by 2 px (IoU 0.67 > 0.55), weights 0.9 / 0.6:
    # fused x0 = (0*0.9 + 2*0.6) / 1.5 = 0.8; score = mean(0.9, 0.6) * 2/2 = 0.75.
    # View 1 alone sees a second box (class 2): score 0.4 * 1/2 = 0.2.
    # A class-2 box in view 2 on top of the class-1 box is not merged across classes.
    v1 = ([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.4], [1, 2])
    v2 = ([[2, 0, 12, 10], [0, 0, 10, 10]], [0.6, 0.3], [1, 2])
    boxes, scores, labels = weighted_box_fusion([v1, v2], iou_thr=0.55)
    assert labels.tolist() == [1, 2, 2]
    np.testing.assert_allclose(scores, [0.75, 0.2, 0.15], atol=1e-6)
    np.testing.assert_allclose(boxes[0], [0.8, 0, 10.8, 10], atol=1e-5)
    np.testing.assert_allclose(boxes[1], [50, 50, 60, 60])


def test_wbf_apart_boxes_stay_apart_and_empty_views():
    v1 = ([[0, 0, 10, 10]], [0.8], [1])
    v2 = ([[6, 0, 16, 10]], [0.8], [1])  # IoU 4/16 = 0.25: separate
    boxes, scores, _ = weighted_box_fusion([v1, v2])
    assert len(boxes) == 2 and np.allclose(scores, 0.4)
    b, s, lab = weighted_box_fusion([(np.zeros((0, 4)), [], []), (np.zeros((0, 4)), [], [])])
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)
    b, s, _ = weighted_box_fusion([v1], skip_thr=0.9)
    assert len(b) == 0


CLASSES = ("ok", "crack", "spot")


def test_policy_defect_uncertain_ok_and_min_area():
    p = BoxPolicy(default_threshold=0.5, thresholds={"spot": 0.8}, min_area=20, band=0.1)
    crack = [[0, 0, 10, 10]]
    assert p.decide(crack, [0.65], [1], CLASSES).verdict == "defect"
    v = p.decide(crack, [0.55], [1], CLASSES)
    assert (v.verdict, v.defect_class, v.confidence) == ("uncertain", "crack", pytest.approx(0.55))
    assert v.boxes[0]["status"] == "uncertain"
    v = p.decide(crack, [0.3], [1], CLASSES)
    assert (v.verdict, v.confidence, v.boxes) == ("ok", pytest.approx(0.7), ())
    # 0.75 is a defect for crack (t=0.5) but only uncertain for spot (t=0.8).
    assert p.decide(crack, [0.75], [2], CLASSES).verdict == "uncertain"
    # A 4x4 box is below min_area 20: not counted, even at score 0.99.
    assert p.decide([[0, 0, 4, 4]], [0.99], [1], CLASSES).verdict == "ok"
    # A clear defect wins over an uncertain box with a bigger score elsewhere.
    v = p.decide([[0, 0, 10, 10], [20, 20, 30, 30]], [0.85, 0.7], [2, 1], CLASSES)
    assert (v.verdict, v.defect_class) == ("defect", "crack") and len(v.boxes) == 2
    assert p.decide(np.zeros((0, 4)), [], [], CLASSES).verdict == "ok"


def test_policy_validation():
    with pytest.raises(BoxError, match="thresholds.crack"):
        BoxPolicy(thresholds={"crack": 1.5})
    with pytest.raises(BoxError, match="min_area"):
        BoxPolicy(min_area=-1)
    with pytest.raises(BoxError, match="uncertain_band"):
        BoxPolicy(band=0.7)
    with pytest.raises(BoxError, match=r"\['crak'\]"):
        BoxPolicy(thresholds={"crak": 0.3}).check_classes(CLASSES)
    with pytest.raises(BoxError, match="shape"):
        BoxPolicy().decide([[1, 2, 3]], [0.9], [1], CLASSES)


def test_forged_model_outputs_are_never_counted():
    """A tampered or broken model: NaN/inf scores and boxes, labels outside the class list, inverted boxes."""
    p = BoxPolicy(default_threshold=0.5, min_area=1)
    boxes = [[0, 0, 10, 10], [0, 0, np.inf, 10], [0, 0, 10, 10], [0, 0, 10, 10], [10, 10, 0, 0]]
    v = p.decide(boxes, [np.nan, 0.9, 0.9, 0.9, 0.9], [1, 1, 7, -1, 1], CLASSES)
    assert (v.verdict, v.boxes) == ("ok", ())
    b, s, _ = weighted_box_fusion([([[0, 0, 5, 5], [np.nan, 0, 5, 5]], [np.nan, 0.9], [1, 1])])
    assert len(b) == 0


def test_imports_without_torch_training_or_calibration():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision', 'training', 'calibration'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, runtime.inference.boxes as b\n"
        "img, g = b.fit(np.zeros((10, 20), np.uint8), 16, 16)\n"
        "print(g.to_original([[0, 4, 16, 12]]).tolist())\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[0.0, 0.0, 20.0, 10.0]]"
