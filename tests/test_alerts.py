"""The chart's alerts and dashboard use only metrics, labels and label values the gateway
really exports, and the alerts fire when they should (promtool unit tests)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.authserver.metrics import AuthServerMetrics
from gateway.observe.metrics import DECISIONS, GatewayMetrics
from tests.test_helm import CHART, full_values, need_chart_tools, one, render

DASHBOARD = CHART / "dashboards" / "oauth-gateway.json"
ALERT_TESTS = CHART / "ci" / "alerts-tests.yaml"
#: labels Prometheus adds to every scraped series (ServiceMonitor targets)
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}
#: where the service identities count their sign-ins and refreshes (``_count("outcome")``)
SERVICE_CREDENTIALS = (Path(__file__).resolve().parent.parent / "gateway" / "forward"
                       / "credentials" / "service.py")
SEVERITIES = {"critical", "warning", "info"}


@dataclass(frozen=True)
class Family:
    """One exported metric family: its type and label names."""

    type: str
    labels: frozenset[str]


def exported() -> dict[str, Family]:
    """Sample names -> family, from the registry a gateway app with the built-in
    authorization server serves on /metrics."""
    metrics = GatewayMetrics()
    as_metrics = AuthServerMetrics(metrics.registry)
    collectors = [*vars(metrics).values(), *vars(as_metrics).values()]
    labels = {c._name: frozenset(c._labelnames) for c in collectors  # prometheus_client's own
              if hasattr(c, "_labelnames") and hasattr(c, "_name")}
    out: dict[str, Family] = {}
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "gauge": [""]}[family.type]
        for suffix in suffixes:
            extra = {"le"} if suffix == "_bucket" else set()
            out[family.name + suffix] = Family(family.type, labels[family.name] | extra)
    return out


def known_label_values() -> dict[str, set[str]]:
    """Values of enumerated labels: the pre-bound children's, and the decisions."""
    values: dict[str, set[str]] = {"decision": set(DECISIONS)}
    # the credential outcomes are not pre-bound: the ones service.py counts
    credential_outcomes = set(re.findall(r'_count\("(\w+)"\)', SERVICE_CREDENTIALS.read_text()))
    assert credential_outcomes, "no credential outcomes found"
    values["outcome"] = credential_outcomes
    registry = GatewayMetrics().registry
    for family in registry.collect():
        for sample in family.samples:
            for name, value in sample.labels.items():
                if name in {"layer", "result", "outcome"}:
                    values.setdefault(name, set()).add(value)
    return values


SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
METRIC = re.compile(r"\bgateway_[a-z_]+\b")


def expression_problems(expr: str) -> list[str]:
    """What in a PromQL expression the gateway does not export."""
    families = exported()
    known = known_label_values()
    problems = [f"{name}: not exported" for name in METRIC.findall(expr) if name not in families]
    used: set[str] = set()
    for name, matchers in SELECTOR.findall(expr):
        family = families.get(name)
        if family is None:
            problems.append(f"{name}: not exported")
            continue
        used |= family.labels
        for label, op, value in MATCHER.findall(matchers):
            if label not in family.labels | TARGET_LABELS:
                problems.append(f"{name}: no label {label}")
            elif op in ("=", "!=") and label in known and value not in known[label]:
                problems.append(f"{name}: {label} is never {value!r}")
    for group in GROUPING.findall(expr):
        for label in (g.strip() for g in group.split(",") if g.strip()):
            if label not in used | TARGET_LABELS:
                problems.append(f"grouping by {label}: no metric here has it")
    return problems


def test_the_checker_catches_what_it_should() -> None:
    assert expression_problems('sum by (route) (rate(gateway_requests_total{status=~"5.."}[5m]))'
                               ) == []
    assert expression_problems("rate(gateway_request_total[5m])") == [
        "gateway_request_total: not exported"]
    assert expression_problems('rate(gateway_auth_decisions_total{decision="denied"}[5m])') == [
        "gateway_auth_decisions_total: decision is never 'denied'"]
    assert expression_problems('sum by (client_id) (rate(gateway_requests_total{}[5m]))') == [
        "grouping by client_id: no metric here has it"]
    assert expression_problems("gateway_client_window_requests{layer=\"local\"}") == [
        "gateway_client_window_requests: no label layer"]
    assert expression_problems(
        'gateway_upstream_credential_refreshes_total{outcome="sign_in_refused"}') == []
    assert expression_problems(
        'gateway_upstream_credential_refreshes_total{outcome="expired"}') == [
        "gateway_upstream_credential_refreshes_total: outcome is never 'expired'"]


# -- alerts ----------------------------------------------------------------------------

def test_alert_template_names_only_exported_metrics() -> None:
    """Without helm: every metric name in the PrometheusRule template is exported."""
    text = (CHART / "templates" / "prometheusrule.yaml").read_text()
    names = set(METRIC.findall(text))
    assert names and names <= set(exported())


def rendered_rules(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    objects = render({"prometheusRule": {"enabled": True}, **(values or {})})
    rules: list[dict[str, Any]] = one(objects, "PrometheusRule")["spec"]["groups"][0]["rules"]
    return rules


def test_alerts_cover_the_failure_modes_with_complete_annotations() -> None:
    rules = rendered_rules()
    assert [r["alert"] for r in rules] == [
        "OAuthGatewayClientDenySpike", "OAuthGatewayIntrospectionErrors",
        "OAuthGatewayIntrospectionSlow", "OAuthGatewayUpstream5xx",
        "OAuthGatewayRedisUnreachable", "OAuthGatewayRefreshTokenReuse",
        "OAuthGatewayServiceCredentialExpiring", "OAuthGatewayServiceSignInRefused"]
    for rule in rules:
        assert expression_problems(rule["expr"]) == [], rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}, rule["alert"]
        assert all(len(text) > 20 for text in rule["annotations"].values())
        assert re.fullmatch(r"\d+[smh]", rule["for"])
    by_name = {r["alert"]: r for r in rules}
    deny = by_name["OAuthGatewayClientDenySpike"]["expr"]
    assert 'decision!="allowed"' in deny and "by (namespace, client_id)" in deny
    assert "histogram_quantile(0.99" in by_name["OAuthGatewayIntrospectionSlow"]["expr"]
    assert 'outcome="error"' in by_name["OAuthGatewayIntrospectionErrors"]["expr"]
    # the upstream's own answers: the gateway's 502/504 (and 503) are not the upstream's
    upstream5xx = by_name["OAuthGatewayUpstream5xx"]["expr"]
    assert 'gateway_upstream_responses_total{' in upstream5xx \
        and 'status_class="5xx"' in upstream5xx and "gateway_requests_total" not in upstream5xx
    redis_down = by_name["OAuthGatewayRedisUnreachable"]["expr"]
    assert "gateway_redis_up" in redis_down and "by (namespace)" in redis_down  # one alert
    assert by_name["OAuthGatewayRefreshTokenReuse"]["for"] == "0m"
    # the gauge is the time left: the fleet's newest token counts
    expiring = by_name["OAuthGatewayServiceCredentialExpiring"]
    assert "max by (namespace, identity) (gateway_upstream_credential_expiry_seconds" \
        in expiring["expr"]
    assert ")\n    < 300\n" in expiring["expr"] and expiring["for"] == "2m"
    assert 'outcome="sign_in_refused"' in by_name["OAuthGatewayServiceSignInRefused"]["expr"]


def test_alerts_follow_their_values() -> None:
    values = full_values()
    rules = rendered_rules({k: values[k] for k in ("prometheusRule", "fullnameOverride")})
    by_name = {r["alert"]: r for r in rules}
    assert [r["alert"] for r in rules][-1] == "OAuthGatewayPolicyReloadFailed"  # extraRules
    spike = by_name["OAuthGatewayClientDenySpike"]
    assert spike["labels"] == {"severity": "critical", "team": "identity"}
    assert spike["for"] == "10m" and "> 2\n" in spike["expr"] and "> 0.5\n" in spike["expr"]
    assert 'namespace="gateway", service="anaplan-gateway-metrics"' in spike["expr"]
    assert spike["annotations"]["runbook_url"] == (
        "https://runbooks.example.com/oauth-gateway#oauthgatewayclientdenyspike")
    for rule in rules:
        assert expression_problems(rule["expr"]) == [], rule["alert"]
    disabled = rendered_rules({"prometheusRule": {"enabled": True, "alerts": {
        "refreshReuse": {"enabled": False}}}})
    assert "OAuthGatewayRefreshTokenReuse" not in [r["alert"] for r in disabled]
    expiring = by_name["OAuthGatewayServiceCredentialExpiring"]
    assert expiring["for"] == "5m" and "< 600\n" in expiring["expr"]
    assert expiring["labels"] == {"severity": "warning", "team": "identity"}
    refused = by_name["OAuthGatewayServiceSignInRefused"]
    assert refused["for"] == "1m" and refused["labels"]["severity"] == "warning"
    off = rendered_rules({"prometheusRule": {"enabled": True, "alerts": {
        "credentialExpiry": {"enabled": False}, "credentialSignInRefused": {"enabled": False}}}})
    assert not {"OAuthGatewayServiceCredentialExpiring", "OAuthGatewayServiceSignInRefused"} \
        & {r["alert"] for r in off}


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        reason = "promtool not found (Debian: apt-get install prometheus)"
        if os.environ.get("CHART_TOOLS_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


def test_promtool_checks_the_rules_and_the_alerts_fire_on_synthetic_series(
        tmp_path: Path) -> None:
    """ci/alerts-tests.yaml: refresh reuse (a counter that grows, and one created by its
    first event), a deny spike (and a busy and a quiet client that must not fire), Redis,
    a service token expiring while renewals fail (and an idle one that must not fire),
    refused sign-ins, the upstream's own 5xx (and the gateway's own 502s, which must not
    fire)."""
    need_chart_tools()
    exe = promtool()
    objects = render({"prometheusRule": {"enabled": True}}, release="oauth-gateway",
                     namespace="oauth-gateway")
    rules = {"groups": one(objects, "PrometheusRule")["spec"]["groups"]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts-tests.yaml")
    check = subprocess.run([exe, "check", "rules", "rules.yaml"], cwd=tmp_path,
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    test = subprocess.run([exe, "test", "rules", "alerts-tests.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, check=False)
    assert test.returncode == 0, test.stdout + test.stderr
    # the same unit tests fail on weaker rules: a refresh-reuse rule that only looks at
    # increase(), expiry rules that take the stalest replica or ignore whether renewals fail
    by_name = {r["alert"]: r for r in rules["groups"][0]["rules"]}
    reuse = by_name["OAuthGatewayRefreshTokenReuse"]["expr"]
    expiring = by_name["OAuthGatewayServiceCredentialExpiring"]["expr"]
    # counting every answer of the gateway's, its own 502s included
    all_5xx = by_name["OAuthGatewayUpstream5xx"]["expr"].replace(
        "gateway_upstream_responses_total", "gateway_requests_total").replace(
        'status_class="5xx"', 'status=~"5.."')
    for alert, wrong, victim in (
            ("OAuthGatewayUpstream5xx", all_5xx, 'route="unreachable"'),
            ("OAuthGatewayRefreshTokenReuse", reuse.partition("\nor\n")[0],
             'client_id="first-reuse"'),
            ("OAuthGatewayServiceCredentialExpiring", expiring.replace("max by", "min by"),
             'identity="busy"'),
            ("OAuthGatewayServiceCredentialExpiring", expiring.partition("\nand on")[0],
             'identity="idle"')):
        weak = copy.deepcopy(rules)
        next(r for r in weak["groups"][0]["rules"] if r["alert"] == alert)["expr"] = wrong
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(weak))
        weaker = subprocess.run([exe, "test", "rules", "alerts-tests.yaml"], cwd=tmp_path,
                                capture_output=True, text=True, check=False)
        assert weaker.returncode != 0 and victim in weaker.stdout + weaker.stderr, victim


# -- dashboard -------------------------------------------------------------------------

def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_dashboard_queries_use_exported_metrics_and_defined_variables() -> None:
    board = dashboard()
    variables = {v["name"] for v in board["templating"]["list"]}
    assert variables == {"datasource", "namespace", "client"}
    builtins = {"__rate_interval", "__interval", "__range"}
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            expr = target["expr"]
            assert expression_problems(expr) == [], panel["title"]
            for var in re.findall(r"\$\{?(\w+)", expr):
                assert var in variables | builtins, (panel["title"], var)
    for variable in board["templating"]["list"]:
        query = variable.get("definition", "")
        assert expression_problems(query.replace("label_values(", "(")) == []


def test_dashboard_shows_what_operators_asked_for() -> None:
    used = " ".join(t["expr"] for p in panels() for t in p["targets"])
    for metric in ("gateway_client_window_requests", "gateway_client_window_distinct_tokens",
                   "gateway_auth_decisions_total", "gateway_token_cache_requests_total",
                   "gateway_request_duration_seconds_bucket",
                   "gateway_upstream_duration_seconds_bucket",
                   "gateway_introspection_duration_seconds_bucket", "gateway_requests_total",
                   "gateway_redis_errors_total", "gateway_as_refresh_reuse_detected_total",
                   "gateway_upstream_credential_expiry_seconds",
                   "gateway_upstream_credential_refreshes_total"):
        assert metric in used, metric
    titles = {p["title"] for p in panels()}
    assert {"Cache hit ratio by layer", "Decisions/s by type", "Requests per client",
            "Distinct tokens per client", "Requests/s by route and status"} <= titles
    assert 'histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket' \
        in used
    # the expiry gauge is the time left: the fleet's newest token is shown
    assert "max by (identity) (gateway_upstream_credential_expiry_seconds" \
        "{namespace=~\"$namespace\"})" in used and "time()" not in used


def test_dashboard_layout_is_sound() -> None:
    board = dashboard()
    assert board["uid"] == "oauth-gateway" and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
