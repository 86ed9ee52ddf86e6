#!/usr/bin/env python3
"""Lint, render and validate the Helm chart in ``helm/oauth-gateway``, and check its alerts.

Runs on the interpreter of a separate virtual environment that has the chart tools
(CI makes it; see the chart's README, "Testing the chart")::

    python -m venv build/helm-venv
    build/helm-venv/bin/pip install helm-python-sdk kubernetes-validate
    build/helm-venv/bin/python tools/helm_check.py            # everything, non-zero on failure

Helm comes from the PyPI package ``helm-python-sdk`` (Helm v4's Go SDK as a C library:
``helm lint`` and ``helm template`` with no ``helm`` binary and no cluster). The rendered
objects are validated with ``kubernetes-validate`` against the Kubernetes schemas it bundles,
for the oldest Kubernetes the chart supports and the newest one the package knows. The
Prometheus Operator's kinds (ServiceMonitor, PrometheusRule) have no schema there: they are
checked structurally, and the alert rules go through ``promtool check rules`` and the unit
tests in ``helm/oauth-gateway/ci/alerts-tests.yaml`` (``promtool test rules``).

Subcommands (``-f VALUES`` and ``--set-json PATH=JSON`` as with helm):

- ``all`` (default): lint and render with default and full values, validate, check alerts.
- ``lint``: ``helm lint --strict``; prints the findings.
- ``render``: ``helm template``; prints a JSON list of ``{"template", "manifest"}``.
- ``render-batch``: reads a JSON list of value sets on standard input, prints one render
  (or ``{"error": ...}``) per set; one process for many renders.
- ``validate``: render, then schema-validate every object.
- ``rules``: render, then print the PrometheusRule's rule groups as a rules file (YAML).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "oauth-gateway"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
ALERT_TESTS = CHART / "ci" / "alerts-tests.yaml"
# release and namespace the alert unit tests' series are labelled with
ALERT_TEST_RELEASE = "oauth-gateway"
ALERT_TEST_NAMESPACE = "oauth-gateway"
MIN_KUBE_VERSION = "1.25.0"
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                  ("monitoring.coreos.com/v1", "PrometheusRule")}

Manifest = dict[str, Any]


class CheckFailed(Exception):
    """A check found a problem; the message says which."""


# -- values ----------------------------------------------------------------------------

def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively for mappings (as helm merges -f files)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set_json(expression: str) -> dict[str, Any]:
    """``a.b.c=<json>`` -> ``{"a": {"b": {"c": <json>}}}``."""
    path, sep, raw = expression.partition("=")
    if not sep or not path:
        raise CheckFailed(f"--set-json: expected PATH=JSON, got {expression!r}")
    value: Any = json.loads(raw)
    for key in reversed(path.split(".")):
        value = {key: value}
    return value  # type: ignore[no-any-return]


def user_values(files: list[str], sets: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in files:
        loaded = yaml.safe_load(Path(name).read_text()) or {}
        values = deep_merge(values, loaded)
    for expression in sets:
        values = deep_merge(values, parse_set_json(expression))
    return values


# -- helm ------------------------------------------------------------------------------

def _helm() -> Any:
    try:
        import helm_python
    except ImportError:
        raise CheckFailed(
            "helm_python is not importable: run this with the chart tools' interpreter "
            "(pip install helm-python-sdk kubernetes-validate)") from None
    helm_python.disable_logging()
    return helm_python


def lint(values: dict[str, Any], what: str) -> list[str]:
    """``helm lint --strict``: the findings of severity warning and above."""
    helm = _helm()
    report = helm.lint(str(CHART), values or None, strict=True,
                       namespace=ALERT_TEST_NAMESPACE)
    problems = [f"{what}: {m.get('path', '')}: {m.get('error', '')}"
                for m in report.get("messages", []) if int(m.get("severity", 0)) >= 2]
    problems += [f"{what}: {e}" for e in report.get("errors", []) or []]
    return problems


def render(values: dict[str, Any], release: str = "gw",
           namespace: str = "gateway") -> list[dict[str, Any]]:
    """``helm template``: ``[{"template": path, "manifest": object}]`` in template order."""
    helm = _helm()
    with helm.Chart.load(str(CHART)) as chart:
        try:
            chart.validate_schema(values or None)
            rendered = chart.render(values or None, name=release, namespace=namespace,
                                    is_install=True)
        except helm.HelmError as exc:
            raise CheckFailed(str(exc)) from None
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                out.append({"template": path, "manifest": doc})
    return out


# -- validation ------------------------------------------------------------------------

def _kube_versions() -> list[str]:
    import kubernetes_validate.utils as kv

    return [MIN_KUBE_VERSION, kv.latest_version()]


def validate_manifests(docs: list[dict[str, Any]], what: str) -> list[str]:
    """Kubernetes schemas (strict: unknown fields refused); structure for operator kinds."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    problems: list[str] = []
    names: set[tuple[str, str]] = set()
    for entry in docs:
        obj: Manifest = entry["manifest"]
        kind, api = obj.get("kind", "?"), obj.get("apiVersion", "?")
        name = obj.get("metadata", {}).get("name", "?")
        where = f"{what}: {entry['template']}: {kind}/{name}"
        if (kind, name) in names:
            problems.append(f"{where}: rendered twice")
        names.add((kind, name))
        if (api, kind) in OPERATOR_KINDS:
            problems += [f"{where}: {p}" for p in _operator_structure(obj)]
            continue
        for version in _kube_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{where}: Kubernetes {version}: {path}: {exc.message}")
            except SchemaNotFoundError:
                problems.append(f"{where}: no schema for {api} {kind} in Kubernetes {version}")
    return problems


def _operator_structure(obj: Manifest) -> list[str]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return ["spec: missing"]
    problems: list[str] = []
    if obj["kind"] == "ServiceMonitor":
        if not isinstance(spec.get("selector"), dict):
            problems.append("spec.selector: missing")
        endpoints = spec.get("endpoints")
        if not isinstance(endpoints, list) or not endpoints:
            problems.append("spec.endpoints: expected a non-empty list")
        else:
            for i, ep in enumerate(endpoints):
                if not isinstance(ep, dict) or not (ep.get("port") or ep.get("targetPort")):
                    problems.append(f"spec.endpoints[{i}]: needs port")
    else:
        groups = spec.get("groups")
        if not isinstance(groups, list) or not groups:
            return ["spec.groups: expected a non-empty list"]
        for g in groups:
            for i, rule in enumerate(g.get("rules") or []):
                if not isinstance(rule, dict) or not rule.get("expr"):
                    problems.append(f"group {g.get('name')}: rule {i}: needs expr")
                elif bool(rule.get("alert")) == bool(rule.get("record")):
                    problems.append(f"group {g.get('name')}: rule {i}: needs alert or record")
    return problems


class _RulesDumper(yaml.SafeDumper):
    """Multi-line strings (the alert expressions) as literal blocks, as people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_RulesDumper.add_representer(str, _str)


def dump_rules(rules: dict[str, Any]) -> str:
    return yaml.dump(rules, Dumper=_RulesDumper, sort_keys=False, width=100)


def rules_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule groups of the rendered PrometheusRule, as a Prometheus rules file."""
    groups: list[Any] = []
    for entry in docs:
        obj = entry["manifest"]
        if obj.get("kind") == "PrometheusRule":
            groups += obj["spec"]["groups"]
    return {"groups": groups}


def promtool(*args: str, cwd: Path | None = None) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        raise CheckFailed("promtool not found: apt-get install prometheus (Debian) provides it")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise CheckFailed(f"promtool {' '.join(args)} failed:\n{out}")
    return out


def check_alerts(rules: dict[str, Any], *, unit_tests: bool) -> str:
    """``promtool check rules`` and, with the default thresholds, ``promtool test rules``."""
    with tempfile.TemporaryDirectory(prefix="helm-check-") as tmp:
        rules_file = Path(tmp) / "rules.yaml"
        rules_file.write_text(dump_rules(rules))
        out = promtool("check", "rules", str(rules_file))
        if unit_tests:
            shutil.copy(ALERT_TESTS, Path(tmp) / "alerts-tests.yaml")
            out += "\n" + promtool("test", "rules", "alerts-tests.yaml", cwd=Path(tmp))
        return out


# -- commands --------------------------------------------------------------------------

def run_all() -> int:
    failures: list[str] = []
    full = user_values([str(FULL_VALUES)], [])
    for what, values in (("default values", {}), ("ci/full-values.yaml", full)):
        found = lint(values, what)
        failures += found
        print(f"== helm lint --strict ({what}): {'ok' if not found else 'FAILED'}")
        docs = render(values)
        kinds = sorted({d["manifest"]["kind"] for d in docs})
        print(f"== helm template ({what}): {len(docs)} objects: {', '.join(kinds)}")
        found = validate_manifests(docs, what)
        failures += found
        print(f"== validated against Kubernetes {' and '.join(_kube_versions())}: "
              f"{'ok' if not found else 'FAILED'}")
    # the unit tests' series carry the default selector's job and namespace
    docs = render({"prometheusRule": {"enabled": True}}, release=ALERT_TEST_RELEASE,
                  namespace=ALERT_TEST_NAMESPACE)
    out = check_alerts(rules_of(docs), unit_tests=True)
    print("== promtool check rules + test rules (default thresholds): ok")
    print("   " + out.replace("\n", "\n   "))
    out = check_alerts(rules_of(render(full)), unit_tests=False)
    print("== promtool check rules (ci/full-values.yaml): ok")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="all",
                        choices=["all", "lint", "render", "render-batch", "validate", "rules"])
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE")
    parser.add_argument("--set-json", action="append", default=[], metavar="PATH=JSON")
    parser.add_argument("--release", default="gw")
    parser.add_argument("--namespace", default="gateway")
    args = parser.parse_args(argv)
    try:
        if args.command == "all":
            return run_all()
        if args.command == "render-batch":
            results: list[Any] = []
            for item in json.load(sys.stdin):
                try:
                    results.append(render(item.get("values") or {},
                                          release=item.get("release", args.release),
                                          namespace=item.get("namespace", args.namespace)))
                except CheckFailed as exc:
                    results.append({"error": str(exc)})
            json.dump(results, sys.stdout)
            return 0
        values = user_values(args.values, args.set_json)
        if args.command == "lint":
            problems = lint(values, "values")
            print("\n".join(problems) or "lint: ok")
            return 1 if problems else 0
        docs = render(values, release=args.release, namespace=args.namespace)
        if args.command == "render":
            json.dump(docs, sys.stdout, indent=1)
            return 0
        if args.command == "validate":
            problems = validate_manifests(docs, "values")
            print("\n".join(problems) or f"{len(docs)} objects: ok")
            return 1 if problems else 0
        sys.stdout.write(dump_rules(rules_of(docs)))
        return 0
    except CheckFailed as exc:
        print(f"helm_check: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
