"""Settings: one declaration per setting, and what is derived from it.

Each ``Settings`` field declares a setting's name, type, default, help text and bounds. The
loader's checks, the README's settings table and the Helm chart's ``config`` schema come
from it (``tools/gen_settings.py``); these tests keep the copies in the repository equal
to what the declaration generates, and the loader and the schema in agreement.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

from gateway.config.settings import (
    Settings,
    SettingsError,
    described,
    env_name,
    load_settings,
    parse_hostport,
)
from gateway.config.spec import Described, describe

ROOT = Path(__file__).resolve().parent.parent
GEN_SETTINGS = ROOT / "tools" / "gen_settings.py"
README = ROOT / "README.md"


@functools.cache
def gen_settings() -> ModuleType:
    """``tools/gen_settings.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_settings", GEN_SETTINGS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STALE = "out of step with gateway/config/settings.py: run python tools/gen_settings.py --write"


# -- the generated copies --------------------------------------------------------------

def test_readme_settings_table_is_generated_from_the_settings() -> None:
    current = README.read_text()
    assert gen_settings().readme_text(current) == current, f"README.md's settings table is {STALE}"
    table = current.partition("<!-- settings-table:start -->")[2].partition(
        "<!-- settings-table:end -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `GATEWAY_")]
    assert [r.split("`")[1] for r in rows] == [env_name(d.name) for d in described()]


def test_a_hand_edited_copy_is_noticed() -> None:
    gen = gen_settings()
    readme = README.read_text()
    edited = readme.replace("| `GATEWAY_WORKERS` |", "| `GATEWAY_WORKER` |")
    assert edited != readme and gen.readme_text(edited) == readme
    with pytest.raises(gen.Stale, match="settings-table:start"):
        gen.readme_text(readme.replace("<!-- settings-table:end -->", ""))
    schema = gen.SCHEMA.read_text()
    template = gen.DEPLOYMENT.read_text()
    edited = schema.replace('"exclusiveMinimum": 0', '"minimum": 0', 1)
    assert edited != schema and gen.schema_text(edited, template) == schema


def test_the_check_command_passes_and_writes_nothing() -> None:
    proc = subprocess.run([sys.executable, str(GEN_SETTINGS)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_every_setting_is_declared_with_its_description() -> None:
    fields = dataclasses.fields(Settings)
    assert [d.name for d in described()] == [f.name for f in fields]
    assert all(d.spec.doc for d in described())
    assert Settings() == load_settings(environ={})

    @dataclasses.dataclass
    class Undescribed:
        plain: int = 1

    with pytest.raises(TypeError, match=r"Undescribed.plain: declare it with setting"):
        describe(Undescribed)


# -- the loader's messages -------------------------------------------------------------

@pytest.mark.parametrize(("variable", "value", "message"), [
    ("GATEWAY_LOG_FORMAT", "xml", "GATEWAY_LOG_FORMAT: expected json or text, got 'xml'"),
    ("GATEWAY_VALIDATOR", "ldap", "GATEWAY_VALIDATOR: expected auto, introspection, jwt, "
                                  "anaplan or builtin, got 'ldap'"),
    ("GATEWAY_AS_REFRESH_MODE", "sometimes",
     "GATEWAY_AS_REFRESH_MODE: expected rotatable or non_rotatable, got 'sometimes'"),
    ("GATEWAY_AS_ACCESS_TOKEN_FORMAT", "saml",
     "GATEWAY_AS_ACCESS_TOKEN_FORMAT: expected opaque or jwt, got 'saml'"),
    ("GATEWAY_LOG_LEVEL", "loud", "GATEWAY_LOG_LEVEL: expected DEBUG, INFO, WARNING, ERROR, "
                                  "CRITICAL, WARN, FATAL or NOTSET, got 'loud'"),
    ("GATEWAY_ISSUER", "gw.example.com", "GATEWAY_ISSUER: expected an https:// URL"),
    ("GATEWAY_JWKS_URL", "file:///jwks.json", "GATEWAY_JWKS_URL: expected an https:// URL"),
    ("GATEWAY_REDIS_URL", "http://127.0.0.1:6379",
     "GATEWAY_REDIS_URL: expected a redis://, rediss://, unix://, redis+sentinel:// or "
     "redis+cluster:// URL"),
    ("GATEWAY_LISTEN", "8080", "GATEWAY_LISTEN: expected host:port, got '8080'"),
    ("GATEWAY_ADMIN_LISTEN", "h:65536", "GATEWAY_ADMIN_LISTEN: expected host:port, got "
                                        "'h:65536'"),
    ("GATEWAY_LOCAL_CACHE_TTL", "0", "GATEWAY_LOCAL_CACHE_TTL: must be greater than 0"),
    ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS: must be greater than 0"),
    ("GATEWAY_UPSTREAM_TIMEOUT", "-1", "GATEWAY_UPSTREAM_TIMEOUT: must be 0 (no limit) or more"),
    ("GATEWAY_UPSTREAM_POOL_SIZE", "-1",
     "GATEWAY_UPSTREAM_POOL_SIZE: must be 0 (no limit) or more"),
    ("GATEWAY_AS_IDLE_TIMEOUT", "-1", "GATEWAY_AS_IDLE_TIMEOUT: must be 0 (none) or more"),
    ("GATEWAY_JWT_LEEWAY", "-5", "GATEWAY_JWT_LEEWAY: must be 0 or more"),
    ("GATEWAY_WORKERS", "many", "GATEWAY_WORKERS: expected an integer, got 'many'"),
    ("GATEWAY_SHUTDOWN_TIMEOUT", "soon", "GATEWAY_SHUTDOWN_TIMEOUT: expected a number, got "
                                         "'soon'"),
    ("GATEWAY_ACCESS_LOG", "perhaps", "GATEWAY_ACCESS_LOG: expected true or false, got "
                                      "'perhaps'"),
])
def test_a_bad_value_is_refused_naming_the_variable(variable: str, value: str,
                                                    message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={variable: value})
    assert str(caught.value) == message


def test_a_refused_redis_url_is_not_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"GATEWAY_REDIS_URL": "http://:hunter2@redis:6379/0"})
    assert "hunter2" not in str(caught.value)


def test_values_logging_and_the_listeners_accept() -> None:
    settings = load_settings(environ={"GATEWAY_LOG_LEVEL": "warn", "GATEWAY_LISTEN": "[::]:0",
                                      "GATEWAY_ISSUER": "http://127.0.0.1:9000",
                                      "GATEWAY_UPSTREAM_TIMEOUT": "0"})
    assert (settings.log_level, settings.upstream_timeout) == ("warn", 0.0)
    assert parse_hostport(settings.listen) == ("::", 0)
    assert parse_hostport(":8080") == ("0.0.0.0", 8080)
    with pytest.raises(SettingsError, match=r"^address: expected host:port"):
        parse_hostport("localhost")


def test_config_file_then_environment_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("GATEWAY_LOG_FORMAT: text\nworkers: 3\nlocal_cache_ttl: 1\n")
    settings = load_settings(config, environ={"GATEWAY_WORKERS": "4"}, local_cache_ttl=2.5)
    assert (settings.log_format, settings.workers, settings.local_cache_ttl) == ("text", 4, 2.5)
    from_env = load_settings(environ={"GATEWAY_CONFIG": str(config)})
    assert from_env.workers == 3


@pytest.mark.parametrize(("content", "message"), [
    ("cache_max_tll: 30\n", "{path}: unknown setting 'cache_max_tll'"),
    ("- a list\n", "{path}: expected a mapping of setting names to values"),
    ("workers: many\n", "{path}: workers: expected an integer, got 'many'"),
    ("log_format: xml\n", "GATEWAY_LOG_FORMAT: expected json or text, got 'xml'"),
    ("workers: [1\n", "{path}: not valid YAML: "),
])
def test_config_file_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(content)
    with pytest.raises(SettingsError) as caught:
        load_settings(config, environ={})
    assert str(caught.value).startswith(message.format(path=config))


def test_unreadable_config_file_and_unknown_override(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml", environ={})
    with pytest.raises(SettingsError, match=r"^unknown setting 'listen_port'$"):
        load_settings(environ={}, listen_port=1)


# -- the schema and the loader agree ---------------------------------------------------

def probes(d: Described) -> list[Any]:
    """Values of the setting's type on both sides of each of its bounds."""
    spec = d.spec
    values: list[Any] = [d.default]
    if spec.choices:
        # both cases of a case-insensitive choice (the schema cannot say "any case")
        values += [*spec.choices, *(c.lower() for c in spec.choices if spec.any_case),
                   "bogus", ""]
    if spec.url is not None:
        values += ["", "x", "ftp://x", "https:/x", *(f"{s}://h" for s in spec.url.schemes)]
    if spec.hostport:
        values += ["h:1", "[::1]:8080", ":0", "h:65535", "h:065535", "h:65536", "h", "h:",
                   "h:x", "8080"]
    for bound in (spec.minimum, spec.above):
        if bound is not None:
            values += [d.kind(bound - 1), d.kind(bound), d.kind(bound + 1)]
            if d.kind is float:
                values += [bound - 0.5, bound + 0.5]
    return values


def loader_accepts(name: str, value: Any) -> bool:
    try:
        load_settings(environ={}, **{name: value})
    except SettingsError:
        return False
    return True


@pytest.mark.parametrize("d", described(), ids=lambda d: d.name)
def test_schema_and_loader_agree_on_every_bound(d: Described) -> None:
    schema = d.spec.json_schema(d.kind, d.default, env_name(d.name))
    validator = jsonschema.Draft7Validator(schema)
    for value in probes(d):
        assert validator.is_valid(value) == loader_accepts(d.name, value), (d.name, value)
