"""``deploy status``: the installed versions of each model, the active one, and what each station's
service and daemon report (``/readyz``), as one JSON-ready dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.config import DeployConfig, discover_stations
from deploy.service import query_readyz, service_state
from deploy.store import ModelStore


def status_report(
    root: Path, cfg: DeployConfig, store: ModelStore, is_system_root: bool, query: bool = True
) -> dict[str, Any]:
    """Installed versions, the active one, and (``query``) what each station's service and daemon report."""
    models = {}
    for name in store.names():
        state = store.read_state(name)
        last: dict[str, dict[str, Any]] = {}
        for h in state.history:
            last[h["version"]] = h
        versions = []
        for v in reversed(store.versions(name)):
            rec = state.installed.get(v, {})
            versions.append(
                {
                    "version": v,
                    "active": v == store.current(name),
                    "installed_at": rec.get("at"),
                    "signed_by": rec.get("signed_by"),
                    "last_activated": last.get(v, {}).get("at"),
                    "health": last.get(v, {}).get("health"),
                }
            )
        models[name] = {
            "current": store.current(name),
            "path": str(store.model_dir(name)),
            "versions": versions,
        }
    stations = []
    for st in discover_stations(root, cfg):
        entry: dict[str, Any] = {
            "name": st.name,
            "config": str(st.config_path),
            "bundle": st.bundle,
            "follows": st.model_name(cfg),
        }
        if query:
            entry["service"] = service_state(cfg, st, is_system_root)
            r = query_readyz(st.readyz_url(cfg))
            entry["readyz"] = {
                "url": r.url,
                "reachable": r.reachable,
                "ready": r.ready,
                "model": r.model,
                "error": r.error,
            }
            expected = models.get(st.model_name(cfg) or "", {}).get("current")
            entry["in_sync"] = expected is not None and r.version == expected
        stations.append(entry)
    signing = {"required": bool(cfg.public_keys), "public_keys": list(cfg.public_keys)}
    return {
        "root": str(root),
        "models_dir": str(store.models_dir),
        "signing": signing,
        "models": models,
        "stations": stations,
    }
