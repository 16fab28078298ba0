"""runtime.inference.preprocess (used by calibration, evaluation, the daemon) vs training's validation transform.

The reference is the training side's own pipeline (``training.classification.transforms.val_transform`` on
``training.classification.transforms.to_chw_uint8(read_image(path))``), applied to image files on disk.
Tolerances are in normalised units (value / std); 0.015 mean is ~0.9 gray levels at std 0.229.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")


def _reference(path: str, spec) -> np.ndarray:
    from runtime.inference.preprocess import read_image
    from training.classification.transforms import to_chw_uint8, val_transform

    return val_transform(spec)(to_chw_uint8(read_image(path))).numpy()


def _textured(h, w, channels, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 10, 2), max(w // 10, 2), channels), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return img if img.ndim == 2 or channels == 3 else img[:, :, 0]


@pytest.mark.parametrize(
    "shape, channels, spec_kw",
    [
        ((300, 300), 1, dict(height=224, width=224, resize_size=256, interpolation="bicubic")),  # ELPV-like
        ((240, 320), 3, dict(height=224, width=224, resize_size=256, interpolation="bilinear")),
        ((40, 40), 1, dict(height=32, width=32, resize_size=32, interpolation="bilinear")),
        ((120, 90), 3, dict(height=64, width=64, resize_size=72, interpolation="bilinear")),
    ],
)
def test_runtime_preprocessing_matches_training_validation_transform(tmp_path, shape, channels, spec_kw):
    from runtime.inference.preprocess import InputSpec, Preprocessor

    spec = InputSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), **spec_kw)
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), _textured(*shape, channels, seed=sum(shape)))
    ours = Preprocessor(spec).load(path)
    ref = _reference(str(path), spec)
    assert ours.shape == ref.shape == spec.shape and ours.dtype == np.float32
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.015, diff.mean()
    assert np.percentile(diff, 99) < 0.06, np.percentile(diff, 99)


def test_same_predictions_through_either_preprocessing(run_dir, splits):
    """What matters downstream: the trained model decides the same on both paths."""
    from calibration.export import torch_logits
    from runtime.inference.preprocess import Preprocessor
    from training.checkpoint import load_model

    model, card = load_model(run_dir)
    spec = card.input
    paths = [s.path for s in splits.test]
    ours = Preprocessor(spec).load_batch(paths)
    ref = np.stack([_reference(p, spec) for p in paths])
    a, b = torch_logits(model, ours), torch_logits(model, ref)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.98
    assert np.abs(a - b).max() < 0.25 * (np.abs(b).max() + 1e-6)


def _elpv_images(n: int) -> list[str]:
    try:
        from training.data import elpv_root

        root = Path(elpv_root())
    except Exception:
        return []
    return sorted(str(p) for p in (root / "images").glob("*.png"))[:n] if (root / "images").is_dir() else []


def test_real_elpv_images_match(tmp_path):
    """Real 300x300 gray EL images (when the elpv-dataset package is installed)."""
    from runtime.inference.preprocess import Preprocessor
    from training.backbones import get_spec

    paths = _elpv_images(4)
    if not paths:
        pytest.skip("elpv-dataset images not installed")
    spec = get_spec("efficientnet_lite0").default_input
    pre = Preprocessor(spec)
    for p in paths:
        diff = np.abs(pre.load(p) - _reference(p, spec))
        # TF mean/std 0.5: one gray level is 0.0078 normalised units.
        assert diff.mean() < 0.005 and np.percentile(diff, 99) < 0.02, (p, diff.mean())


def test_dihedral_preset_views_are_the_eight_symmetries_of_the_station_original(tmp_path):
    """`defectscope evaluate --tta dihedral` and a station's [tta] views run the same code: the
    preset expands to view names, and each view is the matching symmetry of the original."""
    from runtime.inference.preprocess import InputSpec, Preprocessor, read_image
    from runtime.inference.tta import DIHEDRAL, TTA, TTAError, expand_views

    spec = InputSpec(mean=(0.5,) * 3, std=(0.5,) * 3, height=64, width=64, resize_size=64, interpolation="bicubic")
    path = tmp_path / "cell.png"
    cv2.imwrite(str(path), _textured(80, 80, 1, seed=9))
    views = expand_views("dihedral")
    assert views == DIHEDRAL
    out = TTA(views, Preprocessor(spec)).expand(read_image(path))
    base = out[0]
    assert np.array_equal(out[views.index("rot90")], np.rot90(base, 1, axes=(1, 2)))
    assert np.array_equal(out[views.index("transverse")], np.rot90(out[views.index("transpose")], 2, axes=(1, 2)))
    assert len({v.tobytes() for v in out}) == 8
    with pytest.raises(TTAError, match="square"):
        TTA(views, Preprocessor(InputSpec(height=64, width=48, resize_size=64)))


def test_tta_presets_expand_to_station_view_lists():
    from runtime.inference.tta import FLIPS, TTAError, expand_views

    assert expand_views("none") == ("original",)
    assert expand_views("flips") == FLIPS
    assert expand_views("multiscale", scales=(0.8, 1.0, 1.2)) == ("original", "scale:0.8", "scale:1.2")
    assert expand_views("all", scales=(0.9, 1.0)) == (*FLIPS, "scale:0.9")
    assert expand_views("hflip,scale:1.15,hflip") == ("original", "hflip", "scale:1.15")
    assert expand_views(["vflip", "flips"]) == ("original", "vflip", "hflip", "rot180")
    for bad in ("mixup", "scale:abc", "scale:-1"):
        with pytest.raises(TTAError, match="unknown view"):
            expand_views(bad)
