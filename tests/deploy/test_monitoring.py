"""Prometheus rules, their promtool unit tests, the scrape config and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import MONITORING_DIR
from tests.conftest import require_tool

RULES = MONITORING_DIR / "rules/defectscope.rules.yml"
RULE_TESTS = MONITORING_DIR / "tests/defectscope.rules.test.yml"
DASHBOARD = MONITORING_DIR / "grafana/defectscope-fleet.json"
CONTRACTS = Path(__file__).resolve().parents[2] / "docs/contracts.md"
# Series that are not defectscope_* but that the rules and dashboard may use.
OTHER_SERIES = {"up", "process_start_time_seconds", "ALERTS"}
REQUIRED_ALERTS = {
    "DefectScopeCameraDown",
    "DefectScopeNoFrames",
    "DefectScopeDefectRateSpike",
    "DefectScopeInferenceLatencyHigh",
    "DefectScopeFramesDropped",
    "DefectScopePublishErrors",
    "DefectScopeModelVersionSkew",
    "DefectScopeRestarting",
    "DefectScopeSubscriberDropped",
    "DefectScopeThermalThrottling",
    "DefectScopeGpuSaturated",
}


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True, cwd=cwd)


def _alerts() -> dict[str, dict]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


def _records() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_rules_and_config_pass_promtool_check():
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _promtool("check", "config", str(MONITORING_DIR / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass():
    proc = _promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_case():
    alerts = _alerts()
    assert REQUIRED_ALERTS <= set(alerts)
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for name in alerts:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test case where it stays silent"


@pytest.mark.parametrize("alert", sorted(REQUIRED_ALERTS))
def test_unit_tests_fail_when_an_alert_is_broken(tmp_path, alert):
    """Mutation check: an alert that can never fire must make `promtool test rules` fail."""
    rules = yaml.safe_load(RULES.read_text())
    for g in rules["groups"]:
        for r in g["rules"]:
            if r.get("alert") == alert:
                r["expr"] = "vector(0) > 1"
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules/defectscope.rules.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests/t.yml").write_text(RULE_TESTS.read_text())
    proc = _promtool("test", "rules", "tests/t.yml", cwd=tmp_path)
    assert proc.returncode != 0 and alert in proc.stdout + proc.stderr


def _contract_metrics() -> set[str]:
    return set(re.findall(r"`(defectscope_[a-z_]+)", CONTRACTS.read_text()))


def _used_series(text: str) -> set[str]:
    names = set(re.findall(r"\b(defectscope_[a-z_]+)", text))
    base = {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}
    return base


def test_rules_and_dashboard_use_only_contract_metric_names():
    contract = _contract_metrics()
    assert "defectscope_frames_captured_total" in contract  # the contract parsed
    for path in (RULES, DASHBOARD):
        unknown = _used_series(path.read_text()) - contract
        assert not unknown, f"{path.name} uses metrics not in docs/contracts.md: {sorted(unknown)}"
    # Recording rules the dashboard reads exist.
    recorded = set(re.findall(r"\b(defectscope:[a-z0-9_:]+)", DASHBOARD.read_text()))
    assert recorded <= _records(), recorded - _records()


def test_runtime_exports_every_metric_the_rules_use():
    """The runtime's own registry (not just the contract text) has every series the alerts read."""
    metrics = pytest.importorskip("runtime.serving.metrics")
    m = metrics.Metrics(cameras=["cam0"], classes=["defect"])
    exported = set()
    for family in m.registry.collect():
        exported |= {s.name for s in family.samples}
    exported = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in exported} | {
        f.name for f in m.registry.collect()
    }
    exported |= {n + "_total" for n in exported}
    needed = _used_series(RULES.read_text()) | {"process_start_time_seconds"}
    missing = {n for n in needed if n not in exported}
    assert not missing, f"rules read series the runtime does not export: {sorted(missing)}"


def test_dashboard_is_valid_grafana_json_with_valid_promql(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "station", "camera"} <= variables
    exprs = []
    for p in panels:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        exprs += [t["expr"] for t in p["targets"]]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    # Let promtool parse every query: Grafana's variables replaced by what Grafana would send.
    subst = {"$__rate_interval": "1m", "$station": ".*", "$camera": ".*"}
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, e in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        assert "$" not in e, e
        rules["groups"][0]["rules"].append({"record": f"dashboard:q{i}", "expr": e})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = _promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
