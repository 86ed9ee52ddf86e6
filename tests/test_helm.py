"""The Helm chart (helm/oauth-gateway) and the Dockerfile the chart points at.

Tests that only read files run everywhere. Tests that render the chart need the chart
tools' interpreter (``build/helm-venv/bin/python`` with helm-python-sdk and
kubernetes-validate, or ``$HELM_CHECK_PYTHON``); they skip, saying so, where it is missing,
and fail instead when ``CHART_TOOLS_REQUIRED=1`` (CI sets it).
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config.policy import load_policy
from gateway.config.settings import Settings, described, load_settings
from tests.test_settings import gen_settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "oauth-gateway"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
HELM_CHECK = ROOT / "tools" / "helm_check.py"
HELM_PYTHON = Path(os.environ.get("HELM_CHECK_PYTHON") or ROOT / "build" / "helm-venv" / "bin"
                   / "python")
#: settings the chart sets itself (or refuses), so ``config`` must not carry them
CHART_OWNED_SETTINGS = {"listen", "admin_listen", "policies", "redis_url",
                        "introspection_client_secret", "token_digest_key", "sso_client_secret",
                        "secret_keys", "anaplan_client_secret", "workers"}
#: values whose content is free-form (a whole Kubernetes or gateway structure)
OPAQUE_VALUES = {"config", "policies", "behavior", "podSecurityContext", "securityContext",
                 "resources", "commonLabels"}

Manifest = dict[str, Any]


# -- files -----------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def default_values() -> dict[str, Any]:
    values: dict[str, Any] = load_yaml(CHART / "values.yaml")
    return values


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return loaded


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base`` as helm merges values (mappings recursively)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def value_paths(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the chart's options (free-form values count as one option)."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and key not in OPAQUE_VALUES:
            paths += value_paths(value, path)
        else:
            paths.append(path)
    return paths


def has_path(values: dict[str, Any], path: str) -> bool:
    node: Any = values
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


# -- rendering -------------------------------------------------------------------------

@functools.cache
def chart_tools_missing() -> str | None:
    """Why the chart cannot be rendered here, or None when it can."""
    if not HELM_PYTHON.exists():
        return (f"no chart tools interpreter at {HELM_PYTHON} (python -m venv build/helm-venv "
                "&& build/helm-venv/bin/pip install helm-python-sdk kubernetes-validate)")
    probe = subprocess.run([str(HELM_PYTHON), "-c", "import helm_python, kubernetes_validate"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"{HELM_PYTHON} lacks helm-python-sdk or kubernetes-validate"
    return None


def need_chart_tools() -> None:
    reason = chart_tools_missing()
    if reason is None:
        return
    if os.environ.get("CHART_TOOLS_REQUIRED") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def helm_check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    need_chart_tools()
    return subprocess.run([str(HELM_PYTHON), str(HELM_CHECK), *args], input=stdin,
                          capture_output=True, text=True, check=False, timeout=120)


@functools.cache
def _render(key: str, release: str, namespace: str) -> str:
    proc = helm_check("render-batch", stdin=json.dumps(
        [{"values": json.loads(key), "release": release, "namespace": namespace}]))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)[0]
    return json.dumps(result)


class RenderError(Exception):
    """helm refused to render the values; the message is helm's."""


def render(values: dict[str, Any] | None = None, *, release: str = "gw",
           namespace: str = "gateway") -> list[Manifest]:
    """``helm template`` with these user values: the rendered objects."""
    result = json.loads(_render(json.dumps(values or {}, sort_keys=True), release, namespace))
    if isinstance(result, dict):
        raise RenderError(result["error"])
    return [entry["manifest"] for entry in result]


def full_values() -> dict[str, Any]:
    values: dict[str, Any] = load_yaml(FULL_VALUES)
    return values


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(objects: list[Manifest]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def container(objects: list[Manifest]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    found: dict[str, Any] = pod["containers"][0]
    return found


def env(objects: list[Manifest]) -> dict[str, Any]:
    """The container's variables: the value, or the ``valueFrom`` mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


# -- values and schema (no tools needed) -----------------------------------------------

def schema_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema())
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(values)]


def test_schema_accepts_the_default_and_the_full_values() -> None:
    jsonschema.Draft7Validator.check_schema(schema())
    assert schema_errors(default_values()) == []
    assert schema_errors(merged(default_values(), full_values())) == []


@pytest.mark.parametrize(("override", "where"), [
    ({"config": {"listen": "0.0.0.0:1"}}, "config"),           # the chart owns it
    ({"config": {"redis_url": "redis://x"}}, "config"),        # secrets never in config
    ({"config": {"workers": 4}}, "config"),
    ({"config": {"cache_max_tll": 30}}, "config"),             # a typo is caught
    ({"config": {"log_format": "xml"}}, "config.log_format"),
    ({"config": {"validator": "ldap"}}, "config.validator"),
    ({"config": {"local_cache_ttl": 0}}, "config.local_cache_ttl"),
    ({"config": {"cache_max_ttl": 1.5}}, "config.cache_max_ttl"),   # an int setting
    ({"config": {"require_client_record": "yes"}}, "config.require_client_record"),
    ({"redis": {"url": "http://redis:6379"}}, "redis.url"),
    ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ({"policies": {"routes.txt": "x"}}, "policies"),
    ({"autoscaling": {"minReplicas": 0}}, "autoscaling.minReplicas"),
    ({"lifecycle": {"preStopSleepSeconds": -1}}, "lifecycle.preStopSleepSeconds"),
    ({"service": {"type": "External"}}, "service.type"),
    ({"prometheusRule": {"alerts": {"denySpike": {"severity": "page"}}}},
     "prometheusRule.alerts.denySpike.severity"),
    ({"prometheusRule": {"alerts": {"refreshReuse": {"for": "soon"}}}},
     "prometheusRule.alerts.refreshReuse.for"),
    ({"replicas": 3}, ""),                                      # not an option of this chart
    ({"config": {"secret_keys": "a2V5"}}, "config"),           # from a Secret only
    ({"config": {"anaplan_client_secret": "x"}}, "config"),  # from a Secret only
    ({"secretKeys": {"value": "a2V5"}}, "secretKeys"),          # no keys in values
    ({"anaplan": {"identities": {"both": {"certificateSecret": "c", "basicAuthSecret": "b"}}}},
     "anaplan.identities.both"),
    ({"anaplan": {"identities": {"cert": {"certificateSecret": "c",
                                          "env": {"username": "U"}}}}},
     "anaplan.identities.cert"),                                 # env is for basic auth
    ({"anaplan": {"identities": {"basic": {"basicAuthSecret": "b",
                                           "env": {"password": "1PASS"}}}}},
     "anaplan.identities.basic"),
    ({"anaplan": {"identities": {"pw": {"password": "s3cr3t"}}}}, "anaplan.identities.pw"),
    ({"anaplan": {"identities": {"-x": {"certificateSecret": "c"}}}}, "anaplan.identities"),
    ({"anaplan": {"clientSecret": {"existingSecret": "Not_A_Name"}}},
     "anaplan.clientSecret.existingSecret"),
])
def test_schema_refuses_mistakes(override: dict[str, Any], where: str) -> None:
    errors = schema_errors(merged(default_values(), override))
    assert errors, f"{override} was accepted"
    assert any(e.startswith(f"{where}:") for e in errors), errors


def test_config_schema_is_generated_from_the_settings() -> None:
    """``config`` (and ``redis.url``) is what gateway/config/settings.py declares."""
    gen = gen_settings()
    current = (CHART / "values.schema.json").read_text()
    template = (CHART / "templates" / "deployment.yaml").read_text()
    assert gen.schema_text(current, template) == current, (
        "helm/oauth-gateway/values.schema.json (config) is out of step with "
        "gateway/config/settings.py: run python tools/gen_settings.py --write")
    # every setting but the chart's own, each with the setting's type
    config = schema()["properties"]["config"]["properties"]
    settings = {d.name: d for d in described()}
    assert sorted(config) == sorted(set(settings) - CHART_OWNED_SETTINGS)
    json_type = {str: "string", int: "integer", float: "number", bool: "boolean"}
    for name, prop in config.items():
        assert prop["type"] == json_type[settings[name].kind], name


def test_chart_grace_period_assumes_the_gateways_shutdown_timeout() -> None:
    # without config.shutdown_timeout, the grace period is computed with this default
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    found = re.search(r'dig "shutdown_timeout" ([0-9.]+) \.Values\.config', helpers)
    assert found is not None
    assert float(found.group(1)) == Settings().shutdown_timeout


def test_every_option_is_documented_and_exercised() -> None:
    readme = (CHART / "README.md").read_text().partition("\n## Values\n")[2]
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    paths = value_paths(default_values())
    assert [p for p in paths if p not in documented] == []
    assert [p for p in documented if not has_path(default_values(), p)] == []
    assert [p for p in paths if not has_path(full_values(), p)] == []


def test_chart_deploys_this_version() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]


# -- Dockerfile (no tools needed) ------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions ``(KEYWORD, arguments)`` per stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword.upper(), rest.strip()))
    return stages


def test_dockerfile_builds_a_wheel_and_runs_it_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    builder, final = dockerfile_stages()
    assert builder[0] == ("FROM", "${PYTHON_IMAGE} AS builder")
    assert any(k == "RUN" and "pip wheel" in a for k, a in builder)
    assert final[0] == ("FROM", "${PYTHON_IMAGE}")
    final_text = "\n".join(f"{k} {a}" for k, a in final)
    # no compiler or package install in the image that runs
    for tool in ("gcc", "build-essential", "apt-get install", "libc6-dev", "make "):
        assert tool not in final_text, tool
    install = next(a for k, a in final if k == "RUN" and "pip install" in a)
    assert "--no-index" in install and "from=builder" in install and "python -m venv" in install
    assert ("ARG", "UID=10001") in final
    assert final[-1] == ("CMD", '["serve"]')
    assert ("ENTRYPOINT", '["oauth-gateway"]') in final
    assert ("USER", "${UID}:${UID}") in final
    assert ("EXPOSE", "8080 9090") in final
    env_line = next(a for k, a in final if k == "ENV")
    assert "GATEWAY_ADMIN_LISTEN=0.0.0.0:9090" in env_line
    assert "GATEWAY_POLICIES=/etc/oauth-gateway/policies" in env_line
    assert "PYTHONDONTWRITEBYTECODE=1" in env_line
    assert any(k == "COPY" and a.endswith("policies/*.yaml /etc/oauth-gateway/policies/")
               for k, a in final)
    # USER comes after everything that needs root
    user_at = final.index(("USER", "${UID}:${UID}"))
    assert all(k not in ("RUN", "COPY") for k, _ in final[user_at:])
    # the chart runs the pod as the image's user
    assert default_values()["podSecurityContext"]["runAsUser"] == 10001


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    sent = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert sent == {"pyproject.toml", "README.md", "gateway", "policies"}


# -- rendered chart (chart tools needed) -----------------------------------------------

def test_helm_lint_passes_with_default_and_full_values() -> None:
    for args in ((), ("-f", str(FULL_VALUES))):
        proc = helm_check("lint", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rendered_objects_validate_against_kubernetes_schemas() -> None:
    for args in ((), ("-f", str(FULL_VALUES)),
                 ("--set-json", 'redis={"existingSecret":"r"}',
                  "--set-json", 'credentials={"existingSecret":"c"}',
                  "--set-json", 'autoscaling={"enabled":false}')):
        proc = helm_check("validate", *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_install_renders_a_scalable_hardened_gateway() -> None:
    objects = render()
    assert kinds(objects) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                              "NetworkPolicy", "PodDisruptionBudget", "Secret", "Service",
                              "Service", "ServiceAccount"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001,
                                      "runAsGroup": 10001, "fsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    c = container(objects)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["runAsNonRoot"] is True
    assert set(c["resources"]) == {"requests", "limits"}
    assert c["args"] == ["serve"]
    # the root filesystem is read-only: /tmp is an emptyDir
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    zone = next(t for t in pod["topologySpreadConstraints"]
                if t["topologyKey"] == "topology.kubernetes.io/zone")
    assert zone["labelSelector"]["matchLabels"] == one(
        objects, "Deployment")["spec"]["selector"]["matchLabels"]


def test_probes_use_the_admin_listener_on_all_interfaces() -> None:
    for values, port in (({}, 9090), ({"containerPorts": {"admin": 9191}}, 9191)):
        objects = render(values)
        c = container(objects)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == port
        assert env(objects)["GATEWAY_ADMIN_LISTEN"] == f"0.0.0.0:{port}"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        metrics_service = one(objects, "Service", "gw-oauth-gateway-metrics")
        assert metrics_service["spec"]["ports"][0]["targetPort"] == "metrics"
        # an unready pod (Redis unreachable, draining) is still scraped
        assert metrics_service["spec"]["publishNotReadyAddresses"] is True
        proxy = one(objects, "Service", "gw-oauth-gateway")
        assert [p["targetPort"] for p in proxy["spec"]["ports"]] == ["http"]
        assert env(objects)["GATEWAY_LISTEN"] == "0.0.0.0:8080"


def grace_budget(objects: list[Manifest]) -> tuple[int, float]:
    """(terminationGracePeriodSeconds, preStop sleep + GATEWAY_SHUTDOWN_TIMEOUT)."""
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    sleep = float(container(objects)["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = float(env(objects)["GATEWAY_SHUTDOWN_TIMEOUT"])
    return pod["terminationGracePeriodSeconds"], sleep + drain


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    grace, needed = grace_budget(render())
    assert (grace, needed) == (40, 30.0)
    grace, needed = grace_budget(render({"config": {"shutdown_timeout": 25.5},
                                         "lifecycle": {"preStopSleepSeconds": 15}}))
    assert grace > needed and needed == 40.5
    grace, needed = grace_budget(render(full_values()))
    assert grace == 60 and grace > needed
    with pytest.raises(RenderError, match="terminationGracePeriodSeconds"):
        render({"lifecycle": {"terminationGracePeriodSeconds": 30}})


POLICY_A = """\
upstreams:
  api: https://api.anaplan.com
routes:
  - name: integration-read
    upstream: api
    methods: [GET]
    path: /2/0/**
    scopes: [anaplan:read]
"""


def pod_annotations(objects: list[Manifest]) -> dict[str, str]:
    annotations: dict[str, str] = one(objects, "Deployment")["spec"]["template"]["metadata"][
        "annotations"]
    return annotations


def test_policies_come_from_a_configmap_whose_change_rolls_the_pods(tmp_path: Path) -> None:
    a = render({"policies": {"anaplan.yaml": POLICY_A}})
    again = render({"policies": {"anaplan.yaml": POLICY_A}})
    b = render({"policies": {"anaplan.yaml": POLICY_A.replace("[GET]", "[GET, HEAD]")}})
    assert pod_annotations(a)["checksum/policies"] == pod_annotations(again)[
        "checksum/policies"]
    assert pod_annotations(a)["checksum/policies"] != pod_annotations(b)["checksum/policies"]
    assert env(a)["GATEWAY_POLICIES"] == "/etc/oauth-gateway/policies"
    mount = next(m for m in container(a)["volumeMounts"]
                 if m["mountPath"] == "/etc/oauth-gateway/policies")
    volume = next(v for v in one(a, "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    configmap = one(a, "ConfigMap", volume["configMap"]["name"])
    # what the pods mount is a policy the gateway loads: text and mapping forms alike
    for name, content in one(render(full_values()), "ConfigMap",
                             "anaplan-gateway-policies")["data"].items():
        (tmp_path / name).write_text(content)
    (tmp_path / "anaplan.yaml").write_text(configmap["data"]["anaplan.yaml"])
    policy = load_policy(str(tmp_path))
    assert policy.route_names == ["integration-read", "audit-read"]


def test_without_policies_the_image_policies_are_used() -> None:
    objects = render()
    assert [o for o in objects if o["metadata"]["name"].endswith("-policies")] == []
    assert all(m["mountPath"] != "/etc/oauth-gateway/policies"
               for m in container(objects)["volumeMounts"])


def test_existing_secrets_are_referenced_and_no_secret_is_rendered() -> None:
    objects = render({"redis": {"existingSecret": "shared-redis", "existingSecretKey": "url"},
                      "credentials": {"existingSecret": "gw-creds"}})
    assert "Secret" not in kinds(objects)
    variables = env(objects)
    assert variables["GATEWAY_REDIS_URL"] == {"secretKeyRef": {"name": "shared-redis",
                                                               "key": "url"}}
    assert variables["GATEWAY_INTROSPECTION_CLIENT_SECRET"] == {"secretKeyRef": {
        "name": "gw-creds", "key": "introspection-client-secret", "optional": True}}
    assert variables["GATEWAY_TOKEN_DIGEST_KEY"]["secretKeyRef"]["name"] == "gw-creds"
    assert variables["GATEWAY_SSO_CLIENT_SECRET"]["secretKeyRef"]["key"] == "sso-client-secret"


def test_chart_secret_holds_the_credentials_and_rolls_the_pods() -> None:
    values = {"redis": {"url": "rediss://:redis-pass@redis:6380/0"},
              "credentials": {"introspectionClientSecret": "s3cr3t-introspection"}}
    objects = render(values)
    secret = one(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {"redis-url": "rediss://:redis-pass@redis:6380/0",
                    "introspection-client-secret": "s3cr3t-introspection"}
    variables = env(objects)
    assert variables["GATEWAY_INTROSPECTION_CLIENT_SECRET"] == {"secretKeyRef": {
        "name": secret["metadata"]["name"], "key": "introspection-client-secret"}}
    # unset credentials are not referenced at all
    assert "GATEWAY_TOKEN_DIGEST_KEY" not in variables
    # no secret in clear text outside the Secret
    others = json.dumps([o for o in objects if o["kind"] != "Secret"])
    assert "redis-pass" not in others and "s3cr3t-introspection" not in others
    rotated = render(merged(values, {"credentials": {"introspectionClientSecret": "new"}}))
    assert pod_annotations(rotated)["checksum/secret"] != pod_annotations(objects)[
        "checksum/secret"]


def volume_of(objects: list[Manifest], mount_path: str) -> tuple[dict[str, Any], Any]:
    """The container's mount at ``mount_path`` and the pod volume it mounts."""
    mount = next(m for m in container(objects)["volumeMounts"] if m["mountPath"] == mount_path)
    volume = next(v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    return mount, volume


def test_service_identities_and_secret_keys_come_from_their_secrets(tmp_path: Path) -> None:
    """The certificate and key are files of a Secret volume, at the paths the policy names;
    the basic-auth pair, GATEWAY_SECRET_KEYS and the Anaplan client secret are variables
    from Secrets; none of it passes through a ConfigMap or the chart's own Secret."""
    values = full_values()
    objects = render(values)
    # the policy of ci/full-values.yaml names the mounted files and the variables
    for name, content in one(objects, "ConfigMap", "anaplan-gateway-policies")["data"].items():
        (tmp_path / name).write_text(content)
    policy = load_policy(str(tmp_path))
    integration, reporting = policy.identities["integration"], policy.identities["reporting"]
    mount, volume = volume_of(objects, "/etc/oauth-gateway/identities/integration")
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "anaplan-integration-cert"
    assert volume["secret"]["defaultMode"] == 0o440
    files = {f"{mount['mountPath']}/{item['path']}": item["key"]
             for item in volume["secret"]["items"]}
    assert files == {integration.certificate_file: "tls.crt",
                     integration.private_key_file: "tls.key"}
    variables = env(objects)
    assert variables[reporting.username_env] == {"secretKeyRef": {
        "name": "anaplan-reporting", "key": "user"}}
    assert variables[reporting.password_env] == {"secretKeyRef": {
        "name": "anaplan-reporting", "key": "pass"}}
    assert variables["GATEWAY_SECRET_KEYS"] == {"secretKeyRef": {
        "name": "gateway-secret-keys", "key": "keys"}}
    assert variables["GATEWAY_ANAPLAN_CLIENT_SECRET"] == {"secretKeyRef": {
        "name": "anaplan-oauth-client", "key": "secret"}}
    # only Secret references: no ConfigMap, no chart Secret carries any of it
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret"):
            text = json.dumps(obj)
            assert "GATEWAY_SECRET_KEYS" not in text and "ANAPLAN_CLIENT_SECRET" not in text
            for secret in ("gateway-secret-keys", "anaplan-oauth-client",
                           "anaplan-integration-cert", "anaplan-reporting"):
                assert secret not in text, (obj["kind"], obj["metadata"]["name"])
    assert set(one(objects, "Secret")["data"]) == {"as-secret", "digest-key", "oidc-secret"}


def test_identity_defaults_and_what_is_not_asked_for_is_not_wired() -> None:
    plain = render()
    assert not {"GATEWAY_SECRET_KEYS", "GATEWAY_ANAPLAN_CLIENT_SECRET"} & set(env(plain))
    assert [m for m in container(plain)["volumeMounts"]
            if m["mountPath"].startswith("/etc/oauth-gateway/identities")] == []
    objects = render({"secretKeys": {"existingSecret": "keys"}, "anaplan": {"identities": {
        "Integration_1": {"certificateSecret": "cert"},
        "ops.basic": {"basicAuthSecret": "ops"}}}})
    _, volume = volume_of(objects, "/etc/oauth-gateway/identities/Integration_1")
    assert volume["name"] == "identity-integration-1"    # a DNS label made of the name
    assert [(i["key"], i["path"]) for i in volume["secret"]["items"]] == [
        ("tls.crt", "certificate.pem"), ("tls.key", "private-key.pem")]
    variables = env(objects)
    assert variables["GATEWAY_SECRET_KEYS"] == {"secretKeyRef": {"name": "keys",
                                                                 "key": "secret-keys"}}
    assert variables["ANAPLAN_OPS_BASIC_USERNAME"] == {"secretKeyRef": {
        "name": "ops", "key": "username"}}
    assert variables["ANAPLAN_OPS_BASIC_PASSWORD"] == {"secretKeyRef": {
        "name": "ops", "key": "password"}}
    assert "GATEWAY_ANAPLAN_CLIENT_SECRET" not in variables
    # two names that make one volume name are refused rather than rendered twice
    with pytest.raises(RenderError, match="same volume name"):
        render({"anaplan": {"identities": {"a.b": {"certificateSecret": "x"},
                                           "a_b": {"certificateSecret": "y"}}}})


def test_config_renders_as_settings_the_gateway_accepts() -> None:
    values = full_values()
    variables = {k: v for k, v in env(render(values)).items() if isinstance(v, str)}
    settings = load_settings(environ=variables)
    for name, value in values["config"].items():
        assert getattr(settings, name) == value, name
    assert settings.listen == "[::]:8081" and settings.admin_listen == "[::]:9091"
    # large whole numbers stay integers (helm reads every YAML number as a float)
    assert variables["GATEWAY_MAX_BODY_SIZE"] == "104857600"
    assert variables["GATEWAY_KEYSPACE_NOTIFICATIONS"] == "false"


def test_hpa_and_pdb() -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    fixed = render({"autoscaling": {"enabled": False}, "replicaCount": 3,
                    "podDisruptionBudget": {"minAvailable": "50%"}})
    assert "HorizontalPodAutoscaler" not in kinds(fixed)
    assert one(fixed, "Deployment")["spec"]["replicas"] == 3
    assert one(fixed, "PodDisruptionBudget")["spec"] == {
        "minAvailable": "50%", "selector": deployment["spec"]["selector"]}


def test_network_policy_opens_only_what_the_gateway_uses() -> None:
    policy = one(render(), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    proxy, metrics = policy["ingress"]
    assert proxy == {"ports": [{"port": "http", "protocol": "TCP"}]}  # from anywhere
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert metrics["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    egress_ports = [sorted((p["port"], p["protocol"]) for p in rule["ports"])
                    for rule in policy["egress"]]
    assert egress_ports == [[(53, "TCP"), (53, "UDP")], [(6379, "TCP")], [(443, "TCP")]]
    restricted = one(render(full_values()), "NetworkPolicy")["spec"]
    assert restricted["ingress"][0]["from"] == full_values()["networkPolicy"]["ingress"][
        "proxyFrom"]
    assert len(restricted["egress"]) == 4


def test_monitoring_objects_are_optional_and_wired_to_the_metrics_service() -> None:
    assert {"ServiceMonitor", "PrometheusRule"}.isdisjoint(kinds(render()))
    objects = render({"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
                      "prometheusRule": {"enabled": True}})
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service", "gw-oauth-gateway-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert not selector.items() <= one(objects, "Service", "gw-oauth-gateway")["metadata"][
        "labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    rule = one(objects, "PrometheusRule")
    # the alerts select the series the ServiceMonitor produces: job = the Service's name
    assert 'job="gw-oauth-gateway-metrics", namespace="gateway"' in rule["spec"]["groups"][0][
        "rules"][0]["expr"]


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    configmap = one(render(), "ConfigMap", "gw-oauth-gateway-dashboards")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "oauth-gateway.json").read_text())
    assert json.loads(configmap["data"]["oauth-gateway.json"]) == shipped
    custom = one(render({"dashboards": {"label": "dash", "labelValue": "yes",
                                        "folder": "Identity"}}),
                 "ConfigMap", "gw-oauth-gateway-dashboards")
    assert custom["metadata"]["labels"]["dash"] == "yes"
    assert custom["metadata"]["annotations"] == {"grafana_folder": "Identity"}
    assert "ConfigMap" not in kinds(render({"dashboards": {"enabled": False}}))


def test_the_chart_refuses_settings_it_owns_even_without_schema_validation() -> None:
    # the templates check too, for installs run with --skip-schema-validation
    template = (CHART / "templates" / "deployment.yaml").read_text()
    reserved = re.search(r'\$reserved := list ((?:"[a-z_]+" ?)+)', template)
    assert reserved is not None
    assert set(re.findall(r'"([a-z_]+)"', reserved.group(1))) == CHART_OWNED_SETTINGS
