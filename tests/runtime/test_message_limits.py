"""runtime.serving.messages schema limits: the values a hostile station sends to make a subscriber's store fail.

Each message here passed `validate` before the limits (Python's json parses NaN / Infinity, and
nothing capped integers, string lengths, counts or nesting); a console then lost whole batches.
"""

from __future__ import annotations

import json

import pytest

from runtime.serving.messages import (
    MAX_MESSAGE_BYTES,
    SchemaError,
    decode,
    encode,
    status_message,
    validate,
    verdict_message,
)


def _verdict(**over):
    msg = verdict_message(
        station="st1",
        camera="cam1",
        seq=1,
        source=None,
        captured_at=1.7e9,
        published_at=1.7e9,
        model={"name": "m", "version": "1.0.0", "precision": "fp32", "artifact": "onnx", "backend": "onnxruntime-cpu"},
        task="classification",
        scores={"ok": 0.9, "defect": 0.1},
        top_class="ok",
        top_score=0.9,
        verdict="ok",
        defect_class=None,
        confidence=0.9,
        latency_ms={"queue": 0.1, "preprocess": 1.0, "inference": 5.0, "total": 6.1},
        tta_views=1,
    )
    msg.update(over)
    return msg


def _wire(msg) -> dict:
    """What a subscriber gets: the JSON text a hostile peer sends (NaN allowed), decoded."""
    return decode(json.dumps(msg, allow_nan=True).encode())


def test_valid_messages_still_pass():
    validate(_wire(_verdict()))
    dets = [{"box": [1.0, 2.0, 30.5, 40.25], "score": 0.75, "class": "defect"}] * 1000
    det = _verdict(schema_version=2, task="detection", class_scores={"ok": 0.1, "defect": 0.9}, detections=dets)
    del det["probabilities"]
    det["top_class"] = "defect"
    payload = encode(det)
    assert len(payload) < MAX_MESSAGE_BYTES  # the largest verdict the daemon sends fits the cap
    validate(decode(payload, MAX_MESSAGE_BYTES))
    validate(
        _wire(
            status_message(
                station="st1",
                state="serving",
                model=None,
                published_at=1.7e9,
                subscribers=1,
                uptime_s=3.0,
                last_reload={"result": None, "error": None},
                cameras={"cam1": {"up": True, "captured": 3, "published": 3, "dropped": 0}},
            )
        )
    )


@pytest.mark.parametrize(
    "poison",
    [
        {"confidence": float("nan")},
        {"top_score": float("inf")},
        {"captured_at": float("-inf")},
        {"latency_ms": {"queue": float("nan"), "preprocess": 1.0, "inference": 5.0, "total": 6.1}},
        {"seq": 10**20},
        {"seq": -1},
        {"tta_views": 10**6},
        {"top_class": "c" * 200, "probabilities": {"c" * 200: 0.9, "ok": 0.1}},
        {"camera": "c" * 65},
        {"model": {"name": "m", "version": "v" * 200, "precision": "fp32", "artifact": "onnx", "backend": "x"}},
        {"source": "s" * 100_000},
        {"snapshot": "/spool/" + "n" * 300 + ".jpg"},
        {"probabilities": {f"c{i}": 0.0 for i in range(5000)} | {"ok": 0.9}},
        {"extra": [[[[[[[[[[1]]]]]]]]]]},
        {"extra": list(range(100_000))},
    ],
    ids=lambda p: next(iter(p)) + ":" + repr(next(iter(p.values())))[:20],
)
def test_values_a_store_or_a_browser_cannot_take_are_refused(poison):
    with pytest.raises(SchemaError):
        validate(_wire(_verdict(**poison)))


def test_oversized_and_deeply_nested_payloads_are_schema_errors_before_parsing():
    with pytest.raises(SchemaError, match="exceeds"):
        decode(b"{" + b" " * MAX_MESSAGE_BYTES + b"}", MAX_MESSAGE_BYTES)
    with pytest.raises(SchemaError, match="nested"):
        decode(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")


def test_msgpack_non_finite_and_binary_values_are_refused():
    msgpack = pytest.importorskip("msgpack")
    with pytest.raises(SchemaError):
        validate(decode(msgpack.packb(_verdict(confidence=float("nan")))))
    with pytest.raises(SchemaError):
        validate(decode(msgpack.packb(_verdict(source=b"\x00" * 10), use_bin_type=True)))
