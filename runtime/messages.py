"""The verdict stream's wire format: topics, schema version 1, encode / decode / validate.

Topic ``<station>.<camera>.<verdict>`` (subscribers filter by prefix, e.g.
``line3.`` or ``line3.cam1.`` or ``line3.cam1.defect``); station heartbeats use
``<station>._status``. Payload: JSON (default) or msgpack, one dict with
``"schema_version": 1`` and ``"type": "verdict" | "status"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 1
STATUS = "_status"
# The one definition of the verdict names (config, metrics, viewer and the decision read it).
VERDICTS = ("ok", "defect", "uncertain")
STATES = ("starting", "serving", "reloading", "stopping", "stopped")


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


def decode(payload: bytes) -> dict[str, Any]:
    """JSON or msgpack payload -> dict (JSON payloads start with '{')."""
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


def verdict_message(*, station: str, camera: str, seq: int, source: str | None, captured_at: float,
                    published_at: float, model: Mapping[str, str], task: str, scores: Mapping[str, float],
                    top_class: str, top_score: float, verdict: str, defect_class: str | None, confidence: float,
                    latency_ms: Mapping[str, float], tta_views: int,
                    detections: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One schema-1 verdict; ``source`` is the file name for replays, None for streams."""
    msg: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
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


def status_message(*, station: str, state: str, model: Mapping[str, str] | None,
                   cameras: Mapping[str, Mapping[str, Any]], subscribers: int, uptime_s: float,
                   last_reload: Mapping[str, Any], published_at: float) -> dict[str, Any]:
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


def _check(msg: Mapping[str, Any], fields: Mapping[str, Any], prefix: str = "") -> None:
    for key, kind in fields.items():
        name = prefix + key
        if key not in msg:
            raise SchemaError(f"key '{name}': missing")
        value = msg[key]
        if isinstance(kind, Mapping):
            if not isinstance(value, Mapping):
                raise SchemaError(f"key '{name}': expected an object, got {value!r:.60}")
            _check(value, kind, name + ".")
            continue
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise SchemaError(f"key '{name}': expected {'/'.join(k.__name__ for k in kinds)}, got {value!r:.60}")


def validate(msg: Mapping[str, Any]) -> None:
    """Raise SchemaError unless ``msg`` is a valid schema-1 verdict or status message."""
    if not isinstance(msg, Mapping):
        raise SchemaError("message is not an object")
    if msg.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"key 'schema_version': expected {SCHEMA_VERSION}, got {msg.get('schema_version')!r}")
    kind = msg.get("type")
    if kind == "verdict":
        _check(msg, VERDICT_FIELDS)
        if msg["verdict"] not in VERDICTS:
            raise SchemaError(f"key 'verdict': expected one of {VERDICTS}, got {msg['verdict']!r}")
        scores_key = "probabilities" if msg["task"] == "classification" else "class_scores"
        scores = msg.get(scores_key)
        if not isinstance(scores, Mapping) or not scores:
            raise SchemaError(f"key '{scores_key}': expected an object of class -> score")
        for cls, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, _NUM) or not 0.0 <= value <= 1.0:
                raise SchemaError(f"key '{scores_key}.{cls}': expected a number in [0, 1], got {value!r}")
        if msg["top_class"] not in scores:
            raise SchemaError(f"key 'top_class': {msg['top_class']!r} is not among the {scores_key}")
        if msg["task"] == "detection" and not isinstance(msg.get("detections"), list):
            raise SchemaError("key 'detections': expected a list for a detection model")
    elif kind == "status":
        _check(msg, STATUS_FIELDS)
        if msg["state"] not in STATES:
            raise SchemaError(f"key 'state': expected one of {STATES}, got {msg['state']!r}")
        for cam, info in msg["cameras"].items():
            _check(info, STATUS_CAMERA_FIELDS, f"cameras.{cam}.")
    else:
        raise SchemaError(f"key 'type': expected 'verdict' or 'status', got {kind!r}")
