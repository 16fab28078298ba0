"""The one preprocessing implementation (numpy + OpenCV, no torch).

Calibration, evaluation of exported models and the daemon all call this; the
training side's validation transform (torchvision v2 ``Resize(antialias=True)`` →
``CenterCrop`` → ``ToDtype(scale=True)`` → ``Normalize``) is the reference it is
tested against.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from runtime.config.strict import field_names, refuse_unknown
from runtime.inference.image_header import HeaderError, header_size

if TYPE_CHECKING:
    from runtime.inference.boxes import Geometry

# "letterbox" (detectors): scale to fit, pad the rest with ``pad_value``; runtime.inference.boxes.fit does it.
RESIZE_POLICIES = ("shorter_side_center_crop", "stretch", "letterbox")
# Interpolation name (recorded in a bundle's InputSpec) -> the OpenCV flag used when not shrinking.
# INTER_LINEAR is not bit-exact across OpenCV builds (x86 IPP vs aarch64 carotene/KleidiCV differ by
# one grey level on ~19 % of pixels, issue 30); INTER_LINEAR_EXACT (fixed-point) and INTER_AREA give
# the same pixels on both. "linear" / "bilinear" keep their old meaning so old bundles load as they
# were trained; new training records the "_exact" names (NEW_RUN_NAMES).
INTERPOLATIONS = {
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "linear": cv2.INTER_LINEAR,
    "linear_exact": cv2.INTER_LINEAR_EXACT,
    "bilinear_exact": cv2.INTER_LINEAR_EXACT,
}
# Interpolations used as-is at every scale (no INTER_AREA when shrinking): "linear" is the cheapest
# resize (~5x faster than AREA at 300->224) but aliases; a bundle picks it only if measured accurate.
PLAIN = frozenset({"linear", "linear_exact"})
# What a new training run records when asked for a name: the bit-exact variant of the same filter.
NEW_RUN_NAMES = {"linear": "linear_exact"}
COLOR_ORDERS = ("RGB", "BGR", "GRAY")
# What an artifact's input tensor takes (manifest ``artifacts.<key>.input``): the normalised float
# tensor (N,C,H,W) this module makes, or the resized uint8 frame (N,H,W,C) in the camera's channel
# order (BGR, or 1 gray channel) with cast, channel order, mean/std and layout done inside the graph.
FLOAT_NCHW = "float32_nchw"
UINT8_NHWC = "uint8_nhwc"
INPUT_KINDS = (FLOAT_NCHW, UINT8_NHWC)


class ImageReadError(ValueError):
    """An image file that cannot be read or decoded; the message names the path."""


class ImageTooLarge(ImageReadError):
    """An image whose header (or file) is larger than the caller's ``max_pixels``; never decoded."""


# Bytes per pixel of the largest layout decoded (16-bit RGBA), plus headers and metadata: a file
# longer than ``max_pixels * _MAX_BYTES_PER_PIXEL + _SLACK_BYTES`` cannot hold an accepted image.
_MAX_BYTES_PER_PIXEL = 8
_SLACK_BYTES = 1 << 20


class SpecError(ValueError):
    """An input spec with a missing or invalid key; the message names the key."""


@dataclass(frozen=True)
class InputSpec:
    """What the model's input tensor expects and how to get there from a camera frame."""

    height: int
    width: int
    resize_size: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    name: str = "input"
    layout: str = "NCHW"
    dtype: str = "float32"
    channels: int = 3
    color_order: str = "RGB"
    resize_policy: str = "shorter_side_center_crop"
    interpolation: str = "bilinear"
    pad_value: int | None = None  # letterbox only: uint8 gray level of the padding (default 0); else None

    def __post_init__(self) -> None:
        # Normalise sequences so equality and hashing work after a JSON round trip.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        for key in ("height", "width", "resize_size", "channels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SpecError(f"input.{key}: expected a positive integer, got {value!r}")
        if self.layout != "NCHW":
            raise SpecError(f"input.layout: expected 'NCHW', got {self.layout!r}")
        if self.dtype != "float32":
            raise SpecError(f"input.dtype: expected 'float32', got {self.dtype!r}")
        if self.color_order not in COLOR_ORDERS:
            raise SpecError(f"input.color_order: expected one of {COLOR_ORDERS}, got {self.color_order!r}")
        if (self.color_order == "GRAY") != (self.channels == 1):
            raise SpecError(
                f"input.channels: {self.channels} does not fit color_order {self.color_order!r} "
                "(GRAY needs 1 channel, RGB/BGR need 3)"
            )
        if self.resize_policy not in RESIZE_POLICIES:
            raise SpecError(f"input.resize_policy: expected one of {RESIZE_POLICIES}, got {self.resize_policy!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise SpecError(f"input.interpolation: expected one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if len(values) != self.channels:
                raise SpecError(f"input.{key}: expected {self.channels} values (one per channel), got {len(values)}")
        if any(s <= 0 for s in self.std):
            raise SpecError(f"input.std: every value must be > 0, got {self.std}")
        if self.resize_policy == "letterbox":
            if self.pad_value is None:
                object.__setattr__(self, "pad_value", 0)
            if (
                not isinstance(self.pad_value, int)
                or isinstance(self.pad_value, bool)
                or not 0 <= self.pad_value <= 255
            ):
                raise SpecError(f"input.pad_value: expected an integer gray level in [0, 255], got {self.pad_value!r}")
        elif self.pad_value is not None:
            raise SpecError(
                f"input.pad_value: only used by resize_policy 'letterbox', this spec uses {self.resize_policy!r}"
            )
        if self.resize_policy == "shorter_side_center_crop" and self.resize_size < max(self.height, self.width):
            raise SpecError(
                f"input.resize_size: {self.resize_size} is smaller than the crop "
                f"{self.height}x{self.width}; expected resize_size >= max(height, width)"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "input") -> InputSpec:
        """Build from a manifest/model-card dict; unknown or missing keys are named."""
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a table/object, got {type(data).__name__}")
        refuse_unknown(data, field_names(cls), where, SpecError)
        missing = [k for k in ("height", "width", "resize_size") if k not in data]
        if missing:
            raise SpecError(f"{where}: missing required key(s) {missing}")
        try:
            return cls(**dict(data))
        except SpecError as exc:
            raise SpecError(str(exc).replace("input.", f"{where}.", 1)) from None
        except TypeError as exc:
            raise SpecError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        if self.pad_value is None:
            del out["pad_value"]  # classification specs serialise exactly as before the letterbox policy
        return out

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C,H,W) of one preprocessed image."""
        return (self.channels, self.height, self.width)


def read_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as uint8 ``(H,W)`` gray or ``(H,W,3)`` BGR.

    16-bit images are scaled to 8 bits and alpha is dropped, so every caller sees
    the same two layouts. Raises ImageReadError naming the path. With ``max_pixels``
    (untrusted files: replays, cameras) the header's width x height is checked before
    decoding (runtime.inference.image_header; ImageTooLarge), an unknown format is refused, and the
    decoded image is checked again.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"{path}: no such file")
    if max_pixels is not None:
        size = os.path.getsize(path)
        if size > max_pixels * _MAX_BYTES_PER_PIXEL + _SLACK_BYTES:
            raise ImageTooLarge(f"{path}: {size} bytes is more than any image of at most {max_pixels} pixels")
    data = np.fromfile(path, dtype=np.uint8)
    if max_pixels is not None and data.size:
        try:
            w, h = header_size(data.data)
        except HeaderError as exc:
            raise ImageReadError(f"{path}: not a readable image ({exc})") from None
        _check_pixels(w, h, max_pixels, path)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError(f"{path}: not a readable image (empty, truncated or unknown format)")
    if max_pixels is not None:  # a decoder that disagreed with the header: refuse before any copy
        _check_pixels(image.shape[1], image.shape[0], max_pixels, path)
    return to_uint8(image, where=path)


def _check_pixels(w: int, h: int, max_pixels: int, where: str) -> None:
    if w * h > max_pixels:
        raise ImageTooLarge(f"{where}: {w}x{h} image is larger than max_pixels ({max_pixels})")


def to_uint8(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Normalise a decoded frame to uint8 gray ``(H,W)`` or BGR ``(H,W,3)``."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"{where}: unsupported pixel type {image.dtype} (expected 8- or 16-bit)")
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        elif image.shape[2] != 3:
            raise ImageReadError(f"{where}: {image.shape[2]} channels (expected 1, 3 or 4)")
    elif image.ndim != 2:
        raise ImageReadError(f"{where}: array of shape {image.shape} is not an image")
    return image


def new_run_interpolation(name: str) -> str:
    """The name a new training run records for ``name`` (``linear`` -> ``linear_exact``)."""
    return NEW_RUN_NAMES.get(name, name)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(H,W) after scaling the shorter side to ``size``; torchvision's rounding (truncation)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize(image: np.ndarray, h: int, w: int, interpolation: str = "bilinear") -> np.ndarray:
    """Resize uint8 ``(H,W)`` / ``(H,W,C)`` to ``(h,w)``: the one resize of the project.

    Downscaling uses INTER_AREA (OpenCV's anti-aliased filter, the counterpart of
    torchvision's ``antialias=True``); upscaling plain bilinear/bicubic; ``linear`` is
    INTER_LINEAR at every scale, ``linear_exact`` INTER_LINEAR_EXACT at every scale and
    ``bilinear_exact`` INTER_AREA down / INTER_LINEAR_EXACT up (both bit-exact across CPUs).
    Training resizes with this too, so a model sees the same pixels in training and on a station.
    """
    ih, iw = image.shape[:2]
    if (ih, iw) == (h, w):
        return image
    shrink = h < ih and w < iw and interpolation not in PLAIN
    interp = cv2.INTER_AREA if shrink else INTERPOLATIONS[interpolation]
    return cv2.resize(image, (w, h), interpolation=interp)


def uint8_shape(spec: InputSpec) -> tuple[int, int, int]:
    """(H,W,C) of one resized uint8 frame for a uint8-input artifact."""
    return (spec.height, spec.width, spec.channels)


def input_shape(spec: InputSpec, kind: str) -> tuple[int, int, int]:
    """Per-image shape of an artifact input of ``kind`` (INPUT_KINDS)."""
    return uint8_shape(spec) if kind == UINT8_NHWC else spec.shape


def input_dtype(kind: str) -> type[np.generic]:
    return np.uint8 if kind == UINT8_NHWC else np.float32


class Preprocessor:
    """Camera frame (uint8 gray or BGR) → model input (C,H,W) float32, per an InputSpec."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        c = spec.channels
        # Fold /255, mean and std into one multiply-add: x * scale + offset.
        std = np.asarray(spec.std, dtype=np.float32)
        self._scale = (1.0 / (255.0 * std)).reshape(c, 1, 1)
        self._offset = (-np.asarray(spec.mean, dtype=np.float32) / std).reshape(c, 1, 1)

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset), each (C,) float32: normalised = uint8 * scale + offset (the uint8 graph's constants)."""
        return self._scale.reshape(-1).copy(), self._offset.reshape(-1).copy()

    def _resize(self, image: np.ndarray, h: int, w: int) -> np.ndarray:
        return resize(image, h, w, self.spec.interpolation)

    def geometry(self, image: np.ndarray, resize_size: int | None = None) -> np.ndarray:
        """Resize + crop only (uint8 in, uint8 out); ``resize_size`` overrides the spec (TTA scales)."""
        spec = self.spec
        if spec.resize_policy == "letterbox":
            from runtime.inference.boxes import fit  # runtime.inference.boxes imports this module (resize)

            return fit(image, spec.height, spec.width, "letterbox", spec.interpolation, spec.pad_value or 0)[0]
        if spec.resize_policy == "stretch":
            return self._resize(image, spec.height, spec.width)
        size = resize_size or spec.resize_size
        h, w = resized_size(image.shape[0], image.shape[1], size)
        if h < spec.height or w < spec.width:
            # Scale up so the crop fits (a TTA zoom-out below the crop size).
            h, w = resized_size(image.shape[0], image.shape[1], max(spec.height, spec.width))
        image = self._resize(image, h, w)
        top = int(round((h - spec.height) / 2.0))
        left = int(round((w - spec.width) / 2.0))
        return image[top : top + spec.height, left : left + spec.width]

    def box_geometry(self, height: int, width: int) -> Geometry | None:
        """How boxes on the model input map back to an ``height`` x ``width`` frame (letterbox / stretch);
        None for the center crop (a classifier's policy, which loses the borders)."""
        if self.spec.resize_policy not in ("letterbox", "stretch"):
            return None
        from runtime.inference.boxes import geometry

        return geometry(height, width, self.spec.height, self.spec.width, self.spec.resize_policy)

    def __call__(self, image: np.ndarray, resize_size: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """One frame → (C,H,W) float32 normalised tensor (written into ``out`` if given)."""
        geo = self.geometry(to_uint8(image), resize_size)
        spec = self.spec
        if out is None:
            out = np.empty(spec.shape, dtype=np.float32)
        if geo.ndim == 2:
            # Gray frame: normalise once per channel by broadcasting (H,W) against (C,1,1);
            # no replicated copy is ever made.
            src = geo[None]
        elif spec.color_order == "GRAY":
            src = cv2.cvtColor(geo, cv2.COLOR_BGR2GRAY)[None]
        else:
            src = geo.transpose(2, 0, 1)  # (3,H,W) view, BGR
            if spec.color_order == "RGB":
                src = src[::-1]
        np.multiply(src, self._scale, out=out, casting="unsafe")
        out += self._offset
        return out

    def frame_uint8(
        self, image: np.ndarray, resize_size: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """One frame -> (H,W,C) uint8 for a uint8-input artifact: resize/crop only, BGR (or 1 gray channel).

        Written into ``out`` (e.g. a slot of a preallocated batch) if given; the graph does the rest.
        """
        geo = self.geometry(to_uint8(image), resize_size)
        spec = self.spec
        if out is None:
            out = np.empty(uint8_shape(spec), dtype=np.uint8)
        if spec.channels == 1:
            if geo.ndim == 2:
                out[..., 0] = geo
            else:
                out[..., 0] = cv2.cvtColor(geo, cv2.COLOR_BGR2GRAY)
        elif geo.ndim == 2:
            out[...] = geo[..., None]  # gray camera, colour model: the float path broadcasts the same way
        else:
            out[...] = geo
        return out

    def uint8_from_tensor(self, x: np.ndarray) -> np.ndarray:
        """Normalised (N,C,H,W) float32 made by this preprocessor -> the (N,H,W,C) uint8 frames it came from.

        Exact (rounding undoes the float multiply-add): lets a float sample, e.g. a bundle's held-out
        ``x``, drive a uint8-input artifact or engine.
        """
        u = np.rint((np.asarray(x, np.float32) - self._offset) / self._scale)
        u = np.clip(u, 0, 255).astype(np.uint8)
        if self.spec.channels == 3 and self.spec.color_order == "RGB":
            u = u[:, ::-1]  # back to the camera's BGR
        return np.ascontiguousarray(u.transpose(0, 2, 3, 1))

    def batch(self, images: Iterable[np.ndarray], resize_size: int | None = None) -> np.ndarray:
        """Frames → (N,C,H,W) float32."""
        images = list(images)
        out = np.empty((len(images), *self.spec.shape), dtype=np.float32)
        for i, img in enumerate(images):
            self(img, resize_size, out=out[i])
        return out

    def load(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Read + preprocess one image file → (C,H,W) float32."""
        return self(read_image(path))

    def load_batch(self, paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
        """Read + preprocess image files → (N,C,H,W) float32."""
        return self.batch(read_image(p) for p in paths)


__all__ = [
    "FLOAT_NCHW",
    "INPUT_KINDS",
    "UINT8_NHWC",
    "input_dtype",
    "input_shape",
    "uint8_shape",
    "ImageReadError",
    "InputSpec",
    "Preprocessor",
    "new_run_interpolation",
    "SpecError",
    "ImageTooLarge",
    "read_image",
    "resize",
    "resized_size",
    "to_uint8",
]
