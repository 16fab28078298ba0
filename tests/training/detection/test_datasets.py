"""Detection datasets: COCO / VOC (NEU-DET layout) / YOLO readers, their bad-annotation reports, splits, items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.training.detection.conftest import squares_image, voc_xml
from training.data import DataError
from training.detection.datasets import DetectionSpec, infer_format, resolve_detection

cv2 = pytest.importorskip("cv2")


def _bright_box(img: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(img > 127)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_coco_reads_val_beside_train_and_carves_test(coco_dir):
    s = resolve_detection({"path": str(coco_dir / "train.json"), "test_fraction": 0.25, "seed": 3})
    assert s.format == "coco" and s.classes == ["square", "bar"] and s.given == ("train", "val")
    assert len(s.val) == 4 and len(s.train) + len(s.test) == 12 and len(s.test) == 3
    assert sum(x.negative for x in s.train + s.test) == 2 and not s.report.problems
    for x in s.train[:3]:
        img = cv2.imread(x.path, cv2.IMREAD_GRAYSCALE)
        for x0, y0, x1, y1 in x.boxes:  # every box holds exactly the bright square
            assert img[int(y0) : int(y1), int(x0) : int(x1)].min() == 220
    again = resolve_detection({"path": str(coco_dir / "train.json"), "test_fraction": 0.25, "seed": 3})
    assert [x.path for x in again.test] == [x.path for x in s.test]  # seeded
    assert json.dumps(s.summary())  # JSON-safe


def test_coco_bad_annotations_reported_skipped_counted_and_fatal_when_strict(coco_dir):
    path = coco_dir / "train.json"
    data = json.loads(path.read_text())
    img3 = data["images"][3]
    data["images"].append({"id": 99, "file_name": "images/gone.png", "width": 64, "height": 48})
    data["annotations"] += [
        {"id": 501, "image_id": img3["id"], "category_id": 1, "bbox": [50, 40, 30, 20]},  # outside 64x48
        {"id": 502, "image_id": img3["id"], "category_id": 1, "bbox": [5, 5, 0, 9]},  # zero area
        {"id": 503, "image_id": img3["id"], "category_id": 7, "bbox": [5, 5, 4, 4]},  # unknown category
        {"id": 504, "image_id": 99, "category_id": 1, "bbox": [1, 1, 4, 4]},  # its image is missing
        {"id": 505, "image_id": img3["id"], "category_id": 1, "bbox": [-0.5, 0, 10, 48.4]},  # clipped, kept
    ]
    path.write_text(json.dumps(data))
    s = resolve_detection({"path": str(path)})
    by_id = {p.ann_id: p for p in s.report.problems}
    assert by_id["501"].reason.startswith("box outside image") and by_id["501"].file == str(path)
    assert by_id["502"].reason.startswith("zero area")
    assert by_id["503"].reason.startswith("unknown category")
    assert by_id["image 99"].reason.startswith("missing image")
    assert "504" not in by_id and "505" not in by_id
    assert s.report.counts() == {"box outside image": 1, "zero area": 1, "unknown category": 1, "missing image": 1}
    kept = next(x for x in s.train + s.val + s.test if x.path.endswith("train_3.png"))
    assert (0.0, 0.0, 9.5, 48.0) in kept.boxes
    with pytest.raises(DataError, match=r"(?s)4 bad annotation\(s\).*\[501\]: box outside image"):
        resolve_detection({"path": str(path), "strict": True})


def test_coco_val_with_other_categories_is_refused(coco_dir):
    val = json.loads((coco_dir / "val.json").read_text())
    val["categories"][1]["name"] = "blob"
    (coco_dir / "val.json").write_text(json.dumps(val))
    with pytest.raises(DataError, match=r"val.json: categories \['square', 'blob'\] differ"):
        resolve_detection({"path": str(coco_dir / "train.json")})


def test_neu_det_layout_loads_unchanged(neu_det):
    assert infer_format(neu_det) == "voc"
    s = resolve_detection(DetectionSpec(path=str(neu_det), test_fraction=0.3))
    assert s.classes == ["crazing", "inclusion", "patches"] and s.given == ("train", "val")
    assert len(s.val) == 3 and len(s.train) + len(s.test) == 6 and not s.report.problems
    for x in s.train + s.val + s.test:
        img = cv2.imread(x.path, cv2.IMREAD_GRAYSCALE)
        assert (x.width, x.height) == (200, 200) and Path(x.source).parent.name == "annotations"
        for box in x.boxes:  # 1-based inclusive VOC -> the exact pixel-edge box of the square
            x0, y0, x1, y1 = (int(v) for v in box)
            assert img[y0:y1, x0:x1].min() > 150
            assert _bright_box(img[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1]) == [
                x0 - max(0, x0 - 1),
                y0 - max(0, y0 - 1),
                x1 - max(0, x0 - 1),
                y1 - max(0, y0 - 1),
            ]


def test_voc_problems_negatives_and_missing_extension(neu_det):
    ann = neu_det / "train" / "annotations"
    img = neu_det / "train" / "images" / "crazing"
    cv2.imwrite(str(img / "crazing_50.jpg"), np.zeros((200, 200), np.uint8))
    (ann / "crazing_50.xml").write_text(voc_xml("crazing_50", "cr", 200, 200, []))  # no extension, no objects
    (ann / "crazing_51.xml").write_text(voc_xml("crazing_51.jpg", "cr", 200, 200, [("crazing", [1, 1, 9, 9])]))
    cv2.imwrite(str(img / "crazing_52.jpg"), np.zeros((200, 200), np.uint8))
    (ann / "crazing_52.xml").write_text(
        voc_xml(
            "crazing_52.jpg",
            "cr",
            200,
            200,
            [("crazing", [150, 150, 260, 190]), ("crazing", [10, 10, 10, 30]), ("crazing", [5, 5, 50, 50])],
        )
    )
    (neu_det / "validation" / "annotations" / "inclusion_101.xml").write_text(
        voc_xml("inclusion_101.jpg", "in", 200, 200, [("scratches", [2, 2, 30, 30])])
    )
    s = resolve_detection({"path": str(neu_det)})
    probs = {(Path(p.file).name, p.ann_id): p.reason.split(":")[0] for p in s.report.problems}
    assert probs == {
        ("crazing_51.xml", "-"): "missing image",
        ("crazing_52.xml", "object 0"): "box outside image",
        ("crazing_52.xml", "object 1"): "zero area",
        ("inclusion_101.xml", "object 0"): "unknown category",
    }
    every = {Path(x.path).name: x for x in s.train + s.val + s.test}
    assert every["crazing_50.jpg"].negative
    assert every["crazing_52.jpg"].boxes == ((5.0, 5.0, 50.0, 50.0),)
    assert every["inclusion_101.jpg"].negative  # its only box was skipped: the image stays, as a negative
    with pytest.raises(DataError, match="crazing_51.xml"):
        resolve_detection({"path": str(neu_det), "strict": True})


def test_yolo_folder(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "yolo"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(3):
            img, boxes = squares_image(rng, (40, 80), i)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            if i:
                (root / "labels" / split / f"{i}.txt").write_text(
                    "".join(
                        f"{j % 2} {(b[0] + b[2]) / 160} {(b[1] + b[3]) / 80} {(b[2] - b[0]) / 80} {(b[3] - b[1]) / 40}\n"
                        for j, b in enumerate(boxes)
                    )
                )
    (root / "labels" / "val" / "2.txt").write_text("0 0.5 0.5 0.1\n5 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.2 0.2\n")
    (root / "classes.txt").write_text("square\nbar\n")
    s = resolve_detection({"path": str(root)})
    assert s.format == "yolo" and s.classes == ["square", "bar"] and s.given == ("train", "val")
    assert [x.negative for x in s.train + s.test].count(True) == 1
    x = next(x for x in s.train + s.test if Path(x.path).name == "2.png")
    img = cv2.imread(x.path, cv2.IMREAD_GRAYSCALE)
    for box in x.boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        np.testing.assert_allclose(box, [x0, y0, x1, y1], atol=1e-4)
        assert img[y0:y1, x0:x1].min() == 220
        assert img[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1].size > (y1 - y0) * (x1 - x0)
    reasons = sorted(p.reason.split(":")[0] for p in s.report.problems)
    assert reasons == ["malformed", "unknown category"]
    assert {p.ann_id for p in s.report.problems} == {"line 1", "line 2"}


def test_unknown_layout_and_bad_spec(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot tell the detection format"):
        resolve_detection({"path": str(tmp_path / "empty")})
    with pytest.raises(DataError, match="data.format"):
        DetectionSpec(path="x", format="pascal")
    with pytest.raises(DataError, match=r"unknown key\(s\) \['split'\]"):
        DetectionSpec.from_dict({"path": "x", "split": 1})


def test_dataset_items_are_torchvision_targets(coco_dir):
    torch = pytest.importorskip("torch")
    from torchvision import tv_tensors

    from training.detection.loader import DetectionDataset, collate

    s = resolve_detection({"path": str(coco_dir / "train.json")})
    ds = DetectionDataset(s.train, (32, 32))
    img, t = ds[next(i for i, x in enumerate(s.train) if not x.negative)]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert isinstance(t["boxes"], tv_tensors.BoundingBoxes) and t["boxes"].canvas_size == (32, 32)
    assert t["labels"].dtype == torch.int64 and t["labels"].min() >= 1 and t["orig_size"] == (48, 64)
    np.testing.assert_allclose(
        t["geometry"].to_original(t["boxes"].numpy()), s.train[t["image_id"]].boxes_array(), atol=1e-3
    )
    neg = ds[next(i for i, x in enumerate(s.train) if x.negative)][1]
    assert neg["boxes"].shape == (0, 4) and neg["labels"].shape == (0,)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2


def test_check_command_on_neu_det(neu_det, capsys):
    from training.detection.datasets import main

    assert main([str(neu_det)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "voc" and out["val"]["images"] == 3 and out["bad_annotations"]["skipped"] == 0
    (neu_det / "train" / "annotations" / "crazing_9.xml").write_text("<annotation><filename>nope.jpg</filename>")
    assert main([str(neu_det), "--strict"]) == 2
    assert "crazing_9.xml" in capsys.readouterr().err


def test_gc10_det_layout(tmp_path):
    """GC10-DET: XMLs in lable/ (sic), images in per-class folders 1/..10/, class names like '1_chongkong'."""
    rng = np.random.default_rng(4)
    root = tmp_path / "GC10-DET"
    (root / "lable").mkdir(parents=True)
    for k, cls in ((1, "1_chongkong"), (2, "2_hanfeng")):
        (root / str(k)).mkdir()
        for i in range(3):
            stem = f"img_0{k}_42538290{i}_0000{i}"
            img, boxes = squares_image(rng, (50, 100), 1)
            cv2.imwrite(str(root / str(k) / f"{stem}.jpg"), img)
            (root / "lable" / f"{stem}.xml").write_text(voc_xml(f"{stem}.jpg", str(k), 100, 50, [(cls, boxes[0])]))
    s = resolve_detection({"path": str(root), "test_fraction": 0.34})
    assert s.classes == ["1_chongkong", "2_hanfeng"] and not s.report.problems
    assert len(s.train) + len(s.val) + len(s.test) == 6 and len(s.test) == 2
