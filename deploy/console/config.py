"""The console's TOML config: server, store, stations (ZeroMQ endpoints + CURVE), users; validated on load.

Every error names the file and key and says what was expected. Defaults live here once and
are read by the CLI help and the docs (docs/contracts.md, "Line console").
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.console import alarm_rules
from deploy.console import shifts as shift_config
from deploy.console.alarm_rules import AlarmConfig
from deploy.console.shifts import Shifts
from runtime.config.strict import refuse_unknown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_HOST = "127.0.0.1"  # localhost only unless the config says otherwise
DEFAULT_PORT = 8470
DEFAULT_STORE = "sqlite:////var/lib/defectscope-console/results.db"
ROLES = ("operator", "engineer", "admin")  # admin: engineer + user management
# Station / camera names become URL path segments and snapshot-name parts.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ConsoleConfigError(ValueError):
    """A console config with a missing or invalid key; the message names file and key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    kiosk: bool = False  # read-only live page without login (wall screens)
    secure_cookies: bool = False  # set behind an HTTPS reverse proxy
    session_max_age_s: int = 12 * 3600
    coalesce_ms: int = 250  # at most one push per tile per interval to each browser
    down_after_s: float = 3.0  # no heartbeat for this long: station shown down
    stale_after_s: float = 5.0  # a tile with no verdict for this long shows STALE, never its last verdict
    events: int = 50  # recent defect/uncertain events kept for the live page
    shift_hours: float = 8.0  # "last shift" for the defect-rate table
    good_class: str = "ok"  # the label a rejected (false-alarm) defect gets in exports
    max_snapshot_bytes: int = 8 * 1024 * 1024
    max_body_bytes: int = 64 * 1024  # larger request bodies are refused (413) before they are read
    # Behind a reverse proxy: peers (IPs / CIDRs) whose X-Forwarded-Proto/-For/-Host are believed.
    forwarded_allow_ips: tuple[str, ...] = ()
    # Host names the console answers to (DNS rebinding); empty = loopback names only.
    allowed_hosts: tuple[str, ...] = ()
    login_max_failures: int = 5  # per user and per client address before a lockout
    login_lockout_s: float = 30.0  # first lockout; doubles with each further failure
    login_lockout_max_s: float = 900.0
    login_max_concurrent: int = 2  # argon2 verifications at once (64 MiB each)
    station_max_msgs_per_s: float = 2000.0  # per station token bucket (burst: one second's worth)
    station_max_bytes_per_s: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class StoreConfig:
    url: str = DEFAULT_STORE  # SQLAlchemy URL: sqlite:///PATH or postgresql+psycopg://user@host/db
    retention_days: float = 30.0  # unreviewed verdicts older than this are deleted; 0 = keep all
    flush_ms: int = 200  # batch inserts: one transaction per interval


@dataclass(frozen=True)
class CurveClient:
    server_public_key: Path  # the station's public certificate (zmq.auth .key file)
    client_secret_key: Path  # this console's .key_secret certificate


@dataclass(frozen=True)
class StationEntry:
    name: str
    endpoint: str
    snapshot_dir: Path | None = None  # where this console reads the station's snapshot spool
    curve: CurveClient | None = None


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str  # argon2id (defectscope console hash-password)


@dataclass(frozen=True)
class ConsoleConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    stations: tuple[StationEntry, ...] = ()
    users: tuple[User, ...] = ()
    source: str = "<defaults>"
    alarms: AlarmConfig = field(default_factory=AlarmConfig)
    shifts: Shifts | None = None  # None: one "day" shift in UTC; pages show the browser's zone

    def station(self, name: str) -> StationEntry | None:
        return next((s for s in self.stations if s.name == name), None)


def _typed(table: Mapping[str, Any], cls: type, where: str, src: str) -> Any:
    """Build dataclass ``cls`` from ``table``, checking unknown keys and value types against defaults."""
    known = {f.name: f for f in cls.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    refuse_unknown(table, known, src, ConsoleConfigError, where)
    out: dict[str, Any] = {}
    for key, value in table.items():
        default = known[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            value = tuple(value) if ok else value
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
            value = type(default)(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = "list of strings" if isinstance(default, tuple) else type(default).__name__
            raise ConsoleConfigError(
                f"{src}: key '{where}.{key}': expected a {kind}"
                f"{' >= 0' if isinstance(default, (int, float)) and not isinstance(default, bool) else ''}, "
                f"got {value!r}"
            )
        out[key] = value
    return cls(**out)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _check_server(server: ServerConfig, src: str) -> None:
    for ip in server.forwarded_allow_ips:
        try:
            ipaddress.ip_network(ip, strict=False)
        except ValueError:
            raise ConsoleConfigError(
                f"{src}: key 'server.forwarded_allow_ips': {ip!r} is not an IP address or "
                f"network (like 127.0.0.1 or 10.0.0.0/24)"
            ) from None
    for name in server.allowed_hosts:
        if not re.match(r"^(\*\.)?[A-Za-z0-9.:\[\]-]{1,253}$", name) or "*" in name[1:]:
            raise ConsoleConfigError(
                f"{src}: key 'server.allowed_hosts': {name!r} is not a host name "
                f"(like console.plant.example or *.plant.example)"
            )
    if not server.allowed_hosts and server.host not in (*LOOPBACK_HOSTS, "localhost"):
        raise ConsoleConfigError(
            f"{src}: key 'server.allowed_hosts': required when server.host is "
            f"{server.host!r}: the names browsers use to reach the console"
        )
    if server.login_max_concurrent < 1 or server.login_max_failures < 1:
        raise ConsoleConfigError(
            f"{src}: key 'server.login_max_concurrent' / 'server.login_max_failures': expected >= 1"
        )
    if server.max_body_bytes < 1024:
        raise ConsoleConfigError(f"{src}: key 'server.max_body_bytes': expected >= 1024")


def allowed_hosts(server: ServerConfig) -> list[str]:
    """The Host names accepted; loopback names always (the machine's own browser, health checks)."""
    return list(dict.fromkeys([*server.allowed_hosts, *LOOPBACK_HOSTS, "[::1]"]))


def _path(base: Path, value: Any, key: str, src: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConsoleConfigError(f"{src}: key '{key}': expected a path string, got {value!r}")
    p = Path(value)
    return p if p.is_absolute() else (base / p)


def _station(i: int, t: Any, base: Path, src: str) -> StationEntry:
    where = f"stations[{i}]"
    if not isinstance(t, Mapping):
        raise ConsoleConfigError(f"{src}: key '{where}': expected a table")
    refuse_unknown(t, ("name", "endpoint", "snapshot_dir", "curve"), src, ConsoleConfigError, where)
    name = t.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConsoleConfigError(f"{src}: key '{where}.name': expected letters, digits, '_', '-', got {name!r}")
    ep = t.get("endpoint")
    if not isinstance(ep, str) or not re.match(r"^(tcp|ipc|inproc)://.+", ep):
        raise ConsoleConfigError(
            f"{src}: key '{where}.endpoint': expected a ZeroMQ endpoint like tcp://10.0.0.3:5555, got {ep!r}"
        )
    snap = _path(base, t["snapshot_dir"], f"{where}.snapshot_dir", src) if "snapshot_dir" in t else None
    curve = None
    if "curve" in t:
        c = t["curve"]
        if not isinstance(c, Mapping) or set(c) != {"server_public_key", "client_secret_key"}:
            raise ConsoleConfigError(
                f"{src}: key '{where}.curve': expected a table with server_public_key and client_secret_key"
            )
        curve = CurveClient(
            _path(base, c["server_public_key"], f"{where}.curve.server_public_key", src),
            _path(base, c["client_secret_key"], f"{where}.curve.client_secret_key", src),
        )
    return StationEntry(name, ep, snap, curve)


def _user(i: int, t: Any, src: str) -> User:
    where = f"users[{i}]"
    if not isinstance(t, Mapping) or set(t) != {"name", "role", "password_hash"}:
        raise ConsoleConfigError(f"{src}: key '{where}': expected a table with name, role, password_hash")
    if not isinstance(t["name"], str) or not NAME.match(t["name"]):
        raise ConsoleConfigError(f"{src}: key '{where}.name': expected letters, digits, '_', '-'")
    if t["role"] not in ROLES:
        raise ConsoleConfigError(f"{src}: key '{where}.role': expected one of {ROLES}, got {t['role']!r}")
    h = t["password_hash"]
    if not isinstance(h, str) or not (h.startswith("$argon2id$") or h.startswith("$argon2i$")):
        raise ConsoleConfigError(
            f"{src}: key '{where}.password_hash': expected an argon2 hash "
            f"(make one with `defectscope console hash-password`)"
        )
    return User(t["name"], t["role"], h)


def from_dict(data: Mapping[str, Any], src: str = "<dict>", base: Path | None = None) -> ConsoleConfig:
    base = base or Path.cwd()
    refuse_unknown(data, ("server", "store", "stations", "users", "alarms", "shifts"), src, ConsoleConfigError)
    server = _typed(data.get("server", {}), ServerConfig, "server", src)
    store = _typed(data.get("store", {}), StoreConfig, "store", src)
    if server.coalesce_ms < 20:
        raise ConsoleConfigError(f"{src}: key 'server.coalesce_ms': expected >= 20 (browsers cannot draw faster)")
    _check_server(server, src)
    stations = tuple(_station(i, t, base, src) for i, t in enumerate(data.get("stations", [])))
    names = [s.name for s in stations]
    if len(set(names)) != len(names):
        raise ConsoleConfigError(f"{src}: key 'stations': station names repeat: {names}")
    users = tuple(_user(i, t, src) for i, t in enumerate(data.get("users", [])))
    if len({u.name for u in users}) != len(users):
        raise ConsoleConfigError(f"{src}: key 'users': user names repeat")
    try:
        alarms = alarm_rules.parse(data.get("alarms"), src, base)
    except alarm_rules.AlarmConfigError as exc:
        raise ConsoleConfigError(str(exc)) from None
    try:
        shifts = shift_config.parse(data.get("shifts"), src)
    except shift_config.ShiftConfigError as exc:
        raise ConsoleConfigError(str(exc)) from None
    return ConsoleConfig(server, store, stations, users, src, alarms, shifts)


def load(path: str | os.PathLike[str]) -> ConsoleConfig:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConsoleConfigError(f"{p}: console config not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConsoleConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_dict(data, str(p), p.parent)
