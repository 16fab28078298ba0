"""The verdict stream's wire format: topics, schema versions 1 and 2, encode / decode / validate.

Topic ``<station>.<camera>.<verdict>`` (subscribers filter by prefix, e.g.
``line3.`` or ``line3.cam1.`` or ``line3.cam1.defect``); station heartbeats use
``<station>._status``. Payload: JSON (default) or msgpack, one dict with
``"schema_version"`` and ``"type": "verdict" | "status"``. Status messages and
classification verdicts are version 1; a detection verdict is version 2: the version-1
fields unchanged plus ``detections`` (boxes in original image pixels).

Limits (a subscriber stores these fields in fixed-width columns and shows them to browsers, so a
message outside them is refused alone): every number finite, every integer within int64, strings,
objects and lists capped in length, nesting capped in depth, the encoded message capped in bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 1
DETECTION_SCHEMA_VERSION = 2  # a verdict carrying "detections"
SCHEMA_VERSIONS = (SCHEMA_VERSION, DETECTION_SCHEMA_VERSION)
# Most boxes one verdict may carry (a bundle's output.max_detections is capped by it too).
MAX_DETECTIONS = 1000
DETECTION_KEYS = ("box", "score", "class")
STATUS = "_status"
# The one definition of the verdict names (config, metrics, viewer and the decision read it).
VERDICTS = ("ok", "defect", "uncertain")
STATES = ("starting", "serving", "reloading", "stopping", "stopped")
# Schema limits (docs/contracts.md, "ZeroMQ"). A detection verdict with MAX_DETECTIONS boxes is ~100 KB.
MAX_MESSAGE_BYTES = 256 * 1024  # encoded verdict / status message
MAX_NAME_CHARS = 64  # station, camera (and task, model version)
MAX_CLASS_CHARS = 128  # class names, model name
MAX_FILE_NAME_CHARS = 255  # the snapshot's file name (its last path component)
MAX_TEXT_CHARS = 4096  # any other string (source, snapshot path, error text)
MAX_ITEMS = 4096  # entries of any object or list
MAX_CLASSES = 1000  # entries of probabilities / class_scores
MAX_CAMERAS = 256  # entries of a heartbeat's cameras
MAX_DEPTH = 8  # nesting of objects / lists
INT64 = (-(2**63), 2**63 - 1)  # SQL BIGINT; larger integers are refused, not truncated


class SchemaError(ValueError):
    """A message that does not follow the schema; the message names the key."""


def verdict_topic(station: str, camera: str, verdict: str) -> str:
    return f"{station}.{camera}.{verdict}"


def status_topic(station: str) -> str:
    return f"{station}.{STATUS}"


def encode(message: Mapping[str, Any], fmt: str = "json") -> bytes:
    if fmt == "json":
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if fmt == "msgpack":
        import msgpack

        return msgpack.packb(message, use_bin_type=True)
    raise ValueError(f"unknown message format {fmt!r}")


def decode(payload: bytes, max_bytes: int | None = None) -> dict[str, Any]:
    """JSON or msgpack payload -> dict (JSON payloads start with '{'); SchemaError past ``max_bytes``.

    A subscriber passes ``max_bytes`` (e.g. MAX_MESSAGE_BYTES) so an oversized payload is refused
    before it is parsed; nesting too deep to parse is a SchemaError, not a RecursionError.
    """
    if max_bytes is not None and len(payload) > max_bytes:
        raise SchemaError(f"message of {len(payload)} bytes exceeds the {max_bytes}-byte cap")
    try:
        return _decode(payload)
    except RecursionError:
        raise SchemaError("message nested too deeply") from None


def _decode(payload: bytes) -> dict[str, Any]:
    if payload[:1] == b"{":
        return json.loads(payload)
    import msgpack

    return msgpack.unpackb(payload, raw=False)


_NUM = (int, float)
_OPT_STR = (str, type(None))
_MODEL = {"name": str, "version": str, "precision": str, "artifact": str, "backend": str}
VERDICT_FIELDS: dict[str, Any] = {
    "schema_version": int,
    "type": str,
    "station": str,
    "camera": str,
    "seq": int,
    "source": _OPT_STR,
    "captured_at": _NUM,  # unix seconds when the frame was read
    "published_at": _NUM,  # unix seconds when this message was sent
    "model": _MODEL,
    "task": str,
    "top_class": str,
    "top_score": _NUM,
    "verdict": str,
    "defect_class": _OPT_STR,
    "confidence": _NUM,
    "latency_ms": {"queue": _NUM, "preprocess": _NUM, "inference": _NUM, "total": _NUM},
    "tta_views": int,
    "snapshot": _OPT_STR,
}
STATUS_FIELDS: dict[str, Any] = {
    "schema_version": int,
    "type": str,
    "station": str,
    "state": str,
    "published_at": _NUM,
    "model": (dict, type(None)),
    "cameras": dict,
}
# Per-camera entry of a status heartbeat (frame counts since the daemon started); the daemon also
# sends "decode_errors" (int, unreadable files/frames, included in "dropped") and "last_frame_age_s".
STATUS_CAMERA_FIELDS: dict[str, Any] = {"up": bool, "captured": int, "published": int, "dropped": int}


def verdict_message(
    *,
    station: str,
    camera: str,
    seq: int,
    source: str | None,
    captured_at: float,
    published_at: float,
    model: Mapping[str, str],
    task: str,
    scores: Mapping[str, float],
    top_class: str,
    top_score: float,
    verdict: str,
    defect_class: str | None,
    confidence: float,
    latency_ms: Mapping[str, float],
    tta_views: int,
    detections: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One verdict (schema 1; 2 for a detector's); ``source`` is the file name for replays, None for streams."""
    msg: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION if task == "classification" else DETECTION_SCHEMA_VERSION,
        "type": "verdict",
        "station": station,
        "camera": camera,
        "seq": seq,
        "source": source,
        "captured_at": round(captured_at, 6),
        "published_at": round(published_at, 6),
        "model": dict(model),
        "task": task,
        "top_class": top_class,
        "top_score": round(top_score, 5),
        "verdict": verdict,
        "defect_class": defect_class,
        "confidence": round(confidence, 5),
        "latency_ms": {k: round(v, 3) for k, v in latency_ms.items()},
        "tta_views": tta_views,
        "snapshot": None,
    }
    if task == "classification":
        msg["probabilities"] = dict(scores)
    else:
        msg["class_scores"] = dict(scores)
        msg["detections"] = list(detections or ())
    return msg


def status_message(
    *,
    station: str,
    state: str,
    model: Mapping[str, str] | None,
    cameras: Mapping[str, Mapping[str, Any]],
    subscribers: int,
    uptime_s: float,
    last_reload: Mapping[str, Any],
    published_at: float,
) -> dict[str, Any]:
    """One schema-1 ``<station>._status`` heartbeat (fields in docs/contracts.md)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "status",
        "station": station,
        "state": state,
        "published_at": round(published_at, 6),
        "model": dict(model) if model is not None else None,
        "cameras": {k: dict(v) for k, v in cameras.items()},
        "subscribers": subscribers,
        "uptime_s": round(uptime_s, 3),
        "last_reload": dict(last_reload),
    }


_Plan = list[tuple[str, Any, tuple[type, ...], bool]]
_PLANS: dict[int, tuple[Mapping[str, Any], _Plan]] = {}


def _plan(fields: Mapping[str, Any]) -> _Plan:
    """``fields`` as (key, nested fields or None, accepted types, bool accepted), worked out once per schema."""
    got = _PLANS.get(id(fields))
    if got is not None and got[0] is fields:
        return got[1]
    plan: _Plan = []
    for key, kind in fields.items():
        if isinstance(kind, Mapping):
            plan.append((key, kind, (), False))
        else:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            plan.append((key, None, kinds, bool in kinds))
    _PLANS[id(fields)] = (fields, plan)  # the schema is kept with its plan: its id is never reused
    return plan


def _check(msg: Mapping[str, Any], fields: Mapping[str, Any], prefix: str = "") -> None:
    for key, nested, kinds, bool_ok in _plan(fields):
        if key not in msg:
            raise SchemaError(f"key '{prefix + key}': missing")
        value = msg[key]
        if nested is not None:
            if not isinstance(value, (dict, Mapping)):
                raise SchemaError(f"key '{prefix + key}': expected an object, got {value!r:.60}")
            _check(value, nested, prefix + key + ".")
            continue
        if (value is True or value is False) and not bool_ok or not isinstance(value, kinds):
            raise SchemaError(
                f"key '{prefix + key}': expected {'/'.join(k.__name__ for k in kinds)}, got {value!r:.60}"
            )


def _within(value: Any, depth: int) -> bool:
    """The fast path of _bounded: True when every value is plainly within the limits (exact JSON types only).

    False means "look closer", not "refused": _bounded then walks the message again, naming what is wrong
    (or accepting a Mapping / int subclass this path does not know). No key names are built on this path,
    which is most of a subscriber's per-message cost for a valid message.
    """
    if depth > MAX_DEPTH:
        return False
    t = type(value)
    if t is str:
        return len(value) <= MAX_TEXT_CHARS
    if t is float:
        return math.isfinite(value)
    if t is int:
        return INT64[0] <= value <= INT64[1]
    if value is None or t is bool:
        return True
    if t is dict:
        if len(value) > MAX_ITEMS:
            return False
        for key, item in value.items():
            if type(key) is not str or len(key) > MAX_CLASS_CHARS or not _within(item, depth + 1):
                return False
        return True
    if t is list:
        return len(value) <= MAX_ITEMS and all(_within(item, depth + 1) for item in value)
    return False


def _bounded(msg: Any) -> None:
    """Every value JSON-like and within the limits: finite numbers, int64 integers, capped strings and containers."""
    if _within(msg, 0):
        return
    stack: list[tuple[str, Any, int]] = [("", msg, 0)]
    while stack:
        name, value, depth = stack.pop()
        where = f"key '{name}'" if name else "message"
        if depth > MAX_DEPTH:
            raise SchemaError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            if not INT64[0] <= value <= INT64[1]:
                raise SchemaError(f"{where}: integer outside the 64-bit range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise SchemaError(f"{where}: expected a finite number, got {value!r}")
        elif isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS:
                raise SchemaError(f"{where}: string of {len(value)} characters, at most {MAX_TEXT_CHARS}")
        elif isinstance(value, (Mapping, list)):
            if len(value) > MAX_ITEMS:
                raise SchemaError(f"{where}: {len(value)} entries, at most {MAX_ITEMS}")
            if isinstance(value, list):  # named as the other checks do: detections[0].box[2]
                stack.extend((f"{name}[{i}]", item, depth + 1) for i, item in enumerate(value))
                continue
            for key, item in value.items():
                if not isinstance(key, str) or len(key) > MAX_CLASS_CHARS:
                    raise SchemaError(f"{where}: object keys must be strings of at most {MAX_CLASS_CHARS} characters")
                stack.append((f"{name}.{key}" if name else key, item, depth + 1))
        else:
            raise SchemaError(f"{where}: unsupported value type {type(value).__name__}")


def _short(msg: Mapping[str, Any], key: str, limit: int, least: int = 1) -> None:
    value = msg[key]
    if isinstance(value, str) and not least <= len(value) <= limit:
        raise SchemaError(f"key '{key}': expected {least}..{limit} characters, got {len(value)}")


def _check_verdict_limits(msg: Mapping[str, Any], scores: Mapping[str, Any]) -> None:
    for key in ("station", "camera", "task"):
        _short(msg, key, MAX_NAME_CHARS)
    for key in ("top_class", "defect_class"):
        _short(msg, key, MAX_CLASS_CHARS)
    if len(scores) > MAX_CLASSES:
        raise SchemaError(f"class scores: {len(scores)} classes, at most {MAX_CLASSES}")
    if any(not 0 < len(c) <= MAX_CLASS_CHARS for c in scores):
        raise SchemaError(f"class scores: a class name is not 1..{MAX_CLASS_CHARS} characters")
    model = msg["model"]
    _short(model, "name", MAX_CLASS_CHARS, 0)
    for key in ("version", "precision", "artifact", "backend"):
        _short(model, key, MAX_NAME_CHARS, 0)
    if not 0 <= msg["seq"] <= INT64[1]:
        raise SchemaError(f"key 'seq': expected 0..{INT64[1]}, got {msg['seq']!r:.40}")
    if not 1 <= msg["tta_views"] <= 64:
        raise SchemaError(f"key 'tta_views': expected 1..64, got {msg['tta_views']!r:.40}")
    snap = msg["snapshot"]
    if isinstance(snap, str) and len(snap.rsplit("/", 1)[-1]) > MAX_FILE_NAME_CHARS:
        raise SchemaError(f"key 'snapshot': file name longer than {MAX_FILE_NAME_CHARS} characters")


def _finite(value: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return not isinstance(value, bool) and isinstance(value, _NUM) and math.isfinite(value) and lo <= value <= hi


def _check_detections(dets: Any, classes: Any, max_detections: int) -> None:
    """Each ``{"box": [x1, y1, x2, y2] original pixels, "score": [0, 1], "class": <a class of class_scores>}``."""
    if not isinstance(dets, list):
        raise SchemaError("key 'detections': expected a list for a detection model")
    if len(dets) > max_detections:
        raise SchemaError(f"key 'detections': {len(dets)} boxes, at most {max_detections} allowed")
    for i, d in enumerate(dets):
        where = f"key 'detections[{i}]"
        if not isinstance(d, Mapping) or set(d) != set(DETECTION_KEYS):
            raise SchemaError(f"{where}': expected an object with exactly the keys {list(DETECTION_KEYS)}")
        box = d["box"]
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(_finite(v, 0.0) for v in box)
            or box[2] < box[0]
            or box[3] < box[1]
        ):
            raise SchemaError(
                f"{where}.box': expected [x1, y1, x2, y2] finite pixels, 0 <= x1 <= x2, 0 <= y1 <= y2, got {box!r:.80}"
            )
        if not _finite(d["score"], 0.0, 1.0):
            raise SchemaError(f"{where}.score': expected a number in [0, 1], got {d['score']!r:.40}")
        if not isinstance(d["class"], str) or d["class"] not in classes:
            raise SchemaError(f"{where}.class': {d['class']!r:.40} is not among the class_scores")


def validate(msg: Mapping[str, Any], max_detections: int = MAX_DETECTIONS) -> None:
    """Raise SchemaError unless ``msg`` is a valid verdict (schema 1, or 2 with detections) or status message.

    ``max_detections``: a subscriber that knows the bundle may pass its ``output.max_detections``.
    """
    if not isinstance(msg, Mapping):
        raise SchemaError("message is not an object")
    _bounded(msg)
    version = msg.get("schema_version")
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise SchemaError(f"key 'schema_version': expected one of {SCHEMA_VERSIONS}, got {version!r:.40}")
    kind = msg.get("type")
    if kind == "verdict":
        _check(msg, VERDICT_FIELDS)
        if msg["verdict"] not in VERDICTS:
            raise SchemaError(f"key 'verdict': expected one of {VERDICTS}, got {msg['verdict']!r:.40}")
        scores_key = "probabilities" if msg["task"] == "classification" else "class_scores"
        scores = msg.get(scores_key)
        if not isinstance(scores, Mapping) or not scores:
            raise SchemaError(f"key '{scores_key}': expected an object of class -> score")
        for cls, value in scores.items():
            if not _finite(value, 0.0, 1.0):
                raise SchemaError(f"key '{scores_key}.{cls:.60}': expected a number in [0, 1], got {value!r:.40}")
        if msg["top_class"] not in scores:
            raise SchemaError(f"key 'top_class': {msg['top_class']!r:.60} is not among the {scores_key}")
        _check_verdict_limits(msg, scores)
        detection = msg["task"] != "classification"
        if detection != (version == DETECTION_SCHEMA_VERSION):
            raise SchemaError(
                f"key 'schema_version': a {msg['task']} verdict is version "
                f"{DETECTION_SCHEMA_VERSION if detection else SCHEMA_VERSION}, got {version}"
            )
        if detection:
            _check_detections(msg.get("detections"), scores, max_detections)
    elif kind == "status":
        if version != SCHEMA_VERSION:
            raise SchemaError(f"key 'schema_version': a status message is version {SCHEMA_VERSION}, got {version}")
        _check(msg, STATUS_FIELDS)
        if msg["state"] not in STATES:
            raise SchemaError(f"key 'state': expected one of {STATES}, got {msg['state']!r:.40}")
        _short(msg, "station", MAX_NAME_CHARS)
        if len(msg["cameras"]) > MAX_CAMERAS:
            raise SchemaError(f"key 'cameras': {len(msg['cameras'])} cameras, at most {MAX_CAMERAS}")
        for cam, info in msg["cameras"].items():
            if not 0 < len(cam) <= MAX_NAME_CHARS:
                raise SchemaError(f"key 'cameras': a camera name is not 1..{MAX_NAME_CHARS} characters")
            _check(info, STATUS_CAMERA_FIELDS, f"cameras.{cam}.")
    else:
        raise SchemaError(f"key 'type': expected 'verdict' or 'status', got {kind!r}")
