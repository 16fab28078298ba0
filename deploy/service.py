"""Talking to the running daemon: reload it, read ``/readyz``, ask systemd for its state."""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from deploy.config import DeployConfig, DeployError, Station


@dataclass(frozen=True)
class Readiness:
    """One ``/readyz`` answer (or why there was none)."""

    url: str
    reachable: bool
    ready: bool = False
    model: dict[str, Any] | None = None
    error: str | None = None
    reload_failed: bool = False  # the daemon counted a failed reload (defectscope_model_reloads_total)
    last_reload: dict[str, Any] | None = None  # /readyz "last_reload": {"result", "error", "version"}
    cameras_down: tuple[str, ...] = ()

    @property
    def version(self) -> str | None:
        return None if self.model is None else self.model.get("version")

    def describe(self) -> str:
        if not self.reachable:
            return f"{self.url} unreachable ({self.error})"
        m = self.model or {}
        state = "ready" if self.ready else "not ready"
        failed = ""
        if self.reload_failed:
            err = (self.last_reload or {}).get("error")
            failed = f"; the daemon reports a FAILED reload ({err or 'see its journal'})"
        down = f"; camera(s) down: {', '.join(self.cameras_down)}" if self.cameras_down else ""
        return (
            f"{state}, serving {m.get('name', '?')} {m.get('version', '?')} "
            f"({m.get('artifact', '?')}, {m.get('backend', '?')}){failed}{down}"
        )


def query_readyz(url: str, timeout_s: float = 2.0) -> Readiness:
    """GET ``/readyz``; a 503 still carries the JSON body the contract specifies."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Readiness(url, reachable=False, error=str(reason))
    try:
        data = json.loads(body)
    except ValueError:
        text = body[:80].decode("utf-8", "replace").strip()
        return Readiness(
            url, reachable=True, error=f"HTTP {status}, body {text!r} is not JSON (no model version to check)"
        )
    if not isinstance(data, dict):
        return Readiness(url, reachable=True, error=f"HTTP {status}, body is not a JSON object")
    model = data.get("model") if isinstance(data.get("model"), dict) else None
    last = data.get("last_reload") if isinstance(data.get("last_reload"), dict) else None
    cameras: dict[str, Any] = data["cameras"] if isinstance(data.get("cameras"), dict) else {}
    down = tuple(
        sorted(
            k
            for k, v in cameras.items()
            if isinstance(v, dict) and (v.get("connected") is False or v.get("up") is False)
        )
    )
    if "last_reload" in data:
        # Current contract: HTTP 200 = the model is ready (a camera may be down); 503 = it is not.
        ready = status == 200 and model is not None
    else:  # older daemons: "ready" covered everything
        ready = bool(data.get("ready")) and status == 200
    return Readiness(
        url,
        reachable=True,
        ready=ready,
        model=model,
        last_reload=last,
        cameras_down=down,
        reload_failed=bool(last and last.get("result") == "failed"),
    )


def metrics_url(readyz_url: str) -> str:
    return readyz_url[: -len("/readyz")] + "/metrics" if readyz_url.endswith("/readyz") else readyz_url


def reload_failures(readyz_url: str, timeout_s: float = 2.0) -> float | None:
    """The daemon's ``defectscope_model_reloads_total{result="failure"}``, or None if unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url(readyz_url), timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", "replace")
        total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name == "defectscope_model_reloads":
                total += sum(
                    s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("result") == "failure"
                )
        return total
    except (OSError, ValueError):
        return None


def run_reload(cfg: DeployConfig, station: Station) -> None:
    """Ask the station's daemon to reload (default: ``systemctl reload defectscope@<station>``)."""
    argv = shlex.split(cfg.reload_command.format(station=station.name))
    if not argv:
        raise DeployError(f"{cfg.source}: key service.reload_command is empty")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise DeployError(
            f"reload of station {station.name}: command not found: {argv[0]!r} (service.reload_command in {cfg.source})"
        ) from None
    except subprocess.TimeoutExpired:
        raise DeployError(f"reload of station {station.name}: {' '.join(argv)} did not finish in 60 s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise DeployError(
            f"reload of station {station.name}: {' '.join(argv)} exited {proc.returncode}"
            + (f": {detail[-1]}" if detail else "")
        )


def wait_for_version(
    urls: dict[str, str],
    name: str,
    version: str,
    timeout_s: float,
    poll_s: float = 0.25,
    failures_before: dict[str, float | None] | None = None,
    reload_before: dict[str, dict[str, Any] | None] | None = None,
) -> tuple[bool, dict[str, Readiness]]:
    """Poll every station's ``/readyz`` until each is ready and serves ``name`` ``version``.

    Ready means the model is ready (HTTP 200 under the current /readyz contract): a camera
    that is down does not fail the gate. With ``reload_before`` (each daemon's ``last_reload``
    before the reload) or ``failures_before`` (its reload-failure count), a daemon that
    reports a new failed reload ends the wait at once instead of at the timeout.
    Returns (all reached it, last answer per station).
    """
    deadline = time.monotonic() + timeout_s
    last: dict[str, Readiness] = {}
    pending = dict(urls)
    failures_before = failures_before or {}
    reload_before = reload_before or {}
    while True:
        for station, url in list(pending.items()):
            r = query_readyz(url, timeout_s=min(2.0, max(0.2, deadline - time.monotonic())))
            last[station] = r
            if r.ready and r.model is not None and r.model.get("name") == name and str(r.version) == version:
                del pending[station]
                continue
            if r.last_reload is not None and r.reload_failed and r.last_reload != reload_before.get(station):
                return False, last  # /readyz says this reload failed: no need to wait for the timeout
            last[station] = dataclasses.replace(r, reload_failed=False)
            before = failures_before.get(station)
            if before is not None:
                now = reload_failures(url)
                if now is not None and now > before:
                    # The daemon records the reason before counting the failure; /readyz read above may
                    # predate both, so read it again for the reason.
                    again = query_readyz(url, timeout_s=2.0)
                    base = again if again.reachable and again.last_reload is not None else r
                    last[station] = dataclasses.replace(base, reload_failed=True)
                    return False, last
        if not pending:
            return True, last
        if time.monotonic() >= deadline:
            return False, last
        time.sleep(poll_s)


def service_state(cfg: DeployConfig, station: Station, root_is_system: bool) -> str:
    """``systemctl is-active`` for the station (or 'n/a' for a staging --root)."""
    if not root_is_system and cfg.status_command == DeployConfig.status_command:
        return "n/a (--root)"
    argv = shlex.split(cfg.status_command.format(station=station.name))
    if not argv or shutil.which(argv[0]) is None:
        return f"unknown ({argv[0] if argv else 'no status_command'} not found)"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "unknown (status command timed out)"
    out = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return out[-1] if out else f"unknown (exit {proc.returncode})"
