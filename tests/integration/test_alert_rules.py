"""k8s/monitoring checked offline: the alert rules with promtool, the dashboard's shape.

``promtool check rules`` and ``promtool test rules`` (rules_test.yaml: each
alert fires when it should, on the series it should, with its annotations,
and stays silent when it should) on the PrometheusRule's spec, which is
exactly a Prometheus rule file. That the expressions and the dashboard's
queries return data from a real cluster is test_prometheus.py's job.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .promtools import DASHBOARD, RULES_TEST, promtool, rule_file

pytestmark = pytest.mark.integration

ALERTS = {
    "TensorcacheNodeDown",
    "TensorcacheHitRateCollapse",
    "TensorcacheEvictionStorm",
    "TensorcacheNearCapacity",
    "TensorcacheEtcdUnreachable",
}


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    rule_file(tmp_path / "tensorcache.rules.yml")
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    return tmp_path


def test_promtool_check_rules(rules_dir: Path) -> None:
    got = promtool("check", "rules", str(rules_dir / "tensorcache.rules.yml"))
    assert got.returncode == 0, got.stdout + got.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in got.stdout


def test_promtool_test_rules(rules_dir: Path) -> None:
    got = promtool("test", "rules", str(rules_dir / RULES_TEST.name))
    assert got.returncode == 0, got.stdout + got.stderr
    assert "SUCCESS" in got.stdout


def test_the_rules_are_the_required_alerts_and_each_is_unit_tested(rules_dir: Path) -> None:
    rules = yaml.safe_load((rules_dir / "tensorcache.rules.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == ALERTS
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == ALERTS, "every alert needs a case where it fires"
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = _panels(dash)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"])
    titles = {p["title"] for p in panels}
    for wanted in (
        "Hit rate",
        "Access time p50 / p99",
        "Stored vs capacity per node",
        "Evictions per node",
        "Bytes in / out",
        "Errors",
        "Members and epoch changes",
    ):
        assert wanted in titles
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["description"], p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        for t in p["targets"]:
            assert "tensorcache_" in t["expr"], f"{p['title']}: {t['expr']}"
