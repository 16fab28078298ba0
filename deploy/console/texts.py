"""Texts the console composes for people (tile and station reasons, alarm messages): a key + arguments.

The browser translates ``Text.view()`` (``{"key": ..., "args": {...}}``) with the catalogue in
static/i18n.js, which has every key here in every language (tests/deploy/console/test_i18n.py checks
it, and that the English there is EN here). Consumers that need one text (the alarm history's
``message`` column, the webhook, the PLC bridge, logs, ``/api/state`` readers) get ``Text.render()``:
the English text.

Arguments may come from a station (a model's fallback error, a camera name): they are only ever data.
Strings are cut to ARG_CHARS with control characters replaced, numbers must be finite, anything else
becomes its (cut) string; an argument may itself be a Text (a reason inside an alarm message). The page
inserts the translated text as text (``textContent``), never as HTML.
"""

from __future__ import annotations

import math
import re
from typing import Any, Union

ARG_CHARS = 200
KEY = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# English, exactly as in static/i18n.js (the test compares them).
EN: dict[str, str] = {
    "reason.no_heartbeat_yet": "daemon down: no heartbeat yet",
    "reason.no_heartbeat_for": "daemon down: no heartbeat for over {s} s",
    "reason.reloading": "model reloading",
    "reason.daemon_starting": "daemon starting",
    "reason.daemon_stopping": "daemon stopping",
    "reason.daemon_stopped": "daemon stopped",
    "reason.daemon_state": "daemon {state}",
    "reason.camera_ended": "camera down: source ended{errors}",
    "reason.camera_no_frame_for": "camera down: no frame for {s} s{errors}",
    "reason.camera_no_frame_yet": "camera down: no frame yet{errors}",
    "reason.unreadable_frames": ", {n} unreadable frames",
    "reason.camera_down": "camera down",
    "alarm.defects_in_row": "{station}/{camera}: {n} defects in a row",
    "alarm.defect_rate": "{station}/{camera}: defect rate {rate}% over {window} s (alarm at {threshold}%)",
    "alarm.uncertain_rate": "{station}/{camera}: uncertain rate {rate}% over {window} s (alarm at {threshold}%)",
    "alarm.model_fallback": "{station}: model fallback: {detail}",
    "alarm.model_refused": "{station}: model refused: {detail}",
    "alarm.station_down": "{station}: station down ({reason})",
    "alarm.camera_down": "{station}/{camera}: {reason}",
}

OPTIONAL = {"errors"}  # placeholders a call may leave out (they render as nothing); every other one is given

Arg = Union[str, int, float, None, "Text"]


def _arg(value: Any) -> Arg:
    if value is None or isinstance(value, Text):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return value if abs(value) < 10**15 else str(value)[:ARG_CHARS]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _CONTROL.sub(" ", str(value)[:ARG_CHARS])


def _show(value: Arg) -> str:
    if value is None:
        return ""
    if isinstance(value, Text):
        return value.render()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Text:
    """A message key (one of EN) and its arguments; immutable, compared by value."""

    __slots__ = ("key", "args")
    key: str
    args: tuple[tuple[str, Arg], ...]

    def __init__(self, key: str, /, **args: Any) -> None:
        if key not in EN:
            raise KeyError(f"no text {key!r} in deploy/console/texts.py EN (and static/i18n.js)")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "args", tuple((k, _arg(v)) for k, v in args.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Text is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Text) and self.key == other.key and self.args == other.args

    def __hash__(self) -> int:
        return hash((self.key, self.args))

    def __repr__(self) -> str:
        return f"Text({self.key!r}, {dict(self.args)!r})"

    def render(self) -> str:
        """The English text (missing arguments render as nothing, as in the page)."""
        args = dict(self.args)
        return _PLACEHOLDER.sub(lambda m: _show(args.get(m.group(1))), EN[self.key])

    __str__ = render

    def view(self) -> dict[str, Any]:
        """What the page translates: ``{"key": ..., "args": {name: value or nested view}}``."""
        return {"key": self.key, "args": {k: v.view() if isinstance(v, Text) else v for k, v in self.args}}
