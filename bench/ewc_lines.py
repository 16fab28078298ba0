"""bench_ewc's product lines: the ELPV reference split and each line written as a CSV manifest."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from runtime.fsio import atomic_write_bytes, atomic_write_text


def reference_split(labels: str, seed: int):
    """ELPV reference split (both cell types, listing only: images are checked per line later)."""
    from training.classification.data import DataSpec, resolve_splits

    return resolve_splits(DataSpec(source="elpv", labels=labels, seed=seed, verify=False))


def _limit(samples, n, seed):
    if n is None or len(samples) <= n:
        return samples
    from training.replay import select_exemplars

    return [samples[i] for i in select_exemplars([s.label for s in samples], n, seed=seed)]


def write_line(path: Path, splits, keep, limit: int | None, seed: int, image_map=None) -> Path:
    """CSV manifest (path,label,group,split) of the samples ``keep(sample)`` accepts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("train", "val", "test"):
        chosen = _limit([s for s in splits.split(split) if keep(s)], limit, seed)
        for s in chosen:
            p = image_map(s.path) if image_map else s.path
            rows.append((p, splits.classes[s.label], s.group or "", split))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "group", "split"])
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def inverted_copy(cache: Path):
    """``path -> path of its 255 - x copy`` (written once under ``cache``)."""
    import cv2

    cache.mkdir(parents=True, exist_ok=True)

    def f(src: str) -> str:
        dst = cache / Path(src).name
        if not dst.is_file():
            img = cv2.imread(src, cv2.IMREAD_UNCHANGED)
            if img is None:
                raise FileNotFoundError(src)
            ok, png = cv2.imencode(".png", (255 - img) if img.dtype.name == "uint8" else (65535 - img))
            if not ok:
                raise OSError(f"{src}: cannot encode the inverted copy")
            atomic_write_bytes(dst, png.tobytes())
        return str(dst)

    return f


# ----------------------------------------------------------------------------- bench
