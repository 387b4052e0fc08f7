"""The shipped Prometheus config and rules pass promtool's checks and the rule unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[2] / "ops" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus; .ci/run installs it)")
    return exe


def _run(*args: str) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_config_is_valid(promtool):
    out = _run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert "SUCCESS" in out and "1 rule files found" in out


def test_rules_are_valid(promtool):
    for f in sorted((PROM / "rules").glob("*.yml")):
        assert "SUCCESS" in _run(promtool, "check", "rules", str(f))


def test_rule_unit_tests_pass(promtool):
    assert "SUCCESS" in _run(promtool, "test", "rules", str(PROM / "tests" / "opengem_test.yml"))


def test_a_wrong_expectation_fails(promtool, tmp_path):
    """The unit tests can fail: the same file with one expected figure changed does."""
    shutil.copytree(PROM / "rules", tmp_path / "rules")
    (tmp_path / "tests").mkdir()
    text = (PROM / "tests" / "opengem_test.yml").read_text()
    assert "published 1h 15m 0s ago" in text
    (tmp_path / "tests" / "t.yml").write_text(text.replace("published 1h 15m 0s ago", "published 1h 14m 0s ago"))
    r = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests" / "t.yml")], capture_output=True, text=True)
    assert r.returncode != 0 and "OpengemStaleModel" in r.stdout + r.stderr


def test_every_metric_in_rules_and_dashboard_exists():
    """Rules and the dashboard query only metrics opengem exports or the rules record."""
    import json
    import re

    from prometheus_client.metrics import MetricWrapperBase

    from opengem.ops import metrics

    exported = set()
    for v in vars(metrics).values():
        if isinstance(v, MetricWrapperBase):
            name = v._name
            kind = v._type
            exported |= {name + "_total"} if kind == "counter" else {name}
            if kind == "histogram":
                exported |= {name + "_bucket", name + "_sum", name + "_count"}
    rules_text = (PROM / "rules" / "opengem.yml").read_text()
    recorded = set(re.findall(r"record: ([\w:]+)", rules_text))
    exprs = rules_text + json.dumps(json.loads((PROM.parent / "grafana" / "opengem-dashboard.json").read_text()))
    used = set(re.findall(r"(?<![\w:/])(opengem_[a-z_]+)(?![\w:.])", exprs))  # not file or recorded names
    assert used, "no metric found in the rules and dashboard"
    assert used <= exported, sorted(used - exported)
    used_recorded = set(re.findall(r"\b([a-z_]*:opengem[\w:]*|opengem:[\w:]+)", exprs))
    assert used_recorded <= recorded, sorted(used_recorded - recorded)
