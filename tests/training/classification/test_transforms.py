"""Training transforms: the validation transform matches runtime preprocessing; augmentation is sane."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.inference.preprocess import InputSpec, Preprocessor  # noqa: E402
from tests.training.conftest import synth_image  # noqa: E402
from training.classification.config import AugmentConfig  # noqa: E402
from training.classification.transforms import RandomRot90, to_chw_uint8, train_pipeline, val_transform  # noqa: E402


@pytest.mark.parametrize(
    "color,shape,size,resize", [(False, (60, 60), 48, 48), (True, (50, 70), 32, 40), (True, (40, 40), 48, 56)]
)
def test_val_transform_matches_runtime_preprocessor(color, shape, size, resize):
    rng = np.random.default_rng(1)
    img = synth_image("defect", rng, max(shape), color=color)[: shape[0], : shape[1]]
    spec = InputSpec(
        height=size,
        width=size,
        resize_size=resize,
        mean=(0.5, 0.4, 0.3),
        std=(0.25, 0.2, 0.3),
        interpolation="bilinear",
    )
    ours = val_transform(spec)(to_chw_uint8(img)).numpy()
    theirs = Preprocessor(spec)(img)
    assert ours.shape == theirs.shape == (3, size, size)
    # Training resizes with runtime.inference.preprocess.resize: the same pixels, up to float rounding.
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_identity_geometry_is_exact():
    img = synth_image("stain", np.random.default_rng(2), 32, color=True)
    spec = InputSpec(height=32, width=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    np.testing.assert_allclose(val_transform(spec)(to_chw_uint8(img)).numpy(), Preprocessor(spec)(img), atol=1e-5)


def test_train_pipeline_is_seeded_and_varies():
    from runtime.inference.preprocess import InputSpec

    spec = InputSpec(height=32, width=32, resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = to_chw_uint8(synth_image("defect", np.random.default_rng(3), 40))
    pipe = train_pipeline(spec, AugmentConfig())
    torch.manual_seed(5)
    a = [pipe(x) for _ in range(6)]
    torch.manual_seed(5)
    b = [pipe(x) for _ in range(6)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert any(not torch.equal(a[0], t) for t in a[1:])  # augmentation does something
    assert all(t.shape == (3, 32, 32) and t.dtype == torch.float32 for t in a)
    off = train_pipeline(spec, AugmentConfig.none())
    assert torch.equal(off(x), val_transform(spec)(x))  # no augmentation = eval transform


def test_rot90_keeps_shape_of_non_square_images():
    x = torch.arange(2 * 3 * 5).reshape(2, 3, 5)
    rot = RandomRot90()
    shapes = {tuple(rot(x).shape) for _ in range(20)}
    assert shapes == {(2, 3, 5)}
    sq = torch.arange(9).reshape(1, 3, 3)
    assert len({tuple(rot(sq).flatten().tolist()) for _ in range(40)}) == 4


def test_interpolation_is_a_training_option_recorded_in_the_input_spec():
    """`train --interpolation linear`: the run's InputSpec (and so the bundle, and the station) resizes that way."""
    from training.backbones import get_spec, sized_input
    from training.classification.config import ConfigError, TrainConfig
    from training.classification.transforms import val_pipeline

    spec = sized_input(get_spec("tiny_cnn"), 32, interpolation="linear")
    assert spec.interpolation == "linear_exact"  # a new run records the bit-exact variant (issue 30)
    assert sized_input(get_spec("tiny_cnn"), 32).interpolation == get_spec("tiny_cnn").default_input.interpolation
    import numpy as np
    import torch

    from runtime.inference.preprocess import Preprocessor

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (3, 60, 60), dtype=np.uint8)
    train_side = val_pipeline(spec)(torch.from_numpy(img)).numpy()
    station = Preprocessor(spec)(img.transpose(1, 2, 0)[:, :, ::-1].copy())  # the station gets BGR frames
    np.testing.assert_allclose(train_side, station, atol=1e-5)
    with pytest.raises(ConfigError, match="interpolation: expected one of"):
        TrainConfig(backbone="tiny_cnn", interpolation="nearest")
