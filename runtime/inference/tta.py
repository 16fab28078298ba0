"""Test-time augmentation: several views of a frame judged in ONE inference call.

Views are built on the capture thread from the frame with the bundle's own
preprocessing (``runtime.inference.preprocess.Preprocessor``); the batcher stacks the
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

from collections.abc import Sequence

import numpy as np

from runtime.inference.preprocess import Preprocessor, uint8_shape


class TTAError(ValueError):
    """TTA views that do not fit the model; the message names the config key."""


# Views computed from the preprocessed original, on its last two axes (H,W) so they apply to
# one (C,H,W) image or an (N,C,H,W) batch alike: flips and the dihedral group of the square
# (np.rot90 turns counter-clockwise in the H,W plane).
VIEW_FUNCTIONS = {
    "original": lambda b: b,
    "hflip": lambda b: b[..., ::-1],  # flip W
    "vflip": lambda b: b[..., ::-1, :],  # flip H
    "rot180": lambda b: b[..., ::-1, ::-1],
    "rot90": lambda b: np.rot90(b, 1, axes=(-2, -1)),
    "rot270": lambda b: np.rot90(b, 3, axes=(-2, -1)),
    "transpose": lambda b: np.swapaxes(b, -2, -1),  # mirror about the main diagonal
    "transverse": lambda b: np.swapaxes(b, -2, -1)[..., ::-1, ::-1],
}
SQUARE_ONLY = frozenset({"rot90", "rot270", "transpose", "transverse"})

# Presets: names that expand to view lists (``expand_views``), for `defectscope evaluate --tta`
# and the station's ``[tta] views``. "multiscale" adds ``scale:F`` views of resize_size.
FLIPS = ("original", "hflip", "vflip", "rot180")
DIHEDRAL = ("original", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "transverse")
DEFAULT_SCALES = (0.9, 1.0, 1.1)
PRESETS = ("none", "flips", "dihedral", "multiscale", "all")


def scale_views(scales: Sequence[float]) -> tuple[str, ...]:
    """``scale:F`` view names of the factors other than 1 (the original is the 1.0 view)."""
    return tuple(f"scale:{float(s):g}" for s in scales if float(s) != 1.0)


def expand_views(views: str | Sequence[str], scales: Sequence[float] = DEFAULT_SCALES) -> tuple[str, ...]:
    """A preset (``none``, ``flips``, ``dihedral``, ``multiscale``, ``all`` = flips + multiscale)
    or view names (a sequence or a comma-separated string, presets allowed among them) -> the
    view list, ``original`` first, each view once. Unknown names raise ``TTAError``."""
    names = [v.strip() for v in views.split(",")] if isinstance(views, str) else [str(v).strip() for v in views]
    out: list[str] = ["original"]
    for name in names:
        if name in ("none", "original", ""):
            add: Sequence[str] = ()
        elif name == "flips":
            add = FLIPS
        elif name == "dihedral":
            add = DIHEDRAL
        elif name == "multiscale":
            add = scale_views(scales)
        elif name == "all":
            add = (*FLIPS, *scale_views(scales))
        elif name in VIEW_FUNCTIONS or _is_scale(name):
            add = (name,)
        else:
            raise TTAError(
                f"tta: unknown view or preset {name!r}; expected one of {list(PRESETS)}, "
                f"view names {list(VIEW_FUNCTIONS)} or 'scale:F'"
            )
        out += [v for v in add if v not in out]
    return tuple(out)


def _is_scale(name: str) -> bool:
    if not name.startswith("scale:"):
        return False
    try:
        return float(name.split(":", 1)[1]) > 0
    except ValueError:
        return False


class TTA:
    """Expands a frame into its views: (V,C,H,W) float32, view order as configured."""

    def __init__(self, views: tuple[str, ...], pre: Preprocessor) -> None:
        self.views = tuple(views)
        self.pre = pre
        spec = pre.spec
        self._sizes: dict[str, int] = {}
        for v in self.views:
            if v in SQUARE_ONLY and spec.height != spec.width:
                raise TTAError(
                    f"key 'tta.views': view {v!r} turns the image by 90 degrees and needs a square "
                    f"model input, this bundle's is {spec.height}x{spec.width}"
                )
            if v.startswith("scale:"):
                if spec.resize_policy != "shorter_side_center_crop":
                    raise TTAError(
                        f"key 'tta.views': view {v!r} needs a bundle with resize_policy "
                        f"'shorter_side_center_crop', this one uses {spec.resize_policy!r}"
                    )
                self._sizes[v] = max(1, int(round(spec.resize_size * float(v.split(":", 1)[1]))))

    @property
    def n_views(self) -> int:
        return len(self.views)

    def expand(
        self,
        image: np.ndarray,
        start: int = 0,
        stop: int | None = None,
        base: np.ndarray | None = None,
        *,
        uint8: bool = False,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """uint8 frame -> (V,C,H,W) float32, one normalised tensor per view in ``views[start:stop]``.

        ``uint8``: (V,H,W,C) uint8 resized frames instead, for a uint8-input artifact (the graph normalises).
        ``base``: the frame's already prepared 'original' view (same kind), reused for flips.
        ``out``: where to write the views (e.g. the frame's slot of a preallocated batch).
        """
        spec = self.pre.spec
        views = self.views[start:stop]
        shape = uint8_shape(spec) if uint8 else spec.shape
        if out is None:
            out = np.empty((len(views), *shape), dtype=np.uint8 if uint8 else np.float32)
        prep = self.pre.frame_uint8 if uint8 else self.pre
        for i, v in enumerate(views):
            if v in self._sizes:
                prep(image, resize_size=self._sizes[v], out=out[i])
                continue
            if base is None:
                base = prep(image, out=out[i]) if v == "original" else prep(image)
            view = VIEW_FUNCTIONS.get(v)
            if view is None:  # config validation makes this unreachable
                raise TTAError(f"key 'tta.views': unknown view {v!r}")
            if uint8:
                # The view functions act on (..., H, W): apply them to the (C,H,W) view of (H,W,C).
                out[i] = view(base.transpose(2, 0, 1)).transpose(1, 2, 0)
            else:
                out[i] = view(base)
        return out


def average_views(scores: np.ndarray, n_views: int) -> np.ndarray:
    """(N*V, K) per-view scores (views of a frame adjacent) -> (N, K) mean over views."""
    if n_views == 1:
        return scores
    n = scores.shape[0] // n_views
    return scores.reshape(n, n_views, *scores.shape[1:]).mean(axis=1)
