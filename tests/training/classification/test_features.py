"""Feature cache: a re-run hits it, and any change of backbone weights, transform or data misses."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tests.training.conftest import write_folder  # noqa: E402
from training.backbones import REGISTRY, build_model, sized_input, weights_id  # noqa: E402
from training.classification.data import DataSpec, resolve_splits  # noqa: E402
from training.classification.features import cache_path, cached_features, feature_key  # noqa: E402


class CountingModel(torch.nn.Module):
    """Wraps a Classifier and counts forward_features calls (a cache hit makes none)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.feature_dim = inner.feature_dim

    def forward_features(self, x):
        self.calls += 1
        return self.inner.forward_features(x)


def _key(splits, spec, weights="none", seed=0, backbone="tiny_cnn"):
    return feature_key(backbone, weights_id(weights, backbone), spec, splits.split_fingerprint("train"), f"seed={seed}")


def test_cache_hit_and_invalidation(tmp_path):
    root = write_folder(tmp_path / "ds", {"ok": 8, "defect": 8})
    splits = resolve_splits(DataSpec(source="folder", path=str(root)))
    spec = sized_input(REGISTRY["tiny_cnn"], 32)
    torch.manual_seed(0)
    model = CountingModel(build_model("tiny_cnn", 2, weights="none"))

    key = _key(splits, spec)
    f1, y1, hit1 = cached_features(model, splits.train, spec, key, progress=False)
    calls = model.calls
    assert not hit1 and calls > 0 and cache_path(key).is_file()
    assert f1.shape == (len(splits.train), 32) and y1.tolist() == [s.label for s in splits.train]

    f2, _, hit2 = cached_features(model, splits.train, spec, key, progress=False)
    assert hit2 and model.calls == calls and torch.equal(f1, f2)

    # Another transform, another weights identity, another init seed: all miss.
    spec48 = sized_input(REGISTRY["tiny_cnn"], 48)
    assert _key(splits, spec48) != key
    assert _key(splits, spec, seed=1) != key
    wfile = tmp_path / "w.pth"
    torch.save(build_model("tiny_cnn", 2, weights="none").state_dict(), wfile)
    assert _key(splits, spec, weights=str(wfile)) != key
    _, _, hit3 = cached_features(model, splits.train, spec48, _key(splits, spec48), progress=False)
    assert not hit3 and model.calls > calls

    # Changing one image's content changes the data fingerprint -> miss.
    victim = splits.train[0].path
    write_folder(tmp_path / "other", {"ok": 1}, seed=99)
    with open(victim, "wb") as f:
        f.write((tmp_path / "other" / "ok" / "ok_000.png").read_bytes())
    changed = resolve_splits(DataSpec(source="folder", path=str(root)))
    assert changed.split_fingerprint("train") != splits.split_fingerprint("train")
    assert _key(changed, spec) != key


def test_corrupt_cache_file_is_recomputed(tmp_path):
    root = write_folder(tmp_path / "ds", {"ok": 4, "defect": 4})
    splits = resolve_splits(DataSpec(source="folder", path=str(root)))
    spec = sized_input(REGISTRY["tiny_cnn"], 32)
    model = build_model("tiny_cnn", 2, weights="none")
    key = _key(splits, spec)
    cache_path(key).parent.mkdir(parents=True)
    cache_path(key).write_bytes(b"garbage")
    f, _, hit = cached_features(model, splits.train, spec, key, progress=False)
    assert not hit and f.shape[0] == len(splits.train)
    assert cached_features(model, splits.train, spec, key, progress=False)[2]
