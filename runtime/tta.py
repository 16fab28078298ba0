"""Test-time augmentation: several views of a frame judged in ONE inference call.

Views are built on the capture thread from the frame with the bundle's own
preprocessing (``runtime.preprocess.Preprocessor``); the batcher stacks the
views of every frame of a micro-batch into one tensor batch, and the
postprocessor averages the per-view probabilities back to one per frame.

Adaptive mode (``[tta] mode = "uncertain"``): only the first view is built and
judged for every frame; the frames whose scores come within ``band`` of a decision
threshold get their remaining views, for all such frames of the micro-batch in ONE
more call, and the average over all views. Frames far from every threshold cannot
change verdict under TTA, so on a CPU (where inference cost grows linearly with the
views) this keeps TTA's verdicts at a fraction of its cost.
"""

from __future__ import annotations

import numpy as np

from runtime.preprocess import Preprocessor


class TTAError(ValueError):
    """TTA views that do not fit the model; the message names the config key."""


# Views computed from the preprocessed (C,H,W) original: flips and the dihedral group of the
# square (np.rot90 turns counter-clockwise in the H,W plane).
_FROM_BASE = {
    "original": lambda b: b,
    "hflip": lambda b: b[:, :, ::-1],                      # flip W
    "vflip": lambda b: b[:, ::-1, :],                      # flip H
    "rot180": lambda b: b[:, ::-1, ::-1],
    "rot90": lambda b: np.rot90(b, 1, axes=(1, 2)),
    "rot270": lambda b: np.rot90(b, 3, axes=(1, 2)),
    "transpose": lambda b: b.transpose(0, 2, 1),           # mirror about the main diagonal
    "transverse": lambda b: b.transpose(0, 2, 1)[:, ::-1, ::-1],
}
SQUARE_ONLY = frozenset({"rot90", "rot270", "transpose", "transverse"})


class TTA:
    """Expands a frame into its views: (V,C,H,W) float32, view order as configured."""

    def __init__(self, views: tuple[str, ...], pre: Preprocessor) -> None:
        self.views = tuple(views)
        self.pre = pre
        spec = pre.spec
        self._sizes: dict[str, int] = {}
        for v in self.views:
            if v in SQUARE_ONLY and spec.height != spec.width:
                raise TTAError(f"key 'tta.views': view {v!r} turns the image by 90 degrees and needs a square "
                               f"model input, this bundle's is {spec.height}x{spec.width}")
            if v.startswith("scale:"):
                if spec.resize_policy != "shorter_side_center_crop":
                    raise TTAError(f"key 'tta.views': view {v!r} needs a bundle with resize_policy "
                                   f"'shorter_side_center_crop', this one uses {spec.resize_policy!r}")
                self._sizes[v] = max(1, int(round(spec.resize_size * float(v.split(":", 1)[1]))))

    @property
    def n_views(self) -> int:
        return len(self.views)

    def expand(self, image: np.ndarray, start: int = 0, stop: int | None = None,
               base: np.ndarray | None = None) -> np.ndarray:
        """uint8 frame -> (V,C,H,W) float32, one normalised tensor per view in ``views[start:stop]``.

        ``base``: the frame's already preprocessed (C,H,W) 'original' view, reused for flips.
        """
        spec = self.pre.spec
        views = self.views[start:stop]
        out = np.empty((len(views), *spec.shape), dtype=np.float32)
        for i, v in enumerate(views):
            if v in self._sizes:
                out[i] = self.pre(image, resize_size=self._sizes[v])
                continue
            if base is None:
                base = self.pre(image)
            view = _FROM_BASE.get(v)
            if view is None:  # config validation makes this unreachable
                raise TTAError(f"key 'tta.views': unknown view {v!r}")
            out[i] = view(base)
        return out


def average_views(scores: np.ndarray, n_views: int) -> np.ndarray:
    """(N*V, K) per-view scores (views of a frame adjacent) -> (N, K) mean over views."""
    if n_views == 1:
        return scores
    n = scores.shape[0] // n_views
    return scores.reshape(n, n_views, *scores.shape[1:]).mean(axis=1)
