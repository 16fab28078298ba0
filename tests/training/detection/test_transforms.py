"""Box-aware augmentation: every geometric transform moves the box exactly as it moves the pixels."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from training.data import DataError  # noqa: E402
from training.detection.transforms import AugmentSpec, RandomRot90, train_transform  # noqa: E402


def _scene(h: int = 40, w: int = 40):
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[:, 5:12, 3:20] = 255  # box [3, 5, 20, 12]
    boxes = tv_tensors.BoundingBoxes([[3, 5, 20, 12]], format="XYXY", canvas_size=(h, w), dtype=torch.float32)
    return tv_tensors.Image(img), {"boxes": boxes, "labels": torch.tensor([1])}


def _bright_box(img: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(img[0] > 127, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("t", [v2.RandomHorizontalFlip(1.0), v2.RandomVerticalFlip(1.0)], ids=["hflip", "vflip"])
def test_flipped_box_is_the_box_of_the_flipped_image(t):
    img, target = _scene(30, 50)
    out, tgt = t(img, target)
    assert tgt["boxes"][0].tolist() == _bright_box(out)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quarter_turns_exact_on_non_square_canvas(k, monkeypatch):
    img, target = _scene(30, 50)
    t = RandomRot90()
    monkeypatch.setattr(t, "make_params", lambda flat: {"k": k})
    out, tgt = t(img, target)
    assert tgt["boxes"][0].tolist() == _bright_box(out)
    assert tgt["boxes"].canvas_size == tuple(out.shape[-2:]) == ((50, 30) if k % 2 else (30, 50))
    assert torch.equal(out, torch.rot90(img, k, dims=(-2, -1)))


def test_train_transform_keeps_boxes_on_their_pixels():
    torch.manual_seed(0)
    aug = AugmentSpec(rot90=True, scale=(0.9, 1.1), brightness=0.3, contrast=0.3)
    t = train_transform(aug, square=True)
    for _ in range(20):
        img, target = _scene()
        out, tgt = t(img, target)
        assert out.dtype == torch.float32 and out.shape == (3, 40, 40)
        if len(tgt["boxes"]):
            # Bilinear zoom smears the edge by < 1 px; photometric jitter never moves it.
            mask = out[0] > out[0].max() * 0.6
            ys, xs = torch.nonzero(mask, as_tuple=True)
            np.testing.assert_allclose(
                tgt["boxes"][0].tolist(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5
            )
            assert tgt["labels"].tolist() == [1]


def test_zoom_that_cuts_a_box_away_drops_it_and_its_label():
    img = torch.zeros(3, 40, 40, dtype=torch.uint8)
    img[:, 0:3, 0:3] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes([[0, 0, 3, 3]], format="XYXY", canvas_size=(40, 40)),
        "labels": torch.tensor([2]),
    }
    t = train_transform(AugmentSpec(hflip=0, vflip=0, brightness=0, contrast=0, scale=(2.0, 2.0)))
    _, tgt = t(tv_tensors.Image(img), target)
    assert len(tgt["boxes"]) == 0 and len(tgt["labels"]) == 0


def test_augment_spec_validation():
    with pytest.raises(DataError, match="augment.hflip"):
        AugmentSpec(hflip=2)
    with pytest.raises(DataError, match="augment.scale"):
        AugmentSpec(scale=(1.2, 0.8))
    with pytest.raises(DataError, match="square"):
        train_transform(AugmentSpec(rot90=True), square=False)
    with pytest.raises(DataError, match="unknown"):
        AugmentSpec.from_dict({"rotate": 1})
    assert AugmentSpec.from_dict(AugmentSpec().to_dict()) == AugmentSpec()


def test_dataset_with_train_transform_feeds_the_detector(coco_dir):
    from training.detection.datasets import resolve_detection
    from training.detection.loader import DetectionDataset, collate
    from training.detection.model import DetectorSpec, build_detector

    torch.manual_seed(0)
    s = resolve_detection({"path": str(coco_dir / "train.json")})
    ds = DetectionDataset(s.train, (64, 64), transform=train_transform(AugmentSpec(rot90=True)))
    images, targets = collate([ds[i] for i in range(4)])
    for img, t in zip(images, targets):
        assert img.shape == (3, 64, 64) and len(t["boxes"]) == len(t["labels"])
        if len(t["boxes"]):  # the augmented box still holds the bright square (letterbox + flips + zoom)
            x0, y0, x1, y1 = (int(round(v)) for v in t["boxes"][0].tolist())
            patch = img[0, y0:y1, x0:x1]
            assert patch.numel() and patch.mean() > 0.5
    model = build_detector(
        DetectorSpec(
            classes=tuple(s.classes),
            backbone="tiny_det",
            weights="none",
            image_size=(64, 64),
            fpn_channels=16,
            representation_size=32,
        )
    )
    losses = model.train()(images, targets)  # the full targets (with geometry) are accepted
    assert all(torch.isfinite(v) for v in losses.values())
