"""The one preprocessing implementation, against torchvision's validation transform."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.inference.preprocess import ImageReadError, InputSpec, Preprocessor, SpecError, read_image

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _textured(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth random texture (camera-like, not white noise) as uint8."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), channels), dtype=np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return big if channels == 3 else big.reshape(h, w)


def _torchvision_val(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    torch = pytest.importorskip("torch")
    v2 = pytest.importorskip("torchvision.transforms.v2")
    tf = v2.Compose(
        [
            v2.Resize(spec.resize_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop((spec.height, spec.width)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    from torchvision import tv_tensors

    return tf(tv_tensors.Image(tensor)).numpy()


@pytest.mark.parametrize("shape", [(300, 300), (240, 320), (400, 260)])
def test_matches_torchvision_validation_transform(shape):
    spec = InputSpec(height=224, width=224, resize_size=256, **IMAGENET)
    bgr = _textured(*shape, 3)
    ours = Preprocessor(spec)(bgr)
    ref = _torchvision_val(bgr[:, :, ::-1], spec)
    assert ours.shape == ref.shape == (3, 224, 224)
    diff = np.abs(ours - ref)
    # INTER_AREA vs antialiased bilinear differ slightly; normalised units (1 unit ≈ 0.23*255 gray levels).
    assert diff.mean() < 0.02, diff.mean()
    assert np.percentile(diff, 99) < 0.1


def test_gray_frames_replicate_to_three_channels_and_match_reference():
    spec = InputSpec(height=64, width=64, resize_size=72, mean=(0.5,) * 3, std=(0.5,) * 3)
    gray = _textured(300, 300, 1)
    ours = Preprocessor(spec)(gray)
    assert np.allclose(ours[0], ours[1]) and np.allclose(ours[1], ours[2])
    ref = _torchvision_val(np.repeat(gray[:, :, None], 3, axis=2), spec)
    # A 4x downscale: OpenCV's box filter (INTER_AREA) vs torchvision's triangle filter.
    # Tolerance in [0,1] pixel units: mean < 1.5% of full scale, 99th percentile < 6%.
    diff = np.abs(ours - ref) * 0.5
    assert diff.mean() < 0.015 and np.percentile(diff, 99) < 0.06


def test_bgr_frames_become_rgb():
    spec = InputSpec(height=8, width=8, resize_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV order
    out = Preprocessor(spec)(bgr)
    assert out[2].min() == pytest.approx(1.0) and out[0].max() == pytest.approx(0.0)


def test_read_image_formats_and_errors(tmp_path):
    img16 = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    cv2.imwrite(str(tmp_path / "deep.png"), img16)
    got = read_image(tmp_path / "deep.png")
    assert got.dtype == np.uint8 and got.shape == (64, 64)
    assert got.max() == round(int(img16.max()) * 255 / 65535)
    rgba = np.zeros((10, 12, 4), np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert read_image(tmp_path / "a.png").shape == (10, 12, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")


def test_batch_and_tta_scale_override():
    spec = InputSpec(height=32, width=32, resize_size=36)
    pre = Preprocessor(spec)
    frames = [_textured(50, 60, 3, seed=s) for s in range(3)]
    batch = pre.batch(frames)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[1], pre(frames[1]))
    zoomed = pre(frames[0], resize_size=48)
    assert zoomed.shape == (3, 32, 32) and not np.allclose(zoomed, batch[0])
    # A zoom-out below the crop size still yields the model's input shape.
    assert pre(frames[0], resize_size=20).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(height=0), "input.height"),
        (dict(color_order="XYZ"), "input.color_order"),
        (dict(mean=(0.5, 0.5)), "input.mean"),
        (dict(resize_size=10), "input.resize_size"),
        (dict(interpolation="nearest"), "input.interpolation"),
    ],
)
def test_spec_validation_names_the_key(bad, key):
    base = dict(height=32, width=32, resize_size=36)
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        InputSpec(**{**base, **bad})


def test_spec_dict_round_trip_and_unknown_key():
    spec = InputSpec(height=224, width=224, resize_size=256, **IMAGENET)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['colour'\]"):
        InputSpec.from_dict({**spec.to_dict(), "colour": "RGB"})


def test_linear_interpolation_skips_the_area_filter_and_the_others_keep_it():
    """The optimized resize ("linear") vs the reference (AREA when shrinking): stated tolerance."""
    from runtime.inference.preprocess import resize

    img = _textured(300, 300, 1)
    np.testing.assert_array_equal(
        resize(img, 224, 224, "linear"), cv2.resize(img, (224, 224), interpolation=cv2.INTER_LINEAR)
    )
    for interp in ("bilinear", "bicubic"):
        np.testing.assert_array_equal(
            resize(img, 224, 224, interp), cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)
        )
    np.testing.assert_array_equal(resize(img, 400, 400, "linear"), resize(img, 400, 400, "bilinear"))  # upscaling
    # Same image within a few gray levels on a smooth texture: aliasing differs only at fine detail.
    diff = np.abs(resize(img, 224, 224, "linear").astype(int) - resize(img, 224, 224, "bilinear").astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 32
    spec = InputSpec(height=224, width=224, resize_size=224, interpolation="linear", **IMAGENET)
    assert InputSpec.from_dict(spec.to_dict()) == spec


def _pinned_image() -> np.ndarray:
    """A fixed 37x53 BGR pattern with edges at every scale (no RNG: same bytes on every machine)."""
    y, x = np.mgrid[0:37, 0:53]
    gray = ((x * 37 + y * 91 + (x * y) % 29) % 256).astype(np.uint8)
    return np.dstack([gray, gray[::-1], 255 - gray])


def test_exact_interpolations_give_pinned_pixels():
    """linear_exact / bilinear_exact are fixed-point OpenCV paths: these pixels hold on x86 (IPP) and
    aarch64 (carotene / KleidiCV) builds alike (.ci/aarch64.sh checks the same pins under emulation)."""
    import hashlib

    from runtime.inference.preprocess import resize

    img = _pinned_image()
    pins = {
        ("linear_exact", 16, 24): "270ea817a819e4bc",  # shrink, no AREA
        ("linear_exact", 50, 70): "76560700778581ce",  # enlarge
        ("bilinear_exact", 50, 70): "76560700778581ce",  # enlarge: LINEAR_EXACT
        ("bilinear_exact", 16, 24): "346f3423f7f4dba4",  # shrink: AREA
    }
    for (name, h, w), digest in pins.items():
        assert hashlib.sha256(resize(img, h, w, name).tobytes()).hexdigest()[:16] == digest, (name, h, w)
    np.testing.assert_array_equal(
        resize(img[:, :, 0], 5, 7, "linear_exact"),
        [
            [153, 143, 178, 198, 100, 31, 57],
            [141, 100, 125, 161, 178, 174, 115],
            [172, 50, 29, 44, 72, 100, 128],
            [146, 172, 186, 110, 136, 162, 184],
            [83, 122, 101, 124, 148, 172, 198],
        ],
    )


def test_old_linear_bundles_keep_their_resize_and_new_runs_record_the_exact_one():
    """A manifest saying "linear" still resizes with INTER_LINEAR (as it was trained); new runs record
    "linear_exact", which is INTER_LINEAR_EXACT at every scale."""
    from runtime.inference.preprocess import new_run_interpolation, resize

    img = _pinned_image()
    old = InputSpec.from_dict({"height": 16, "width": 16, "resize_size": 16, "interpolation": "linear"})
    assert old.interpolation == "linear"
    np.testing.assert_array_equal(
        resize(img, 16, 24, old.interpolation), cv2.resize(img, (24, 16), interpolation=cv2.INTER_LINEAR)
    )
    np.testing.assert_array_equal(
        resize(img, 16, 24, "linear_exact"), cv2.resize(img, (24, 16), interpolation=cv2.INTER_LINEAR_EXACT)
    )
    assert new_run_interpolation("linear") == "linear_exact"
    assert new_run_interpolation("bicubic") == "bicubic"
    # The exact variant stays within a grey level of the old one: a retrain, not a different model.
    diff = np.abs(resize(img, 16, 24, "linear").astype(int) - resize(img, 16, 24, "linear_exact").astype(int))
    assert diff.max() <= 1
