"""The ``[alarms]`` table of the console config: rules and outputs, validated on load.

```toml
[alarms]
sound = true                        # the page beeps while an alarm is unacknowledged
webhook_urls = ["http://127.0.0.1:8471/alarms"]   # POSTed on every change and every webhook_repeat_s
webhook_secret_file = "/etc/defectscope/alarm.key"  # HMAC-SHA256 key: header X-DefectScope-Signature
webhook_repeat_s = 10.0

[[alarms.rules]]
name = "cam1 defects"               # unique; shown in the banner and stored with each alarm
kind = "defect_rate"                # defect_rate | uncertain_rate | defects_in_row | camera_down |
                                    # station_down | model_fallback
station = "line1"                   # optional: every station when empty
camera = "cam1"                     # optional: every camera when empty
threshold = 0.2                     # rates: fraction of frames in the window (0..1)
window_s = 300.0                    # rates: the sliding window
min_frames = 20                     # rates: no alarm on fewer frames than this in the window
count = 5                           # defects_in_row: this many defects one after another
for_s = 5.0                         # camera_down / station_down: down this long
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config.strict import field_names, refuse_unknown

KINDS = ("defect_rate", "uncertain_rate", "defects_in_row", "camera_down", "station_down", "model_fallback")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:/-]{0,63}$")


class AlarmConfigError(ValueError):
    """An alarm key with a bad value; the message names file and key."""


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    station: str = ""
    camera: str = ""
    threshold: float = 0.1
    window_s: float = 300.0
    min_frames: int = 20
    count: int = 5
    for_s: float = 5.0

    def matches(self, station: str, camera: str | None = None) -> bool:
        return (not self.station or self.station == station) and (
            camera is None or not self.camera or self.camera == camera
        )


@dataclass(frozen=True)
class AlarmConfig:
    sound: bool = False
    webhook_urls: tuple[str, ...] = ()
    webhook_secret_file: Path | None = None
    webhook_repeat_s: float = 10.0
    rules: tuple[Rule, ...] = ()


def _num(value: Any, key: str, src: str, lo: float, hi: float, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        raise AlarmConfigError(
            f"{src}: key '{key}': expected a{'n integer' if integer else ' number'} {lo:g}..{hi:g}, got {value!r}"
        )
    return int(value) if integer else float(value)


def _rule(i: int, t: Any, src: str) -> Rule:
    where = f"alarms.rules[{i}]"
    if not isinstance(t, Mapping):
        raise AlarmConfigError(f"{src}: key '{where}': expected a table")
    refuse_unknown(t, field_names(Rule), src, AlarmConfigError, section=where)
    name, kind = t.get("name"), t.get("kind")
    if not isinstance(name, str) or not NAME.match(name):
        raise AlarmConfigError(f"{src}: key '{where}.name': expected 1-64 letters, digits, spaces, '_.:/-'")
    if kind not in KINDS:
        raise AlarmConfigError(f"{src}: key '{where}.kind': expected one of {KINDS}, got {kind!r}")
    out: dict[str, Any] = {"name": name, "kind": kind}
    for key in ("station", "camera"):
        v = t.get(key, "")
        if not isinstance(v, str) or (v and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", v)):
            raise AlarmConfigError(f"{src}: key '{where}.{key}': expected a {key} name")
        out[key] = v
    limits = {
        "threshold": (0.0, 1.0, False),
        "window_s": (1.0, 86400.0, False),
        "min_frames": (1, 10**6, True),
        "count": (1, 10**6, True),
        "for_s": (0.0, 86400.0, False),
    }
    for key, (lo, hi, integer) in limits.items():
        if key in t:
            out[key] = _num(t[key], f"{where}.{key}", src, lo, hi, integer)
    return Rule(**out)


def parse(data: Any, src: str, base: Path) -> AlarmConfig:
    if data is None:
        return AlarmConfig()
    if not isinstance(data, Mapping):
        raise AlarmConfigError(f"{src}: key 'alarms': expected a table")
    refuse_unknown(data, field_names(AlarmConfig), src, AlarmConfigError, section="alarms")
    sound = data.get("sound", False)
    if not isinstance(sound, bool):
        raise AlarmConfigError(f"{src}: key 'alarms.sound': expected true or false")
    urls = data.get("webhook_urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) and re.match(r"^https?://\S+$", u) for u in urls):
        raise AlarmConfigError(f"{src}: key 'alarms.webhook_urls': expected a list of http(s):// URLs")
    secret = data.get("webhook_secret_file")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise AlarmConfigError(f"{src}: key 'alarms.webhook_secret_file': expected a path")
    repeat = _num(data.get("webhook_repeat_s", 10.0), "alarms.webhook_repeat_s", src, 1.0, 3600.0)
    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise AlarmConfigError(f"{src}: key 'alarms.rules': expected an array of tables ([[alarms.rules]])")
    rules = tuple(_rule(i, t, src) for i, t in enumerate(rules_raw))
    if len({r.name for r in rules}) != len(rules):
        raise AlarmConfigError(f"{src}: key 'alarms.rules': rule names repeat")
    secret_path = None if secret is None else (Path(secret) if Path(secret).is_absolute() else base / secret)
    return AlarmConfig(sound, tuple(urls), secret_path, repeat, rules)
