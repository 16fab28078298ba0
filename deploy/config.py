"""Station deploy settings (``/etc/defectscope/deploy.toml``) and the station configs it serves.

Every path in these files is an absolute path *on the station*; with ``--root DIR``
it is looked up under ``DIR`` (``rooted``), which is how staging trees and the
tests use it. Symlinks written by ``deploy`` are relative, so a tree works the
same under any root.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from runtime.bundle.stage import MAX_BUNDLE_MIB, MAX_FILES
from runtime.config.strict import refuse_unknown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOY_CONFIG = "/etc/defectscope/deploy.toml"
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9108
# Model names and versions become directory names: no separators, no dot-files.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
RESERVED_NAMES = {"current"}


class DeployError(RuntimeError):
    """A deploy step that was refused or failed; the message says which check and where."""


class ConfigError(DeployError):
    """A deploy or station config with a missing or invalid key."""


def rooted(root: Path, path: str | PurePosixPath) -> Path:
    """Where station path ``path`` (absolute) lives under ``root``."""
    p = PurePosixPath(path)
    if not p.is_absolute():
        raise ConfigError(f"expected an absolute station path, got {str(path)!r}")
    return Path(root) / p.relative_to("/") if str(root) != "/" else Path(p)


def check_component(kind: str, value: str, where: str) -> str:
    """A model name / version safe to use as one directory name."""
    if not SAFE_NAME.match(value) or value in RESERVED_NAMES or value in {".", ".."}:
        raise DeployError(
            f"{where}: model {kind} {value!r} cannot be installed: expected letters, digits, '.', '_', '+', '-' "
            f"(starting with a letter or digit, at most 128 characters, not {sorted(RESERVED_NAMES)})"
        )
    return value


@dataclass(frozen=True)
class DeployConfig:
    """Validated ``deploy.toml``; defaults match the shipped systemd units."""

    models_dir: str = "/opt/defectscope/models"
    config_dir: str = "/etc/defectscope"
    keep: int = 3  # previous versions kept besides the active one
    max_bundle_mib: int = MAX_BUNDLE_MIB  # archive-bomb / full-disk cap, checked before anything is written
    max_files: int = MAX_FILES
    public_keys: tuple[str, ...] = ()  # non-empty: unsigned bundles are refused
    reload_command: str = "systemctl reload defectscope@{station}.service"
    status_command: str = "systemctl is-active defectscope@{station}.service"
    ready_timeout_s: float = 60.0
    readyz_url: str | None = None  # "{station}" allowed; default: from the station's [metrics]
    source: str = "(defaults)"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> DeployConfig:
        known = {
            "install": {"models_dir", "config_dir", "keep", "max_bundle_mib", "max_files"},
            "signing": {"public_keys"},
            "service": {"reload_command", "status_command", "ready_timeout_s", "readyz_url"},
        }
        refuse_unknown(data, known, where, ConfigError)  # a section is a key of the file's root
        for section, value in data.items():
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: [{section}] must be a table")
            refuse_unknown(value, known[section], where, ConfigError, section)
        install, signing, service = (data.get(s, {}) for s in ("install", "signing", "service"))

        def get(table: Mapping[str, Any], section: str, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
            value = table.get(key, default)
            if value is default:
                return value
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise ConfigError(f"{where}: key {section}.{key}: expected {expected}, got {value!r}")
            return value

        d = cls()
        keep = get(install, "install", "keep", int, d.keep)
        if keep < 0:
            raise ConfigError(f"{where}: key install.keep: expected an integer >= 0, got {keep}")
        caps = {}
        for key in ("max_bundle_mib", "max_files"):
            caps[key] = get(install, "install", key, int, getattr(d, key))
            if caps[key] < 1:
                raise ConfigError(f"{where}: key install.{key}: expected a positive integer, got {caps[key]}")
        keys = get(signing, "signing", "public_keys", list, list(d.public_keys))
        if not all(isinstance(k, str) and k.startswith("/") for k in keys):
            raise ConfigError(f"{where}: key signing.public_keys: expected a list of absolute paths, got {keys!r}")
        timeout = float(get(service, "service", "ready_timeout_s", (int, float), d.ready_timeout_s))
        if timeout <= 0:
            raise ConfigError(f"{where}: key service.ready_timeout_s: expected a positive number, got {timeout}")
        out = cls(
            models_dir=get(install, "install", "models_dir", str, d.models_dir),
            config_dir=get(install, "install", "config_dir", str, d.config_dir),
            keep=keep,
            **caps,
            public_keys=tuple(keys),
            reload_command=get(service, "service", "reload_command", str, d.reload_command),
            status_command=get(service, "service", "status_command", str, d.status_command),
            ready_timeout_s=timeout,
            readyz_url=get(service, "service", "readyz_url", str, d.readyz_url),
            source=where,
        )
        for key in ("models_dir", "config_dir"):
            if not getattr(out, key).startswith("/"):
                raise ConfigError(f"{where}: key install.{key}: expected an absolute path, got {getattr(out, key)!r}")
        return out


def load_deploy_config(root: Path, path: Path | None = None) -> DeployConfig:
    """Read ``deploy.toml`` (``path``, else ``<root>/etc/defectscope/deploy.toml``); defaults if absent."""
    explicit = path is not None
    path = Path(path) if path is not None else rooted(root, DEPLOY_CONFIG)
    if not path.is_file():
        if explicit:
            raise ConfigError(f"{path}: deploy config not found")
        return DeployConfig()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return DeployConfig.from_dict(data, str(path))


@dataclass(frozen=True)
class Station:
    """What deploy needs from one station config (the runtime validates the rest)."""

    name: str  # file stem = systemd instance (defectscope@<name>.service)
    config_path: Path  # under root
    bundle: str  # station path of [model] bundle
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_port: int = DEFAULT_METRICS_PORT
    extra: Mapping[str, Any] = field(default_factory=dict)

    def readyz_url(self, cfg: DeployConfig) -> str:
        if cfg.readyz_url:
            return cfg.readyz_url.format(station=self.name)
        # A daemon bound to all interfaces still answers on loopback.
        host = "127.0.0.1" if self.metrics_host in {"0.0.0.0", "", "*"} else self.metrics_host
        host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host and not host.startswith("[") else host)
        return f"http://{host}:{self.metrics_port}/readyz"

    def model_name(self, cfg: DeployConfig) -> str | None:
        """The model name when the station follows ``<models_dir>/<name>/current``, else None."""
        p = PurePosixPath(self.bundle)
        if p.name == "current" and p.parent.parent == PurePosixPath(cfg.models_dir):
            return p.parent.name
        return None

    def pinned_version(self, cfg: DeployConfig) -> tuple[str, str] | None:
        """``(name, version)`` when the station names a version directory directly."""
        p = PurePosixPath(self.bundle)
        if p.name != "current" and p.parent.parent == PurePosixPath(cfg.models_dir):
            return p.parent.name, p.name
        return None


def read_station(path: Path) -> Station:
    """Read the keys deploy uses from a station TOML (``[model] bundle``, ``[metrics]``)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    model = data.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("bundle"), str):
        raise ConfigError(f"{path}: key model.bundle: expected the station path of the model bundle (a string)")
    metrics = data.get("metrics", {})
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"{path}: [metrics] must be a table")
    host = metrics.get("host", DEFAULT_METRICS_HOST)
    port = metrics.get("port", DEFAULT_METRICS_PORT)
    if not isinstance(host, str):
        raise ConfigError(f"{path}: key metrics.host: expected a string, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"{path}: key metrics.port: expected a TCP port number, got {port!r}")
    return Station(name=path.stem, config_path=path, bundle=model["bundle"], metrics_host=host, metrics_port=port)


def discover_stations(root: Path, cfg: DeployConfig, names: list[str] | None = None) -> list[Station]:
    """Station configs in ``<root>/<config_dir>/*.toml`` (``deploy.toml`` excluded), optionally by name."""
    config_dir = rooted(root, cfg.config_dir)
    if names:
        found = []
        for name in names:
            path = config_dir / f"{name}.toml"
            if not path.is_file():
                raise ConfigError(f"{path}: station config for {name!r} not found")
            found.append(read_station(path))
        return found
    if not config_dir.is_dir():
        return []
    return [read_station(p) for p in sorted(config_dir.glob("*.toml")) if p.name != Path(DEPLOY_CONFIG).name]
