"""The alerting rules of monitoring/alerts.yml: valid, and each alert fires on its test series and
stays quiet on a normal one (`promtool test rules monitoring/alerts_test.yml`); and every metric
they read is one the server or the training actually exports."""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from .conftest import REPO, require_tool

RULES, RULE_TESTS = REPO / "monitoring" / "alerts.yml", REPO / "monitoring" / "alerts_test.yml"
ALERTS = {"FirstAudioLatencyHigh", "ErrorRateHigh", "PlaybackGaps", "EngineStalled", "MemoryNearLimit",
          "TrainingStoppedLogging"}


def _promtool(*args: str) -> str:
    require_tool("promtool", shutil.which("promtool") is not None, "Debian package prometheus")
    result = subprocess.run(["promtool", *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_rules_are_valid_and_each_alert_fires_in_its_test_and_not_on_normal_series():
    assert "6 rules found" in _promtool("check", "rules", RULES.name)
    assert {rule["alert"] for rule in _rules()} == ALERTS
    tested = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tested for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == ALERTS, "every alert has a series where it must fire"
    assert "SUCCESS" in _promtool("test", "rules", RULE_TESTS.name)


def test_the_rules_read_only_metrics_that_are_exported(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from serving.app import Metrics
    from tasks.training.tracker import TrainingProgress

    exported = {sample.name for metric in Metrics().registry.collect() for sample in metric.samples}
    exported |= {f"{metric.name}_total" for metric in Metrics().registry.collect() if metric.type == "counter"}
    progress = TrainingProgress(tmp_path / "training-s2s.prom", "s2s")
    progress.write(3, running=True)
    text = (tmp_path / "training-s2s.prom").read_text()
    exported |= {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert 's2s_training_running{stage="s2s"} 1.0' in text
    for rule in _rules():
        names = set(re.findall(r"\b((?:s2s|process)_[a-z_]+)\b", rule["expr"]))
        assert names and names <= exported, f"{rule['alert']}: {names - exported} not exported"


def test_the_grafana_dashboard_queries_only_exported_metrics_and_each_is_valid_promql(tmp_path):
    """The dashboard JSON (monitoring/grafana-dashboard.json) is not rendered here: its queries are
    checked to read exported metrics, and each is parsed by promtool as a recording rule."""
    import json

    from serving.app import Metrics

    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    collected = list(Metrics().registry.collect())
    exported = {sample.name for metric in collected for sample in metric.samples}
    exported |= {f"{metric.name}_total" for metric in collected if metric.type == "counter"}
    exported |= {"s2s_training_last_log_timestamp_seconds", "s2s_training_running"}
    for expr in exprs:
        names = set(re.findall(r"\b((?:s2s|process)_[a-z_]+)\b", expr))
        assert names and names <= exported, f"{expr}: {names - exported} not exported"
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    require_tool("promtool", shutil.which("promtool") is not None, "Debian package prometheus")
    result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "dashboard-rules.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
