"""Fixtures for the calibration tests: a synthetic defect dataset, a trained tiny_cnn run, bundles.

Everything is made here (40 px gray PNGs, tiny_cnn at 32 px, a few hundred SGD steps),
so the whole package's tests run in well under two minutes on one core.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from tests.training.detection.conftest import det_run  # noqa: E402, F401  (a tiny trained detector run)

IMAGE_SIZE = 40  # pixels on disk
INPUT_SIZE = 32  # model input (tiny_cnn)
COUNTS = {"train": 48, "val": 12, "test": 32}  # per class


def synth_image(defect: bool, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Smooth gray texture; defects add a bright 3-px crack, horizontal or vertical (uint8 (H,W))."""
    small = rng.integers(70, 150, (6, 6)).astype(np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    img = (img.astype(np.int16) + rng.normal(0, 6, img.shape)).clip(0, 255).astype(np.uint8)
    if defect:
        p = int(rng.integers(6, size - 9))
        if rng.random() < 0.5:
            img[p : p + 3, 4:-4] = 240
        else:
            img[4:-4, p : p + 3] = 240
    return img


def write_dataset(root: Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> Path:
    """ImageFolder with splits: root/{train,val,test}/{defect,ok}/*.png."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for cls in ("defect", "ok"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(d / f"{cls}_{split}_{i:03d}.png"), synth_image(cls == "defect", rng))
    return root


def train_tiny(
    model, x: np.ndarray, y: np.ndarray, steps: int = 150, lr: float = 1e-2, seed: int = 0, head_only: bool = False
):
    """Plain Adam on preprocessed tensors; enough for the synthetic crack task."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    opt = torch.optim.Adam(list((model.head if head_only else model).parameters()), lr=lr)
    model.train()
    if head_only:
        model.body.eval()  # BatchNorm statistics stay as they are
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def inject_outlier(model, value: float = 5000.0):
    """Make stem channel 0 a huge constant that nothing reads (FP32 function unchanged).

    Any per-tensor INT8 range of the stem output then drowns the real channels:
    the gate must fail, and only keeping the stem conv and the stage-1 conv (its
    reader) in float fixes it.
    """
    with torch.no_grad():
        bn = model.body.stem[1]
        bn.weight[0] = 0.0
        bn.bias[0] = value
        model.body.stage1[0].weight[:, 0] = 0.0
    return model


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Verification / timing caches under a temp dir, never the user's ~/.cache."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("DEFECTSCOPE_CACHE", "XDG_CACHE_HOME")}
    os.environ["DEFECTSCOPE_CACHE"] = str(cache / "defectscope")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "parts")


@pytest.fixture(scope="session")
def splits(dataset):
    from training.classification.data import DataSpec, resolve_splits

    return resolve_splits(DataSpec(source="folder", path=str(dataset)))


def _make_run(root: Path, splits, dataset: Path, outlier: bool = False) -> Path:
    from runtime.inference.preprocess import Preprocessor
    from training.backbones import build_model, get_spec, sized_input
    from training.checkpoint import ModelCard, save_model
    from training.classification.data import DataSpec

    torch.manual_seed(0)
    inp = sized_input(get_spec("tiny_cnn"), image_size=INPUT_SIZE)
    model = build_model("tiny_cnn", 2, weights="none", input_spec=inp)
    pre = Preprocessor(inp)
    x = pre.load_batch([s.path for s in splits.train])
    y = np.array([s.label for s in splits.train])
    train_tiny(model, x, y)
    if outlier:
        inject_outlier(model)
        # Re-fit the head to the body that lost stem channel 0.
        train_tiny(model, x, y, steps=100, head_only=True)
    card = ModelCard(
        backbone="tiny_cnn",
        num_classes=2,
        classes=tuple(splits.classes),
        good_classes=("ok",),
        input=inp,
        weights="none",
        data=DataSpec(source="folder", path=str(dataset)).to_dict(),
        dataset_fingerprint=splits.fingerprint,
        config_hash="cfg-test",
    )
    save_model(root, model, card)
    return root


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, splits, dataset) -> Path:
    """A trained tiny_cnn run directory (model.json + best.safetensors)."""
    return _make_run(tmp_path_factory.mktemp("runs") / "tiny", splits, dataset)


@pytest.fixture(scope="session")
def outlier_run_dir(tmp_path_factory, splits, dataset) -> Path:
    return _make_run(tmp_path_factory.mktemp("runs") / "outlier", splits, dataset, outlier=True)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, run_dir) -> Path:
    """A bundle exported from ``run_dir`` by the real CLI (read-only: copy it before changing)."""
    from calibration.cli import export_main

    out = tmp_path_factory.mktemp("bundles") / "tiny-bundle"
    assert export_main([str(run_dir), "--out", str(out), "--name", "tiny", "--threads", "1"]) == 0
    return out


@pytest.fixture
def bundle_copy(exported, tmp_path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(exported, dest)
    return dest


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory, exported) -> Path:
    """``exported`` + INT8 for both targets (read-only)."""
    from calibration.cli import calibrate_main

    out = tmp_path_factory.mktemp("bundles") / "tiny-int8"
    assert (
        calibrate_main(
            [
                str(exported),
                "--out",
                str(out),
                "--target",
                "both",
                "--size",
                "40",
                "--threads",
                "1",
                "--method",
                "minmax",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="session")
def prepared(exported, splits, tmp_path_factory):
    """(pre-processed float model, calibration tensor, test tensor, test labels, work dir)."""
    from calibration.calibset import build_calibration_set, preprocess_paths
    from calibration.quantize import prepare_float_model
    from runtime.bundle.load import load_bundle

    b = load_bundle(exported)
    work = tmp_path_factory.mktemp("quant")
    float_model = prepare_float_model(b.artifact_path("fp32"), work / "float.prep.onnx")
    calib = build_calibration_set(splits.train, splits.classes, b.manifest.input, size=48, seed=0)
    x_test = preprocess_paths([s.path for s in splits.test], b.manifest.input)
    return float_model, calib.tensor(), x_test, np.array([s.label for s in splits.test]), work
