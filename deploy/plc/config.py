"""The PLC bridge's TOML (``defectscope plc --config plc.toml``), validated on load; errors name file and key.

```toml
[listen]                          # the console's alarm webhook posts here (console: [alarms] webhook_urls)
host = "127.0.0.1"
port = 8471
secret_file = "alarm.key"         # the console's alarms.webhook_secret_file; unsigned posts are refused
console_lost_after_s = 30.0       # no post for this long: console_ok goes false

[modbus]                          # exactly one of [modbus] / [opcua]
host = "10.0.0.50"
port = 502
device_id = 1

# [opcua]
# endpoint = "opc.tcp://10.0.0.50:4840"

[outputs]                         # Modbus: coil numbers; OPC UA: Boolean node ids ("ns=2;s=Line1.Alarm")
alarm_active = 0                  # an alarm is active
alarm_unacknowledged = 1          # an alarm waits for an acknowledge
console_ok = 2                    # the console's webhook is heard

[[stations]]
name = "line1"
endpoint = "tcp://10.0.0.3:5555"
# curve = { server_public_key = "line1.key", client_secret_key = "plc.key_secret" }  # a CURVE station

[[rejects]]                       # per part, straight from the station's ZeroMQ stream
station = "line1"
camera = "cam1"
pulse = 10                        # coil / Boolean node: true for pulse_ms per rejected part
count = 0                         # holding register / integer node: rejected parts (mod 65536 on Modbus)
pulse_ms = 200
verdicts = ["defect"]             # add "uncertain" to reject those parts too
```
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config.strict import refuse_unknown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
Address = int | str  # a Modbus coil/register number or an OPC UA node id


class PlcConfigError(ValueError):
    """A bad plc.toml key; the message names file and key."""


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8471
    secret_file: Path | None = None
    console_lost_after_s: float = 30.0


@dataclass(frozen=True)
class Modbus:
    host: str
    port: int = 502
    device_id: int = 1


@dataclass(frozen=True)
class OpcUa:
    endpoint: str


@dataclass(frozen=True)
class Outputs:
    alarm_active: Address | None = None
    alarm_unacknowledged: Address | None = None
    console_ok: Address | None = None


@dataclass(frozen=True)
class Curve:
    server_public_key: Path  # the station's public key (its .key file)
    client_secret_key: Path  # this bridge's .key_secret, mode 0600: the station must list its public key


@dataclass(frozen=True)
class Station:
    name: str
    endpoint: str
    curve: Curve | None = None


@dataclass(frozen=True)
class Reject:
    station: str
    camera: str
    pulse: Address | None = None
    count: Address | None = None
    pulse_ms: int = 200
    verdicts: tuple[str, ...] = ("defect",)


@dataclass(frozen=True)
class PlcConfig:
    listen: Listen
    modbus: Modbus | None
    opcua: OpcUa | None
    outputs: Outputs
    stations: tuple[Station, ...]
    rejects: tuple[Reject, ...]
    source: str


def _table(data: Any, key: str, allowed: set[str], src: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PlcConfigError(f"{src}: key '{key}': expected a table")
    refuse_unknown(data, allowed, src, PlcConfigError, key)
    return data


def _int(v: Any, key: str, src: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise PlcConfigError(f"{src}: key '{key}': expected an integer {lo}..{hi}, got {v!r}")
    return v


def _address(v: Any, key: str, src: str, opcua: bool) -> Address | None:
    if v is None:
        return None
    if opcua:
        if not isinstance(v, str) or not re.match(r"^(ns=\d+;)?[isgb]=.+$", v):
            raise PlcConfigError(f"{src}: key '{key}': expected an OPC UA node id like \"ns=2;s=Line1.Reject\"")
        return v
    return _int(v, key, src, 0, 65535)


def from_dict(data: Mapping[str, Any], src: str = "<dict>", base: Path | None = None) -> PlcConfig:
    base = base or Path.cwd()
    _table(data, "", {"listen", "modbus", "opcua", "outputs", "stations", "rejects"}, src)
    lt = _table(data.get("listen"), "listen", {"host", "port", "secret_file", "console_lost_after_s"}, src)
    secret = lt.get("secret_file")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise PlcConfigError(f"{src}: key 'listen.secret_file': expected a path")
    lost = lt.get("console_lost_after_s", 30.0)
    if not isinstance(lost, (int, float)) or isinstance(lost, bool) or lost <= 0:
        raise PlcConfigError(f"{src}: key 'listen.console_lost_after_s': expected a number > 0")
    host = lt.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise PlcConfigError(f"{src}: key 'listen.host': expected an address")
    listen = Listen(
        host,
        _int(lt.get("port", 8471), "listen.port", src, 0, 65535),
        None if secret is None else (Path(secret) if Path(secret).is_absolute() else base / secret),
        float(lost),
    )
    if ("modbus" in data) == ("opcua" in data):
        raise PlcConfigError(f"{src}: key 'modbus' / 'opcua': expected exactly one of the two tables")
    modbus = opcua = None
    if "modbus" in data:
        mt = _table(data["modbus"], "modbus", {"host", "port", "device_id"}, src)
        if not isinstance(mt.get("host"), str) or not mt["host"]:
            raise PlcConfigError(f"{src}: key 'modbus.host': expected the PLC's address")
        modbus = Modbus(
            mt["host"],
            _int(mt.get("port", 502), "modbus.port", src, 1, 65535),
            _int(mt.get("device_id", 1), "modbus.device_id", src, 0, 247),
        )
    else:
        ot = _table(data["opcua"], "opcua", {"endpoint"}, src)
        if not isinstance(ot.get("endpoint"), str) or not ot["endpoint"].startswith("opc.tcp://"):
            raise PlcConfigError(f"{src}: key 'opcua.endpoint': expected opc.tcp://host:port[/path]")
        opcua = OpcUa(ot["endpoint"])
    is_ua = opcua is not None
    out = _table(data.get("outputs"), "outputs", {"alarm_active", "alarm_unacknowledged", "console_ok"}, src)
    outputs = Outputs(
        *(
            _address(out.get(k), f"outputs.{k}", src, is_ua)
            for k in ("alarm_active", "alarm_unacknowledged", "console_ok")
        )
    )
    stations = []
    for i, t in enumerate(data.get("stations", [])):
        t = _table(t, f"stations[{i}]", {"name", "endpoint", "curve"}, src)
        if not isinstance(t.get("name"), str) or not NAME.match(t["name"]):
            raise PlcConfigError(f"{src}: key 'stations[{i}].name': expected letters, digits, '_', '-'")
        if not isinstance(t.get("endpoint"), str) or not re.match(r"^(tcp|ipc|inproc)://.+", t["endpoint"]):
            raise PlcConfigError(f"{src}: key 'stations[{i}].endpoint': expected a ZeroMQ endpoint")
        curve = None
        if "curve" in t:
            ct = _table(t["curve"], f"stations[{i}].curve", {"server_public_key", "client_secret_key"}, src)
            for k in ("server_public_key", "client_secret_key"):
                if not isinstance(ct.get(k), str) or not ct[k]:
                    raise PlcConfigError(f"{src}: key 'stations[{i}].curve.{k}': expected a path")
            curve = Curve(base / ct["server_public_key"], base / ct["client_secret_key"])
        stations.append(Station(t["name"], t["endpoint"], curve))
    names = {s.name for s in stations}
    rejects = []
    for i, t in enumerate(data.get("rejects", [])):
        where = f"rejects[{i}]"
        t = _table(t, where, {"station", "camera", "pulse", "count", "pulse_ms", "verdicts"}, src)
        if t.get("station") not in names:
            raise PlcConfigError(f"{src}: key '{where}.station': expected one of the [[stations]] {sorted(names)}")
        if not isinstance(t.get("camera"), str) or not NAME.match(t["camera"]):
            raise PlcConfigError(f"{src}: key '{where}.camera': expected a camera name")
        verdicts = t.get("verdicts", ["defect"])
        if not isinstance(verdicts, list) or not verdicts or not set(verdicts) <= {"defect", "uncertain", "ok"}:
            raise PlcConfigError(f"{src}: key '{where}.verdicts': expected a list of defect / uncertain / ok")
        pulse = _address(t.get("pulse"), f"{where}.pulse", src, is_ua)
        count = _address(t.get("count"), f"{where}.count", src, is_ua)
        if pulse is None and count is None:
            raise PlcConfigError(f"{src}: key '{where}': expected pulse and/or count")
        rejects.append(
            Reject(
                t["station"],
                t["camera"],
                pulse,
                count,
                _int(t.get("pulse_ms", 200), f"{where}.pulse_ms", src, 10, 60000),
                tuple(verdicts),
            )
        )
    return PlcConfig(listen, modbus, opcua, outputs, tuple(stations), tuple(rejects), src)


def load(path: str | Path) -> PlcConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlcConfigError(f"{p}: plc config not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlcConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_dict(data, str(p), p.parent)
