"""TTA views: each one equals preprocessing the correspondingly transformed frame (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from runtime.inference.preprocess import InputSpec, Preprocessor
from runtime.inference.tta import TTA, TTAError, average_views

# What each view means, stated with OpenCV on the raw (H,W) frame.
RAW = {
    "original": lambda im: im,
    "hflip": lambda im: cv2.flip(im, 1),
    "vflip": lambda im: cv2.flip(im, 0),
    "rot180": lambda im: cv2.rotate(im, cv2.ROTATE_180),
    "rot90": lambda im: cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE),
    "rot270": lambda im: cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE),
    "transpose": lambda im: cv2.transpose(im),
    "transverse": lambda im: cv2.flip(cv2.transpose(im), -1),
}


def _frame(size: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = cv2.resize(rng.integers(0, 256, (6, 6), dtype=np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    im[: size // 4, : size // 3] = 255  # an asymmetric mark: every view differs
    return im


def test_every_square_view_is_the_transformed_frame_preprocessed():
    pre = Preprocessor(InputSpec(height=32, width=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))
    tta = TTA(tuple(RAW), pre)
    img = _frame(48)
    views = tta.expand(img)
    assert views.shape == (8, 3, 32, 32) and views.dtype == np.float32
    for i, name in enumerate(RAW):
        np.testing.assert_allclose(views[i], pre(RAW[name](img)), atol=1e-6, err_msg=name)
    flat = {views[i].tobytes() for i in range(8)}
    assert len(flat) == 8  # the dihedral group of the square: 8 distinct views


def test_quarter_turn_views_need_a_square_input():
    pre = Preprocessor(InputSpec(height=32, width=48, resize_size=48, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert TTA(("original", "hflip", "rot180"), pre).n_views == 3
    for view in ("rot90", "rot270", "transpose", "transverse"):
        with pytest.raises(TTAError, match=rf"tta\.views.*{view}.*square.*32x48"):
            TTA(("original", view), pre)


def test_average_views_groups_adjacent_rows():
    scores = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_array_equal(average_views(scores, 3), [[2, 3], [8, 9]])
